"""Loading the base model once, in the requested precision, on the chosen device."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from loraswap.errors import InvalidArgumentError
from loraswap.models import BaseModelRef
from loraswap.models.base import no_progress_bars
from loraswap.models.quantization import bnb_config
from loraswap.precision import DTYPES, Precision, default_precision, explicit
from loraswap.server.engine.weight_only import half_weights_supported, replace_linears

log = logging.getLogger(__name__)

BNB_QUANTIZATIONS = ("nf4", "int8")
"""Quantizations that go through bitsandbytes; they compute in the device's :func:`default_precision`."""
WEIGHT_ONLY_QUANTIZATIONS = ("fp16w",)
"""Quantizations loraswap applies itself after loading (``engine/weight_only.py``): CPU only, fp32 compute."""


@dataclass
class LoadedBase:
    """A base model ready for the engine.

    Attributes:
        model: The HF causal LM (eval mode, no grads).
        tokenizer: Its tokenizer.
        quantization: ``nf4``, ``int8``, ``fp16w``, ``bf16``, ``fp16`` or ``fp32``.
        compute_dtype: Dtype of activations, KV cache and LoRA buffers.
        device: Where it lives.
        precision: The compute precision and why it was chosen (the line ``serve`` logs at start).
    """

    model: nn.Module
    tokenizer: object
    quantization: str
    compute_dtype: torch.dtype
    device: torch.device
    precision: Precision


def compute_dtype(quantization: str, device: torch.device) -> torch.dtype:
    """The dtype a base loaded at ``quantization`` on ``device`` computes in: its own for plain dtypes;
    the device's native precision under bitsandbytes (nf4, int8); fp32 for fp16w."""
    return choose_precision(quantization, device)[1].dtype


def choose_precision(requested: str | None, device: torch.device) -> tuple[str, Precision]:
    """The base's quantization and its compute precision: ``requested`` when given (the flag wins), else
    NF4 on CUDA and the CPU's native precision (bf16 or fp32) on CPU (NF4 on CPU is opt-in).

    Raises:
        InvalidArgumentError: An unknown quantization, or fp16w where it cannot run (not a CPU, or a CPU
            or torch build without fbgemm).
    """
    if requested in WEIGHT_ONLY_QUANTIZATIONS:
        return requested, _weight_only_precision(requested, device)
    hardware = default_precision(device)
    if requested is None:
        requested = "nf4" if device.type == "cuda" else hardware.name
        if requested in DTYPES:
            return requested, hardware
    elif requested in DTYPES:
        return requested, explicit(requested, "the quantization setting", hardware)
    if requested not in BNB_QUANTIZATIONS:
        raise InvalidArgumentError(f"unknown quantization {requested!r}")
    return requested, dataclasses.replace(hardware, reason=f"{requested} weights; {hardware.reason}")


def _weight_only_precision(quantization: str, device: torch.device) -> Precision:
    if device.type != "cpu":
        raise InvalidArgumentError(
            f"quantization {quantization!r} runs on CPU only (fbgemm's fp16 matmul); on {device.type} pick "
            "nf4, int8, bf16 or fp16"
        )
    if not half_weights_supported():
        raise InvalidArgumentError(
            f"quantization {quantization!r} needs fbgemm's fp16 matmul, which this CPU or torch build lacks "
            "(it needs an x86 CPU with AVX2 and F16C); pick fp32, bf16, nf4 or int8"
        )
    hardware = default_precision(device)
    return Precision("fp32", f"fp16 weights, fp32 matmuls; {hardware.reason}", hardware.native_bf16)


def load_base(ref: BaseModelRef, quantization: str | None, device: torch.device) -> LoadedBase:
    """Load ``ref`` once, at ``quantization`` (None: :func:`choose_precision`'s default). nf4 and int8
    go through bitsandbytes; fp16w loads the checkpoint in its own dtype, turns every plain linear layer
    into an fp16-weight one (``engine/weight_only.py``) and the rest (embedding, norms) into fp32; the
    others are plain dtypes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantization, precision = choose_precision(quantization, device)
    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    dtype = precision.dtype
    if quantization in DTYPES:
        with no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=dtype).to(device)
    elif quantization in WEIGHT_ONLY_QUANTIZATIONS:
        with no_progress_bars():  # the checkpoint's dtype: no float32 copy of the linear weights is made
            model = AutoModelForCausalLM.from_pretrained(ref.path, dtype="auto")
        replace_linears(model)
        model.to(dtype)
    else:  # BNB_QUANTIZATIONS
        config = bnb_config(quantization, dtype)
        with no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(
                ref.path, dtype=dtype, quantization_config=config, device_map={"": str(device)}
            )
    model.eval()
    model.requires_grad_(False)
    log.info("loaded base %s (%s) on %s; %s", ref.model_id, quantization, device, precision.describe())
    return LoadedBase(model, tokenizer, quantization, dtype, device, precision)

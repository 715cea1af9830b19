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

log = logging.getLogger(__name__)

BNB_QUANTIZATIONS = ("nf4", "int8")
"""Quantizations that go through bitsandbytes; they compute in the device's :func:`default_precision`."""


@dataclass
class LoadedBase:
    """A base model ready for the engine.

    Attributes:
        model: The HF causal LM (eval mode, no grads).
        tokenizer: Its tokenizer.
        quantization: ``nf4``, ``int8``, ``bf16``, ``fp16`` or ``fp32``.
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
    the device's native precision under bitsandbytes (nf4, int8)."""
    return choose_precision(quantization, device)[1].dtype


def choose_precision(requested: str | None, device: torch.device) -> tuple[str, Precision]:
    """The base's quantization and its compute precision: ``requested`` when given (the flag wins), else
    NF4 on CUDA and the CPU's native precision (bf16 or fp32) on CPU (NF4 on CPU is opt-in)."""
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


def load_base(ref: BaseModelRef, quantization: str | None, device: torch.device) -> LoadedBase:
    """Load ``ref`` once, at ``quantization`` (None: :func:`choose_precision`'s default). Quantized
    variants go through bitsandbytes; the others are plain dtypes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantization, precision = choose_precision(quantization, device)
    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    dtype = precision.dtype
    if quantization in DTYPES:
        with no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=dtype).to(device)
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

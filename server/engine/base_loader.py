"""Loading the base model once, in the requested precision, on the chosen device."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from loraswap.errors import InvalidArgumentError
from loraswap.models import BaseModelRef
from loraswap.models.base import no_progress_bars
from loraswap.models.quantization import bnb_config

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedBase:
    """A base model ready for the engine.

    Attributes:
        model: The HF causal LM (eval mode, no grads).
        tokenizer: Its tokenizer.
        quantization: ``nf4``, ``int8``, ``bf16``, ``fp16`` or ``fp32``.
        compute_dtype: Dtype of activations, KV cache and LoRA buffers.
        device: Where it lives.
    """

    model: nn.Module
    tokenizer: object
    quantization: str
    compute_dtype: torch.dtype
    device: torch.device


def compute_dtype(quantization: str) -> torch.dtype:
    """The dtype a base loaded at ``quantization`` computes in: its own for plain dtypes, bf16 under
    bitsandbytes (nf4, int8)."""
    return _DTYPES.get(quantization, torch.bfloat16)


def default_quantization(device: torch.device) -> str:
    """NF4 on CUDA; bf16 on CPU (NF4 on CPU is opt-in)."""
    return "nf4" if device.type == "cuda" else "bf16"


def load_base(ref: BaseModelRef, quantization: str, device: torch.device) -> LoadedBase:
    """Load ``ref`` once. Quantized variants go through bitsandbytes; the others are plain dtypes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    dtype = compute_dtype(quantization)
    if quantization in _DTYPES:
        with no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=dtype).to(device)
    elif quantization in ("nf4", "int8"):
        config = bnb_config(quantization)
        with no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(
                ref.path, dtype=dtype, quantization_config=config, device_map={"": str(device)}
            )
    else:
        raise InvalidArgumentError(f"unknown quantization {quantization!r}")
    model.eval()
    model.requires_grad_(False)
    log.info("loaded base %s (%s) on %s", ref.model_id, quantization, device)
    return LoadedBase(model, tokenizer, quantization, dtype, device)

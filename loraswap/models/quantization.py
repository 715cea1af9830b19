"""The bitsandbytes quantization configs loraswap uses, defined once (engine, trainer, tests)."""

from __future__ import annotations

from typing import Any


def bnb_config(kind: str) -> Any:
    """``nf4``: 4-bit NormalFloat, double quantization, bf16 compute (QLoRA's recipe); ``int8``: LLM.int8."""
    import torch
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown bitsandbytes quantization {kind!r}")

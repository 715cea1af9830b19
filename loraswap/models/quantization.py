"""The bitsandbytes quantization configs loraswap uses, defined once (engine, trainer, tests)."""

from __future__ import annotations

import logging
from typing import Any

from loraswap.errors import InvalidArgumentError

# Logged by bitsandbytes when it is imported on a CPU with avx512_bf16: an optional faster 4-bit CPU kernel
# would be fetched from the Hugging Face hub by the `kernels` package. loraswap downloads nothing at run
# time, so the message only ever reports a road not taken.
_HUB_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
_HUB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_hub_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_HUB_KERNEL_MESSAGE)


def quiet_bitsandbytes_import() -> None:
    """Drop bitsandbytes' hub-kernel notice (and nothing else it logs); call before bitsandbytes is imported
    (``import peft`` imports it too). Idempotent."""
    logger = logging.getLogger(_HUB_KERNEL_LOGGER)
    if _not_the_hub_kernel_notice not in logger.filters:
        logger.addFilter(_not_the_hub_kernel_notice)


def bnb_config(kind: str, compute_dtype: Any = None) -> Any:
    """``nf4``: 4-bit NormalFloat, double quantization (QLoRA's recipe), computing in ``compute_dtype``
    (default bf16; fp16 on GPUs without native bf16, see ``loraswap.precision``); ``int8``: LLM.int8.

    Raises:
        InvalidArgumentError: bitsandbytes is not installed (it comes with the ``cuda`` extra).
        ValueError: ``kind`` is neither.
    """
    if kind not in ("nf4", "int8"):
        raise ValueError(f"unknown bitsandbytes quantization {kind!r}")
    quiet_bitsandbytes_import()
    try:
        import bitsandbytes  # noqa: F401  (loading with these configs imports it anyway)
    except ImportError:
        raise InvalidArgumentError(
            f"quantization {kind!r} needs bitsandbytes, which is not installed: "
            "pip install 'loraswap[cuda]' (or pick bf16, fp16 or fp32)"
        ) from None
    import torch
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)

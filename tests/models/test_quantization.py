"""The bitsandbytes configs: a clear error without bitsandbytes, and its hub-kernel notice dropped."""

from __future__ import annotations

import logging
import sys

import pytest

from loraswap.errors import InvalidArgumentError
from loraswap.models import quantization
from loraswap.models.quantization import bnb_config, quiet_bitsandbytes_import


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, __file__, 1, message, (), None)


def test_the_hub_kernel_notice_is_dropped_and_nothing_else() -> None:
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    saved = list(logger.filters)
    logger.filters[:] = [f for f in saved if f is not quantization._not_the_hub_kernel_notice]  # as at start
    try:
        quiet_bitsandbytes_import()
        quiet_bitsandbytes_import()  # idempotent: one filter
        assert logger.filters.count(quantization._not_the_hub_kernel_notice) == 1
        notice = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ..."
        assert not logger.filter(_record(notice))
        assert logger.filter(_record("Failed to load the bitsandbytes CPU library"))
    finally:
        logger.filters[:] = saved


def test_a_quantized_config_without_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: the import fails
    with pytest.raises(InvalidArgumentError, match=r"'nf4' needs bitsandbytes.*loraswap\[cuda\]"):
        bnb_config("nf4")


def test_the_two_configs() -> None:
    nf4, int8 = bnb_config("nf4"), bnb_config("int8")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert int8.load_in_8bit and not int8.load_in_4bit
    with pytest.raises(ValueError, match="unknown bitsandbytes quantization 'fp8'"):
        bnb_config("fp8")

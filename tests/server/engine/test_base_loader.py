"""Loading the base: no progress bar in a server's log, transformers' own setting left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

from loraswap.models import resolve_base
from loraswap.server.engine.base_loader import load_base


@pytest.mark.parametrize("bars_on", [True, False])
def test_loading_draws_no_progress_bar_and_restores_the_setting(
    tiny_base: Path, capfd: pytest.CaptureFixture[str], bars_on: bool
) -> None:
    saved = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if bars_on else hf_logging.disable_progress_bar)()
    try:
        loaded = load_base(resolve_base(tiny_base), "fp32", torch.device("cpu"))
        assert hf_logging.is_progress_bar_enabled() == bars_on
    finally:
        (hf_logging.enable_progress_bar if saved else hf_logging.disable_progress_bar)()
    assert loaded.compute_dtype == torch.float32 and not loaded.model.training
    assert "Loading weights" not in capfd.readouterr().err

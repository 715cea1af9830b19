"""``training_metadata.json``: where an adapter came from and how well it trained.

The registry stores this document in the version's manifest under ``training``.
"""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraswap import __version__
from loraswap.adapter_format import TRAINING_METADATA
from loraswap.trainer.checkpoint import TrainerState
from loraswap.trainer.config import TrainConfig
from loraswap.trainer.encoding import EncodedData

SCHEMA_VERSION = 1


def perplexity(loss: float | None) -> float | None:
    """``exp(loss)``; ``None`` without a loss or when it overflows."""
    if loss is None or not math.isfinite(loss) or loss > 700:
        return None
    return math.exp(loss)


def _finite(value: float | None) -> float | None:
    """Strict JSON has no NaN/Infinity: a diverged loss is recorded as null."""
    return value if value is None or math.isfinite(value) else None


def dataset_entry(data: EncodedData) -> dict[str, Any]:
    return {
        "path": str(data.source.path),
        "sha256": data.source.sha256,
        "format": data.source.format,
        "records": len(data.source.records),
        "examples": len(data.examples),
        "truncated": data.truncated,
        "dropped": data.dropped,
    }


def build_metadata(
    *,
    config: TrainConfig,
    base: dict[str, str],
    datasets: dict[str, Any],
    state: TrainerState,
    eval_loss: float | None,
    device: str,
    precision: str | None = None,
) -> dict[str, Any]:
    """The metadata document of a finished run (``precision``: the dtype the base trained in)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "loraswap_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": base["model_id"],
        "base_fingerprint": base["fingerprint"],
        "method": "qlora" if config.qlora else "lora",
        "device": device,
        "precision": precision,
        "datasets": datasets,
        "config": config.to_dict(),
        "steps": state.step,
        "tokens": state.tokens,
        "supervised_tokens": state.supervised_tokens,
        "duration_seconds": round(state.seconds, 3),
        "tokens_per_second": round(state.tokens / state.seconds, 1) if state.seconds > 0 else None,
        "train_loss": _finite(state.last_loss),
        "initial_eval_loss": _finite(state.initial_eval_loss),
        "eval_loss": _finite(eval_loss),
        "eval_perplexity": perplexity(eval_loss),
        "loss_history": [[step, _finite(loss)] for step, loss in state.history],
        "eval_history": [[step, _finite(loss)] for step, loss in state.eval_history],
    }


def write_metadata(out_dir: Path, doc: dict[str, Any]) -> Path:
    path = Path(out_dir) / TRAINING_METADATA
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_metadata(out_dir: Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / TRAINING_METADATA).read_text())

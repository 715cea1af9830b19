"""Resumable checkpoints: ``<output>/checkpoints/step-N/`` with everything needed to continue exactly.

A checkpoint holds the LoRA weights (safetensors), the optimizer and scheduler states and the RNG states
(``torch.save``, loaded with ``weights_only=True``), and ``trainer_state.json`` (step, counters, the
config and data digests it was made with). It is written into a temporary folder and renamed into place,
so a run killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraswap.adapter_format import ADAPTER_WEIGHTS
from loraswap.trainer.adapter_io import load_lora_tensors, lora_tensors

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Progress counters saved with each checkpoint.

    Attributes:
        step: Optimizer steps done.
        tokens: Non-padding tokens processed.
        supervised_tokens: Tokens that carried loss.
        last_loss: Loss of the last optimizer step.
        fingerprint: What must not change on resume (config that shapes training, data digests).
        seconds: Training time so far (all sessions of a resumed run).
        initial_eval_loss: Eval loss before the first step.
        history: ``[step, train loss]`` of every step.
        eval_history: ``[step, eval loss]`` of the periodic evaluations.
    """

    step: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    last_loss: float | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    initial_eval_loss: float | None = None
    history: list[list[float]] = field(default_factory=list)
    eval_history: list[list[float]] = field(default_factory=list)


def checkpoint_dir(output: Path, step: int) -> Path:
    return Path(output) / CHECKPOINTS / f"step-{step}"


def latest_checkpoint(output: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``output``, or ``None``."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return None
    found = [
        (int(m[1]), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return max(found)[1] if found else None


def _rng_states() -> dict[str, Any]:
    import torch

    from loraswap.device import cuda_rng_states

    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if (cuda := cuda_rng_states()) is not None:
        states["cuda"] = cuda
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    import torch

    from loraswap.device import set_cuda_rng_states

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    set_cuda_rng_states(states.get("cuda"))


def save_checkpoint(output: Path, model, optimizer, scheduler, state: TrainerState) -> Path:
    """Write ``checkpoints/step-<state.step>`` atomically; return its folder."""
    import torch
    from safetensors.torch import save_file

    target = checkpoint_dir(output, state.step)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(lora_tensors(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_states(), tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG states from ``folder``; return its counters."""
    import torch
    from safetensors.torch import load_file

    load_lora_tensors(model, load_file(str(folder / ADAPTER_WEIGHTS)))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    _set_rng_states(torch.load(folder / "rng.pt", weights_only=True))
    return TrainerState(**json.loads((folder / STATE_FILE).read_text()))


def read_state(folder: Path) -> TrainerState:
    return TrainerState(**json.loads((Path(folder) / STATE_FILE).read_text()))

"""``train(config)``: one LoRA / QLoRA run from data files to a PEFT adapter folder with its metadata."""

from __future__ import annotations

import logging
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraswap.adapter_format import ADAPTER_WEIGHTS
from loraswap.errors import InvalidArgumentError
from loraswap.models import BaseModelRef, base_fingerprint, resolve_base
from loraswap.trainer.adapter_io import save_adapter
from loraswap.trainer.checkpoint import (
    CHECKPOINTS,
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    read_state,
)
from loraswap.trainer.config import TrainConfig
from loraswap.trainer.data import read_jsonl
from loraswap.trainer.encoding import EncodedData, Example, encode_file
from loraswap.trainer.loop import LoopContext, evaluate, run_loop, total_steps
from loraswap.trainer.metadata import build_metadata, dataset_entry, write_metadata
from loraswap.trainer.model import (
    build_model,
    cpu_threads,
    load_tokenizer,
    make_optimizer,
    make_scheduler,
    pick_device,
    trainable_parameters,
)

log = logging.getLogger(__name__)

# Config keys that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = frozenset({"progress", "save_steps", "eval_steps", "device", "output", "cpu_threads"})


@dataclass(frozen=True)
class TrainResult:
    """A finished run.

    Attributes:
        output: The adapter folder.
        base: The base model trained on.
        metadata: The ``training_metadata.json`` document.
        resumed_from: The checkpoint step the run continued from (``None`` for a fresh run).
        model: The trained in-memory PEFT model (for checks right after training).
        tokenizer: The base model's tokenizer.
    """

    output: Path
    base: BaseModelRef
    metadata: dict[str, Any]
    resumed_from: int | None
    model: Any
    tokenizer: Any


@dataclass(frozen=True)
class Splits:
    """Training and evaluation examples and their sources' metadata entries."""

    train: list[Example]
    eval: list[Example]
    datasets: dict[str, Any]


def load_splits(config: TrainConfig, tokenizer) -> Splits:
    """Read and tokenize the data; hold out ``eval_fraction`` when no eval file is given."""
    train = _encode(config.data, config, tokenizer)
    datasets: dict[str, Any] = {"train": dataset_entry(train)}
    examples = list(train.examples)
    if config.eval_data:
        evaluation = _encode(config.eval_data, config, tokenizer)
        datasets["eval"] = dataset_entry(evaluation)
        return Splits(examples, list(evaluation.examples), datasets)
    if config.eval_fraction <= 0:
        return Splits(examples, [], datasets)
    import torch

    held = min(len(examples) - 1, max(1, math.ceil(len(examples) * config.eval_fraction)))
    if held < 1:
        raise InvalidArgumentError("eval_fraction needs at least 2 training examples")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed)).tolist()
    datasets["eval"] = {"held_out_fraction": config.eval_fraction, "examples": held}
    return Splits([examples[i] for i in sorted(order[held:])], [examples[i] for i in order[:held]], datasets)


def _encode(path: str | None, config: TrainConfig, tokenizer) -> EncodedData:
    encoded = encode_file(
        read_jsonl(str(path), config.format), tokenizer, config.max_seq_len, config.overlong
    )
    if encoded.truncated or encoded.dropped:
        log.warning(
            "%s: %d example(s) truncated and %d dropped (max_seq_len=%d, overlong=%s)",
            path, encoded.truncated, encoded.dropped, config.max_seq_len, config.overlong,
        )  # fmt: skip
    return encoded


def _check_output(output: Path, resume: bool) -> None:
    used = (output / ADAPTER_WEIGHTS).exists() or (output / CHECKPOINTS).exists()
    if used and not resume:
        raise InvalidArgumentError(
            f"output folder '{output}' already holds a training run; pass --resume to continue it "
            "or choose another --output"
        )


def _run_fingerprint(config: TrainConfig, base_print: str, datasets: dict[str, Any]) -> dict[str, Any]:
    settings = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES}
    digests = {role: entry.get("sha256") for role, entry in datasets.items()}
    return {"config": settings, "base_fingerprint": base_print, "data": digests}


def _resume_state(ctx: LoopContext, fingerprint: dict[str, Any]) -> tuple[TrainerState, int | None]:
    folder = latest_checkpoint(ctx.output)
    if folder is None:
        log.info("no checkpoint under %s: starting from step 0", ctx.output)
        return TrainerState(fingerprint=fingerprint), None
    saved = read_state(folder).fingerprint
    if saved != fingerprint:
        changed = [k for k in fingerprint if fingerprint[k] != saved.get(k)]
        raise InvalidArgumentError(
            f"cannot resume from {folder}: the run's {', '.join(changed)} changed since the checkpoint"
        )
    state = load_checkpoint(folder, ctx.model, ctx.optimizer, ctx.scheduler)
    log.info("resuming from %s (step %d)", folder, state.step)
    return state, state.step


def train(config: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Train an adapter as ``config`` says; with ``resume``, continue from the last checkpoint."""
    with cpu_threads(config.cpu_threads):
        return _train(config, resume)


def _train(config: TrainConfig, resume: bool) -> TrainResult:
    config.validate()
    output = Path(str(config.output))
    _check_output(output, resume)
    ref = resolve_base(config.base)
    device = pick_device(config)
    tokenizer = load_tokenizer(ref.path)
    splits = load_splits(config, tokenizer)
    base_print = base_fingerprint(ref.path)
    random.seed(config.seed)
    model, precision = build_model(config, ref.path, device)
    log.info("%s", precision.describe())
    if config.progress:
        print(f"loraswap train: {precision.describe()}", file=sys.stderr, flush=True)
    optimizer = make_optimizer(config, trainable_parameters(model))
    steps = total_steps(config, len(splits.train))
    ctx = LoopContext(
        config=config, model=model, optimizer=optimizer,
        scheduler=make_scheduler(optimizer, config.warmup_steps, steps),
        train=splits.train, eval=splits.eval, output=output, total_steps=steps,
        pad_id=tokenizer.pad_token_id, device=device,
    )  # fmt: skip
    fingerprint = _run_fingerprint(config, base_print, splits.datasets)
    state, resumed_from = (
        _resume_state(ctx, fingerprint) if resume else (TrainerState(fingerprint=fingerprint), None)
    )
    if splits.eval and resumed_from is None:
        state.initial_eval_loss = evaluate(model, splits.eval, config.micro_batch_size, ctx.pad_id, device)
    output.mkdir(parents=True, exist_ok=True)
    run_loop(ctx, state)
    eval_loss = (
        evaluate(model, splits.eval, config.micro_batch_size, ctx.pad_id, device) if splits.eval else None
    )
    save_adapter(model, output, ref.model_id)
    base = {"model_id": ref.model_id, "fingerprint": base_print}
    metadata = build_metadata(
        config=config,
        base=base,
        datasets=splits.datasets,
        state=state,
        eval_loss=eval_loss,
        device=str(device),
        precision=precision.name,
    )
    write_metadata(output, metadata)
    return TrainResult(output, ref, metadata, resumed_from, model, tokenizer)

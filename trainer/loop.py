"""The training loop: shuffled micro-batches, token-mean loss over gradient accumulation, clipping,
AdamW + linear schedule, periodic eval and checkpoints, progress on stderr (:class:`Progress`)."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loraswap.trainer.checkpoint import TrainerState, save_checkpoint
from loraswap.trainer.config import TrainConfig
from loraswap.trainer.encoding import IGNORE_INDEX, Example

log = logging.getLogger(__name__)


def total_steps(config: TrainConfig, num_examples: int) -> int:
    """Optimizer steps of the run: ``max_steps`` or ``num_epochs`` passes over the data."""
    if config.max_steps:
        return config.max_steps
    per_epoch = math.ceil(num_examples / config.micro_batch_size)
    return max(1, math.ceil(per_epoch * config.num_epochs / config.gradient_accumulation_steps))


def micro_batches(num_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless example indices, batch by batch; epoch ``e`` is a permutation seeded by ``seed + e``."""
    import torch

    epoch = 0
    while True:
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, num_examples, batch_size):
            yield order[start : start + batch_size]
        epoch += 1


def collate(examples: list[Example], pad_id: int, device) -> dict:
    """Right-padded tensors ``input_ids``, ``attention_mask``, ``labels`` of shape ``[batch, longest]``."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def loss_sum(model, batch: dict):
    """Summed next-token cross-entropy over the supervised tokens of ``batch`` (fp32).

    Logits are computed only from the first position whose next token any row supervises (the prompt
    prefix before it predicts nothing that counts): the same sum, without the vocabulary matmul (a fifth
    of a small model's compute) over the prompt positions. Models whose forward takes no
    ``logits_to_keep`` get every position's logits.
    """
    import torch
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]  # [batch, seq-1]: position p's logits predict token p + 1
    first = 0
    if _takes_logits_to_keep(model):
        supervised = (targets != IGNORE_INDEX).any(dim=0).nonzero()
        first = int(supervised[0]) if len(supervised) else targets.shape[1] - 1
        keep = {"logits_to_keep": torch.arange(first, targets.shape[1], device=targets.device)}
    else:
        keep = {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **keep)
    logits = out.logits[:, : targets.shape[1] - first].float()  # [batch, seq-1-first, vocab]
    targets = targets[:, first:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def _takes_logits_to_keep(model) -> bool:
    """Whether the (PEFT-wrapped) model's own forward accepts ``logits_to_keep``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes_logits_to_keep(type(inner))


@functools.cache
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    """Read once per model class, not on every micro-batch."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, device) -> float:
    """Mean token loss of ``model`` over ``examples``."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            total += loss_sum(model, collate(chunk, pad_id, device)).item()
            count += sum(e.supervised_tokens for e in chunk)
    model.train(was_training)
    return total / max(count, 1)


@dataclass
class LoopContext:
    """What the loop works on (built by ``loraswap.trainer.api.train``).

    Attributes:
        config: The run's configuration.
        model: The PEFT model.
        optimizer: Its optimizer.
        scheduler: Its learning-rate scheduler.
        train: Training examples.
        eval: Evaluation examples (may be empty).
        output: The run's output folder (checkpoints go under it).
        total_steps: Optimizer steps of the whole run.
        pad_id: Padding token id.
        device: The torch device.
    """

    config: TrainConfig
    model: object
    optimizer: object
    scheduler: object
    train: list[Example]
    eval: list[Example]
    output: Path
    total_steps: int
    pad_id: int
    device: object


def _optimizer_step(ctx: LoopContext, group: list[list[Example]], state: TrainerState) -> float:
    """Forward/backward every micro-batch of ``group``, then one clipped optimizer step; return the loss."""
    import torch

    params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
    supervised = max(1, sum(e.supervised_tokens for batch in group for e in batch))
    summed = 0.0
    for examples in group:
        batch = collate(examples, ctx.pad_id, ctx.device)
        loss = loss_sum(ctx.model, batch)
        (loss / supervised).backward()
        summed += loss.item()
        state.tokens += int(batch["attention_mask"].sum())
    if ctx.config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, ctx.config.max_grad_norm)
    ctx.optimizer.step()
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    state.supervised_tokens += supervised
    return summed / supervised


class Progress:
    """What a run shows on stderr with ``progress``: a tqdm bar on a terminal; elsewhere (a log, a pipe,
    ``make demo`` in CI) a plain line about every tenth of the run, so it is never minutes of silence.

    Args:
        total: Optimizer steps of the run.
        initial: Steps done before (a resumed run).
        enabled: ``progress`` of the run's config.
        stream: Where it writes (stderr).
    """

    def __init__(self, total: int, initial: int, enabled: bool, stream=None) -> None:
        from tqdm import tqdm

        self.stream = stream or sys.stderr
        self.total = total
        self.lines = enabled and not _is_terminal(self.stream)
        self.every = max(1, math.ceil(total / 10))
        self.bar = tqdm(total=total, initial=initial, file=self.stream, disable=not enabled or self.lines)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
        self.bar.update(1)
        if self.lines and (step % self.every == 0 or step == self.total):
            line = f"step {step}/{self.total}: loss {loss:.4f}, {tokens_per_s:.0f} tokens/s"
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        self.bar.close()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def run_loop(ctx: LoopContext, state: TrainerState) -> TrainerState:
    """Train from ``state.step`` to ``ctx.total_steps``; ``state`` is updated in place and returned."""
    cfg = ctx.config
    batches = micro_batches(len(ctx.train), cfg.micro_batch_size, cfg.seed)
    for _ in range(state.step * cfg.gradient_accumulation_steps):  # the batches done before a resume
        next(batches)
    bar = Progress(ctx.total_steps, state.step, cfg.progress)
    started, tokens_before, seconds_before = time.perf_counter(), state.tokens, state.seconds
    ctx.model.train()
    while state.step < ctx.total_steps:
        group = [[ctx.train[i] for i in next(batches)] for _ in range(cfg.gradient_accumulation_steps)]
        state.last_loss = _optimizer_step(ctx, group, state)
        state.step += 1
        state.history.append([state.step, round(state.last_loss, 6)])
        elapsed = time.perf_counter() - started
        state.seconds = seconds_before + elapsed
        rate = (state.tokens - tokens_before) / max(elapsed, 1e-9)
        bar.update(state.step, state.last_loss, rate)
        _periodic(ctx, state)
    bar.close()
    return state


def _periodic(ctx: LoopContext, state: TrainerState) -> None:
    cfg = ctx.config
    if cfg.eval_steps and ctx.eval and state.step % cfg.eval_steps == 0 and state.step < ctx.total_steps:
        loss = evaluate(ctx.model, ctx.eval, cfg.micro_batch_size, ctx.pad_id, ctx.device)
        log.info("step %d: eval loss %.4f", state.step, loss)
        state.eval_history.append([state.step, round(loss, 6)])
    if cfg.save_steps and state.step % cfg.save_steps == 0:
        path = save_checkpoint(ctx.output, ctx.model, ctx.optimizer, ctx.scheduler, state)
        log.info("step %d: checkpoint %s", state.step, path)

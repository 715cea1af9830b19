"""Picking the next token of every sequence of a step from its logits, in one batch.

:func:`sample_batch` is the engine's op. :func:`sample_token` is the per-row reference it is tested
against (same rules, one sequence at a time).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraswap.errors import InvalidArgumentError
from loraswap.server.engine.api import SamplingParams


class SamplerState:
    """One request's sampling state; the engine keeps it for the request's whole life.

    Args:
        params: The request's sampling parameters (validated here).
        prompt_ids: The prompt's token ids (kept by reference, not copied; read once, and only with a
            repetition penalty).

    Attributes:
        params: The request's sampling parameters.
        generator: The request's own CPU generator when it is seeded, else None (the device's default
            generator is used).
        seen: Only with a repetition penalty: a ``[vocab]`` bool mask of the token ids of the prompt and
            of the output so far, on the logits' device. Built from the prompt at the request's first
            sampling; :func:`sample_batch` marks each token it picks.

    Raises:
        InvalidArgumentError: ``params`` has invalid fields (every problem is listed).
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        problems = params.problems()
        if problems:
            raise InvalidArgumentError("invalid sampling parameters", problems)
        self.params = params
        self.generator = make_generator(params)
        self.seen: torch.Tensor | None = None
        self._prompt_ids = prompt_ids if self.penalized else ()

    @property
    def penalized(self) -> bool:
        """Whether the request has a repetition penalty."""
        return self.params.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        """Whether the request takes the most likely token (temperature 0)."""
        return self.params.temperature == 0.0

    def seen_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        """The ``[vocab]`` mask of seen ids on ``device`` (built from the prompt on first use)."""
        if self.seen is None:
            ids = torch.tensor(list(self._prompt_ids), dtype=torch.long)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise ValueError(f"prompt token ids must be in [0, {vocab}) (the logits' vocabulary)")
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[ids] = True
            self.seen = mask.to(device, non_blocking=True)
            self._prompt_ids = ()
        elif self.seen.shape[0] != vocab:
            raise ValueError(
                f"logits have {vocab} columns; this request's earlier ones had {self.seen.shape[0]}"
            )
        if self.seen.device != device:
            self.seen = self.seen.to(device, non_blocking=True)
        return self.seen


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A per-request CPU generator when the request is seeded (reproducible whatever the batch)."""
    if params.seed is None:
        return None
    return torch.Generator().manual_seed(int(params.seed))


def sample_batch(logits: torch.Tensor, states: Sequence[SamplerState]) -> list[int]:
    """The next token of every row, with one device-to-host transfer (the chosen ids).

    Greedy rows without a penalty take the argmax of the whole batch at once. The other rows are one
    sub-batch: repetition penalty (rows that ask for it), temperature, top-k, top-p, softmax, then
    ``argmax(probs / q)`` with ``q ~ Exp(1)``, which is how ``torch.multinomial`` draws one sample. A
    seeded row's ``q`` comes from its own CPU generator, so its tokens do not depend on the rest of the
    batch and equal :func:`sample_token`'s for the same seed and probabilities; other rows draw ``q`` on
    the device. Each penalized row's pick is marked in its state's ``seen`` mask.

    Args:
        logits: ``[batch, vocab]`` floating-point logits on any device; row ``i`` belongs to ``states[i]``.
        states: One :class:`SamplerState` per row.

    Returns:
        The chosen token id of every row, in order.

    Raises:
        ValueError: ``logits`` is not a floating-point ``[len(states), vocab]`` tensor.
    """
    tokens = _pick(logits, states).tolist()
    for state, token in zip(states, tokens, strict=True):
        if state.seen is not None:
            state.seen[token] = True
    return tokens


def _pick(logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
    """The chosen ids as a ``[batch]`` tensor on the logits' device (no device-to-host sync)."""
    if logits.dim() != 2 or logits.shape[0] != len(states) or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating-point [batch, vocab] tensor with one row per state; got "
            f"{logits.dtype} of shape {tuple(logits.shape)} for {len(states)} states"
        )
    worked = [i for i, s in enumerate(states) if s.penalized or not s.greedy]
    if worked and len(worked) == len(states):
        return _work_rows(logits.float(), list(states))
    ids = logits.argmax(dim=-1)
    if worked:
        index = _index(worked, logits.device)
        picked = _work_rows(logits.index_select(0, index).float(), [states[i] for i in worked])
        ids.index_copy_(0, index, picked)
    return ids


def _work_rows(x: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """Token ids (on the device) for rows that are penalized or sampled; ``x`` is ``[rows, vocab]`` fp32."""
    n, vocab = x.shape
    device = x.device
    penalized = [j for j, s in enumerate(states) if s.penalized]
    if penalized:
        mask = torch.stack([states[j].seen_mask(vocab, device) for j in penalized])
        penalty = _column([states[j].params.repetition_penalty for j in penalized], device)
        part = _select(x, penalized, device)
        part = torch.where(mask, torch.where(part > 0, part / penalty, part * penalty), part)
        x = _place(x, penalized, part, device)
    sampled = [j for j, s in enumerate(states) if not s.greedy]
    if not sampled:
        return x.argmax(dim=-1)
    rows = [states[j] for j in sampled]
    probs = torch.softmax(_filter(_select(x, sampled, device), rows), dim=-1)
    drawn = (probs / _exponentials(probs, rows)).argmax(dim=-1)
    if len(sampled) == n:
        return drawn
    return x.argmax(dim=-1).index_copy_(0, _index(sampled, device), drawn)


def _filter(x: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """Temperature, then top-k and top-p masking (to -inf), each only on the rows that ask for it."""
    device = x.device
    vocab = x.shape[-1]
    x = x / _column([s.params.temperature for s in states], device)
    top_k = [j for j, s in enumerate(states) if 0 < s.params.top_k < vocab]
    if top_k:
        ks = [states[j].params.top_k for j in top_k]
        part = _select(x, top_k, device)
        kth = torch.topk(part, max(ks)).values.gather(1, _index([k - 1 for k in ks], device).unsqueeze(1))
        x = _place(x, top_k, part.masked_fill(part < kth, float("-inf")), device)
    top_p = [j for j, s in enumerate(states) if s.params.top_p < 1.0]
    if top_p:
        part = _select(x, top_p, device)
        ordered, order = torch.sort(part, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= _column([states[j].params.top_p for j in top_p], device)
        part = part.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
        x = _place(x, top_p, part, device)
    return x


def _exponentials(probs: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """``Exp(1)`` noise shaped like ``probs``: a seeded row's from its generator (on the CPU, the way
    ``torch.multinomial`` draws it), the others' from the device's default generator."""
    seeded = [j for j, s in enumerate(states) if s.generator is not None]
    host = torch.empty(len(seeded), probs.shape[-1], dtype=probs.dtype)
    for row, j in enumerate(seeded):
        host[row].exponential_(1.0, generator=states[j].generator)
    if len(seeded) == len(states):
        return host.to(probs.device, non_blocking=True)
    q = torch.empty_like(probs).exponential_(1.0)
    if seeded:
        q.index_copy_(0, _index(seeded, probs.device), host.to(probs.device, non_blocking=True))
    return q


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True).unsqueeze(1)


def _select(x: torch.Tensor, rows: list[int], device: torch.device) -> torch.Tensor:
    return x if len(rows) == x.shape[0] else x.index_select(0, _index(rows, device))


def _place(x: torch.Tensor, rows: list[int], values: torch.Tensor, device: torch.device) -> torch.Tensor:
    return values if len(rows) == x.shape[0] else x.index_copy(0, _index(rows, device), values)


# -- the per-row reference ------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """CTRL / HF rule: a seen token's positive logit is divided by ``penalty``, a negative one multiplied."""
    if penalty == 1.0 or not seen:
        return logits
    index = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    picked = logits.index_select(0, index)
    logits = logits.clone()
    logits[index] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and outside the top-p nucleus."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_token(
    logits: torch.Tensor, params: SamplingParams, seen: list[int], generator: torch.Generator | None
) -> int:
    """Next token for one sequence; ``logits`` is ``[vocab]`` fp32 on any device (the reference)."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits.float().cpu(), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))

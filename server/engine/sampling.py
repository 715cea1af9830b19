"""Picking the next token of one sequence from its logits."""

from __future__ import annotations

import torch

from loraswap.server.engine.api import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A per-request CPU generator when the request is seeded (reproducible whatever the batch)."""
    if params.seed is None:
        return None
    return torch.Generator().manual_seed(int(params.seed))


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
    """Next token for one sequence; ``logits`` is ``[vocab]`` fp32 on any device."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits.float().cpu(), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))

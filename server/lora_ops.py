"""Batched multi-LoRA ops: ``y[t] += B[s_t] @ (A[s_t] @ x[t])`` for a per-token slot index ``s_t``.

Slot buffers are ``a: [slots, max_rank, in]`` and ``bt: [slots, max_rank, out]`` (B transposed, with
the LoRA scaling folded in). Ranks below ``max_rank`` are zero-padded, so every op may be told to use
only the first ``rank`` rows (the largest rank in the batch) and stay exact. A slot index < 0 means
"no adapter" for that token. Three implementations, equal up to rounding, compared by the tests:

- :func:`lora_reference`: a per-token loop, obviously right, slow.
- :func:`lora_bgmv`: gather each token's A/B and run two batched matmuls (best for decode: many
  tokens, each from a different adapter).
- :func:`lora_sgmv`: one pair of matmuls per run of consecutive tokens sharing a slot (best for
  prefill: long runs of one adapter).
"""

from __future__ import annotations

import torch


def lora_reference(
    x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor, rank: int | None = None
) -> torch.Tensor:
    """Delta ``[T, out]`` for ``x: [T, in]``, one token at a time (``rank`` is ignored: padding is 0)."""
    out = torch.zeros(x.shape[0], bt.shape[2], dtype=x.dtype, device=x.device)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            out[t] = bt[slot].T @ (a[slot] @ x[t])
    return out


def lora_bgmv(
    x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor, rank: int | None = None
) -> torch.Tensor:
    """Gather + bmm: delta ``[T, out]``; tokens with slot < 0 get zeros."""
    rank = rank or a.shape[1]
    index = slots.clamp(min=0)
    a_t = a[:, :rank].index_select(0, index)  # [T, r, in]
    bt_t = bt[:, :rank].index_select(0, index)  # [T, r, out]
    h = torch.bmm(a_t, x.unsqueeze(-1))  # [T, r, 1]
    delta = torch.bmm(h.transpose(1, 2), bt_t).squeeze(1)  # [T, out]
    return delta * (slots >= 0).unsqueeze(-1).to(delta.dtype)


def segments(slots: list[int]) -> list[tuple[int, int, int]]:
    """Runs of equal slot values: ``(start, end, slot)`` for each run whose slot is >= 0."""
    runs = []
    start = 0
    for t in range(1, len(slots) + 1):
        if t == len(slots) or slots[t] != slots[start]:
            if slots[start] >= 0:
                runs.append((start, t, slots[start]))
            start = t
    return runs


def lora_sgmv(
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    slots: torch.Tensor,
    rank: int | None = None,
    runs: list[tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """Segmented matmul: delta ``[T, out]``, one pair of matmuls per run of equal slots."""
    rank = rank or a.shape[1]
    if runs is None:
        runs = segments(slots.tolist())
    out = torch.zeros(x.shape[0], bt.shape[2], dtype=x.dtype, device=x.device)
    for start, end, slot in runs:
        h = x[start:end] @ a[slot, :rank].T  # [n, r]
        out[start:end] = h @ bt[slot, :rank]  # [n, out]
    return out

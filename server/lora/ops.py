"""Batched multi-LoRA ops: ``y[t] += B[s_t] @ (A[s_t] @ x[t])`` for a per-token slot index ``s_t``.

Each op is a :class:`LoraOp` with one ``apply`` (the layer calls it without knowing which op it got);
the functions below are their arithmetic, also called directly by tests.

Slot buffers are ``a: [slots, max_rank, in]`` and ``bt: [slots, max_rank, out]`` (B transposed, with
the LoRA scaling folded in). Ranks below ``max_rank`` are zero-padded, so every op may be told to use
only the first ``rank`` rows (the largest rank in the batch) and stay exact. A slot index < 0 means
"no adapter" for that token. Four implementations, equal up to rounding, compared by the tests:

- :func:`lora_reference`: a per-token loop, obviously right, slow.
- :func:`lora_bgmv`: gather each token's A/B and run two batched matmuls (best for decode: many
  tokens, each from a different adapter).
- :func:`lora_sgmv`: one pair of matmuls per run of consecutive tokens sharing a slot (best for
  prefill: long runs of one adapter).
- :func:`lora_grouped`: tokens scattered into a ``[slots, n, in]`` grid (n = most tokens of one slot),
  then two bmm over *views* of the slot buffers: no weight is copied (best for decode when the slots in
  use are dense).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loraswap.server.lora.context import LoraContext


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


def group_layout(slots: list[int]) -> tuple[int, int, int, list[int]] | None:
    """Grid layout for :func:`lora_grouped`: (first slot, slot count, n per slot, grid cell per token).

    Tokens without an adapter get cell -1. None when no token has an adapter.
    """
    used = [s for s in slots if s >= 0]
    if not used:
        return None
    first, count = min(used), max(used) - min(used) + 1
    seen: dict[int, int] = {}
    for s in used:
        seen[s] = seen.get(s, 0) + 1
    per_slot = max(seen.values())
    filled: dict[int, int] = {}
    cells = []
    for s in slots:
        if s < 0:
            cells.append(-1)
            continue
        k = filled.get(s, 0)
        filled[s] = k + 1
        cells.append((s - first) * per_slot + k)
    return first, count, per_slot, cells


def lora_grouped(
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    slots: torch.Tensor,
    rank: int | None = None,
    layout: tuple[int, int, int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Delta ``[T, out]`` by two bmm over the slot range ``[first, first + count)`` (views, no copies).

    ``layout`` is :func:`group_layout`'s result with the cells as a tensor; computed when omitted.
    """
    rank = rank or a.shape[1]
    if layout is None:
        found = group_layout(slots.tolist())
        if found is None:
            return torch.zeros(x.shape[0], bt.shape[2], dtype=x.dtype, device=x.device)
        layout = (*found[:3], torch.tensor(found[3], dtype=torch.long, device=x.device))
    first, count, per_slot, cells = layout
    active = cells >= 0
    grid = x.new_zeros(count * per_slot, x.shape[1])
    grid[cells[active]] = x[active]
    grid = grid.view(count, per_slot, x.shape[1])  # [S, n, in]
    h = torch.bmm(grid, a[first : first + count, :rank].transpose(1, 2))  # [S, n, r]
    out = torch.bmm(h, bt[first : first + count, :rank]).view(count * per_slot, -1)  # [S*n, out]
    delta = x.new_zeros(x.shape[0], bt.shape[2])
    delta[active] = out[cells[active]]
    return delta


class LoraOp:
    """Adds a batch's LoRA delta to a layer's base output.

    Attributes:
        name: The op's name in ``EngineConfig.lora_op``.
    """

    name = ""

    def apply(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, ctx: LoraContext
    ) -> torch.Tensor:
        """``y + delta`` for ``x: [T, in]`` (in the slot dtype), ``y: [..., out]`` the base output."""
        return _plus(y, self.delta(x, a, bt, ctx))

    def delta(self, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, ctx: LoraContext) -> torch.Tensor:
        raise NotImplementedError

    def apply_shared(
        self,
        ys: list[torch.Tensor],
        x: torch.Tensor,
        a: torch.Tensor,
        bts: list[torch.Tensor],
        targeted: list[bool],
        ctx: LoraContext,
    ) -> list[torch.Tensor] | None:
        """``ys[i] + delta_i`` for projections of the same ``x: [T, in]`` whose A slot buffers are one
        ``a: [slots, max_rank, P, in]`` (projection i's buffer is ``a[:, :, i]``), ``bts[i]`` their
        B^T buffers: one shrink for all of them, then each expand on its own output (projections not
        ``targeted`` are passed through). None where this op has no shared shrink: the caller then
        applies each projection's op alone."""
        return None


def _shared_rows(a: torch.Tensor, first: int, count: int, rank: int) -> torch.Tensor:
    """The first ``rank`` rows of every projection of slots ``[first, first + count)`` of a shared A
    buffer, as ``[count, rank * P, in]`` (rank-major, so a view for any ``rank``)."""
    return a[first : first + count, :rank].flatten(1, 2)


def _per_projection(h: torch.Tensor, rank: int, projections: int) -> torch.Tensor:
    """``h: [..., rank * P]`` (rank-major, from :func:`_shared_rows`) as ``[..., P, rank]``, contiguous."""
    return h.unflatten(-1, (rank, projections)).transpose(-1, -2).contiguous()


def _plus(y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return y + delta.reshape(y.shape).to(y.dtype)


class ReferenceOp(LoraOp):
    """:func:`lora_reference`: one token at a time (for tests)."""

    name = "reference"

    def delta(self, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, ctx: LoraContext) -> torch.Tensor:
        return lora_reference(x, a, bt, ctx.slots)


class GatherOp(LoraOp):
    """:func:`lora_bgmv`: gather each token's matrices, two batched matmuls."""

    name = "bgmv"

    def delta(self, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, ctx: LoraContext) -> torch.Tensor:
        return lora_bgmv(x, a, bt, ctx.slots, ctx.rank)

    def apply_shared(
        self,
        ys: list[torch.Tensor],
        x: torch.Tensor,
        a: torch.Tensor,
        bts: list[torch.Tensor],
        targeted: list[bool],
        ctx: LoraContext,
    ) -> list[torch.Tensor] | None:
        """One gather of every projection's A rows per token and one batched shrink, then
        :func:`lora_bgmv`'s expand per projection."""
        rank = ctx.rank or a.shape[1]
        index = ctx.slots.clamp(min=0)
        a_t = a[:, :rank].index_select(0, index).flatten(1, 2)  # [T, r*P, in]
        h = _per_projection(torch.bmm(a_t, x.unsqueeze(-1)).squeeze(-1), rank, a.shape[2])  # [T, P, r]
        keep = (ctx.slots >= 0).unsqueeze(-1)
        out = []
        for i, (y, bt, on) in enumerate(zip(ys, bts, targeted, strict=True)):
            if on:
                bt_t = bt[:, :rank].index_select(0, index)  # [T, r, out]
                delta = torch.bmm(h[:, i].unsqueeze(1), bt_t).squeeze(1)
                y = _plus(y, delta * keep.to(delta.dtype))
            out.append(y)
        return out


class SegmentedOp(LoraOp):
    """:func:`lora_sgmv`: one pair of matmuls per run of tokens sharing a slot."""

    name = "sgmv"

    def delta(self, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, ctx: LoraContext) -> torch.Tensor:
        return lora_sgmv(x, a, bt, ctx.slots, ctx.rank, ctx.runs)


class GroupedOp(LoraOp):
    """:func:`lora_grouped`: two bmm over views of the slot buffers; when the batch is its own grid
    (``ctx.in_place``) the delta is added into the output in place, with no scatter and no copy."""

    name = "grouped"

    def apply(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, ctx: LoraContext
    ) -> torch.Tensor:
        if not (ctx.in_place and y.dtype == bt.dtype):
            return super().apply(y, x, a, bt, ctx)
        first, count, per_slot, _ = ctx.layout
        rank = ctx.rank
        grid = x.view(count, per_slot, x.shape[-1])  # [S, n, in]
        h = torch.bmm(grid, a[first : first + count, :rank].transpose(1, 2))  # [S, n, r]
        y.view(count, per_slot, bt.shape[-1]).baddbmm_(h, bt[first : first + count, :rank])
        return y

    def delta(self, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, ctx: LoraContext) -> torch.Tensor:
        return lora_grouped(x, a, bt, ctx.slots, ctx.rank, ctx.layout)

    def apply_shared(
        self,
        ys: list[torch.Tensor],
        x: torch.Tensor,
        a: torch.Tensor,
        bts: list[torch.Tensor],
        targeted: list[bool],
        ctx: LoraContext,
    ) -> list[torch.Tensor] | None:
        """One grid of the tokens and one bmm shrink over every projection's slot views, then each
        projection's expand bmm (in place when the batch is its own grid, as :meth:`apply`)."""
        first, count, per_slot, cells = ctx.layout
        rank = ctx.rank or a.shape[1]
        if ctx.in_place:
            grid = x.view(count, per_slot, x.shape[-1])
            active = None
        else:
            active = cells >= 0
            grid = x.new_zeros(count * per_slot, x.shape[-1])
            grid[cells[active]] = x[active]
            grid = grid.view(count, per_slot, x.shape[-1])  # [S, n, in]
        h = torch.bmm(grid, _shared_rows(a, first, count, rank).transpose(1, 2))  # [S, n, r*P]
        h = _per_projection(h, rank, a.shape[2])  # [S, n, P, r]
        out = []
        for i, (y, bt, on) in enumerate(zip(ys, bts, targeted, strict=True)):
            if on:
                b = bt[first : first + count, :rank]
                if active is None and y.dtype == bt.dtype:
                    y.view(count, per_slot, bt.shape[-1]).baddbmm_(h[:, :, i], b)
                else:
                    expanded = torch.bmm(h[:, :, i], b).view(count * per_slot, -1)  # [S*n, out]
                    if active is not None:
                        delta = x.new_zeros(x.shape[0], bt.shape[2])
                        delta[active] = expanded[cells[active]]
                        expanded = delta
                    y = _plus(y, expanded)
            out.append(y)
        return out


REFERENCE, GATHER, SEGMENTED, GROUPED = ReferenceOp(), GatherOp(), SegmentedOp(), GroupedOp()
OPS: dict[str, LoraOp] = {op.name: op for op in (REFERENCE, GATHER, SEGMENTED, GROUPED)}
"""Every op by its ``EngineConfig.lora_op`` name."""

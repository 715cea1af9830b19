"""The per-step LoRA state every :class:`~loraswap.server.lora.layer.BatchedLoraLinear` reads, and the
choice of op for a batch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from loraswap.server.lora.ops import GATHER, GROUPED, OPS, SEGMENTED, LoraOp, group_layout, segments


@dataclass
class LoraContext:
    """What the current forward pass needs to know about adapters, shared by every LoRA layer.

    Attributes:
        slots: ``[T]`` slot index per token (-1 = base only), on the model's device.
        runs: Runs of equal slots, for the segmented op.
        rank: Rows of the slot buffers the ops read (the largest rank in the batch, or all rows).
        layout: Grid layout for the grouped op (first slot, slot count, tokens per slot, cells).
        in_place: The tokens already form the grouped op's grid (sorted by slot, every slot of the range
            with the same token count), so the grouped op adds its delta into the output in place.
        op: The op chosen for this batch (None: no token has an adapter).
        used: The slots the batch uses; a layer none of whose filled slots is among them skips LoRA.
        max_rank: Rows of the slot buffers (0 = unknown). When the batch's rank is at least half of it,
            the ops read all rows: a rank slice below the buffer size makes the slot views
            non-contiguous, and bmm then copies them (``bench/RESULTS.md``, "full slot rank").
    """

    slots: torch.Tensor | None = None
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    rank: int = 0
    layout: tuple[int, int, int, torch.Tensor] | None = None
    in_place: bool = False
    op: LoraOp | None = None
    used: frozenset[int] = frozenset()
    max_rank: int = 0

    def set_batch(self, slot_list: list[int], ranks: dict[int, int], device: torch.device, mode: str) -> None:
        """Prepare for a forward over tokens whose slots are ``slot_list`` (``mode``: see ``choose_op``)."""
        self.slots = torch.tensor(slot_list, dtype=torch.long, device=device)
        self.runs = segments(slot_list)
        self.used = frozenset(s for s in slot_list if s >= 0)
        rank = max((ranks[s] for s in self.used), default=0)
        self.rank = self.max_rank if rank and 2 * rank >= self.max_rank > 0 else rank
        found = group_layout(slot_list)
        grid_cells = found[1] * found[2] if found else 0
        self.layout = None
        if found:
            self.layout = (*found[:3], torch.tensor(found[3], dtype=torch.long, device=device))
        self.op = choose_op(mode, len(slot_list), len(self.runs), grid_cells)
        self.in_place = bool(
            found
            and mode == "auto"
            and self.op is GROUPED
            and grid_cells == len(slot_list)
            and found[3] == list(range(len(slot_list)))
        )

    def snapshot(self) -> LoraContext:
        """A copy of the current batch state (a forward nested between layers restores it after)."""
        return dataclasses.replace(self)

    def restore(self, saved: LoraContext) -> None:
        """Put back a :meth:`snapshot` (after a forward, the state from before it)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(saved, f.name))


def choose_op(mode: str, num_tokens: int, num_runs: int, grid_cells: int) -> LoraOp | None:
    """Pick the LoRA op for a batch (None when no token has an adapter).

    ``mode`` names an op of :data:`~loraswap.server.lora.ops.OPS`, or is ``auto``: the grouped op when
    its slot grid is dense (at most twice the tokens: decode over a compact slot range, or one
    adapter), else segmented matmuls when runs are long (prefill), else gather+bmm.
    """
    if num_runs == 0:
        return None
    if mode in OPS:
        return OPS[mode]
    if grid_cells <= 2 * num_tokens:
        return GROUPED
    return SEGMENTED if num_tokens >= 4 * num_runs else GATHER

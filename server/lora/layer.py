"""The batched LoRA linear layer and the per-step context all such layers read.

Each targeted projection of the base is wrapped once, at start-up, by :class:`BatchedLoraLinear`,
which owns slot buffers allocated once. Activating an adapter copies its matrices into a slot;
the base layer itself is never modified (no ``state_dict()``, no weight edits: safe on a quantized
base).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from loraswap.adapter_format import SUPPORTED_TARGETS
from loraswap.server.adapters.safetensors_buffer import tensor_bits
from loraswap.server.lora.ops import (
    group_layout,
    lora_bgmv,
    lora_grouped,
    lora_reference,
    lora_sgmv,
    segments,
)


@dataclass
class LoraContext:
    """What the current forward pass needs to know about adapters, shared by every LoRA layer.

    Attributes:
        slots: ``[T]`` slot index per token (-1 = base only), on the model's device.
        runs: Runs of equal slots, for the segmented op.
        rank: Largest rank among the slots in use (ops skip zero padding past it).
        layout: Grid layout for the grouped op (first slot, slot count, tokens per slot, cells).
        in_place: The tokens already form the grouped op's grid (sorted by slot, every slot of the range
            with the same token count), so LoRA layers add their delta into the output in place.
        op: The op chosen for this batch.
        used: The slots the batch uses; a layer none of whose filled slots is among them skips LoRA.
        max_rank: Rows of the slot buffers (0 = unknown). When the batch's rank is at least half of it,
            the ops run all rows: a rank slice below the buffer size makes the slot views
            non-contiguous, and bmm then copies them (measured on CPU: slower than reading the zero
            padding, up to 2x the rank needed).
    """

    slots: torch.Tensor | None = None
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    rank: int = 0
    layout: tuple[int, int, int, torch.Tensor] | None = None
    in_place: bool = False
    op: Callable[..., torch.Tensor] | None = None
    used: frozenset[int] = frozenset()
    max_rank: int = 0

    def set_batch(self, slot_list: list[int], ranks: dict[int, int], device: torch.device, mode: str) -> None:
        """Prepare for a forward over tokens whose slots are ``slot_list``."""
        self.slots = torch.tensor(slot_list, dtype=torch.long, device=device)
        self.runs = segments(slot_list)
        self.used = frozenset(s for s in slot_list if s >= 0)
        rank = max((ranks[s] for s in set(slot_list) if s >= 0), default=0)
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
            and self.op is lora_grouped
            and found[1] * found[2] == len(slot_list)
            and found[3] == list(range(len(slot_list)))
        )

    def snapshot(self) -> LoraContext:
        """A copy of the current batch state (a forward nested between layers restores it after)."""
        return dataclasses.replace(self)

    def restore(self, saved: LoraContext) -> None:
        """Put back a :meth:`snapshot` (after a forward, the state from before it)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(saved, f.name))


def choose_op(
    mode: str, num_tokens: int, num_runs: int, grid_cells: int
) -> Callable[..., torch.Tensor] | None:
    """Pick the LoRA op for a batch (None when no token has an adapter).

    ``auto``: the grouped op when its slot grid is dense (at most twice the tokens: decode over a compact
    slot range, or one adapter), else segmented matmuls when runs are long (prefill), else gather+bmm.
    """
    if num_runs == 0:
        return None
    fixed = {"reference": lora_reference, "bgmv": lora_bgmv, "sgmv": lora_sgmv, "grouped": lora_grouped}
    if mode in fixed:
        return fixed[mode]
    if grid_cells <= 2 * num_tokens:
        return lora_grouped
    return lora_sgmv if num_tokens >= 4 * num_runs else lora_bgmv


class BatchedLoraLinear(nn.Module):
    """``base(x) + B[s] A[s] x`` per token, for up to ``num_slots`` adapters at once.

    Args:
        base: The wrapped projection (``nn.Linear`` or a bitsandbytes quantized linear); not modified.
        num_slots: Adapter slots.
        max_rank: Rank the buffers are sized for.
        context: The shared per-step context.
        dtype: Dtype of the slot buffers (the compute dtype).
    """

    def __init__(
        self, base: nn.Module, num_slots: int, max_rank: int, context: LoraContext, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)
        self.context = context
        device = _module_device(base)
        self.register_buffer(
            "a", torch.zeros(num_slots, max_rank, self.in_features, dtype=dtype, device=device)
        )
        self.register_buffer(
            "bt", torch.zeros(num_slots, max_rank, self.out_features, dtype=dtype, device=device)
        )
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        self.filled: dict[int, int] = {}  # slot -> rows holding weights; rows past it (and other slots) are 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self.context
        if ctx.op is None or ctx.used.isdisjoint(self.filled):
            return y  # no adapter of this batch targets this layer
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(self.a.dtype)  # [T, in]
        if ctx.in_place and y.dtype == self.bt.dtype:
            return self._add_grouped_in_place(flat, y)
        if ctx.op is lora_sgmv:
            delta = lora_sgmv(flat, self.a, self.bt, ctx.slots, ctx.rank, ctx.runs)
        elif ctx.op is lora_grouped:
            delta = lora_grouped(flat, self.a, self.bt, ctx.slots, ctx.rank, ctx.layout)
        else:
            delta = ctx.op(flat, self.a, self.bt, ctx.slots, ctx.rank)
        return y + delta.reshape(*shape[:-1], self.out_features).to(y.dtype)

    def _add_grouped_in_place(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y += delta`` for a batch that is its own grouped grid: two bmm, no scatter, no copy."""
        first, count, per_slot, _ = self.context.layout
        rank = self.context.rank
        grid = x.view(count, per_slot, x.shape[-1])  # [S, n, in]
        h = torch.bmm(grid, self.a[first : first + count, :rank].transpose(1, 2))  # [S, n, r]
        y.view(count, per_slot, self.out_features).baddbmm_(h, self.bt[first : first + count, :rank])
        return y

    def load_slot(
        self, slot: int, a: torch.Tensor | None, bt: torch.Tensor | None, scale: float = 1.0
    ) -> None:
        """Copy ``a: [r, in]`` and ``scale * bt`` (``bt: [r, out]``) into ``slot``; None clears it."""
        fill_slot(slot, [(self, a, bt, scale)])

    def slot_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Numpy views of the CPU slot buffers' bits (made once), for :func:`fill_slot_bits`."""
        if self._arrays is None:
            self._arrays = (tensor_bits(self.a), tensor_bits(self.bt))
        return self._arrays

    def slot_bytes(self) -> int:
        return (self.a[0].numel() + self.bt[0].numel()) * self.a.element_size()


SlotPart = tuple[BatchedLoraLinear, torch.Tensor | None, torch.Tensor | None, float]


@torch.no_grad()
def fill_slot(slot: int, parts: list[SlotPart]) -> None:
    """Load one adapter into ``slot`` of many layers: ``(layer, a: [r, in], bt: [r, out], scale)`` per
    layer, the slot getting ``scale * bt``; None matrices clear it. Only rows that held weights are
    zeroed, so layers the adapter leaves alone cost nothing.

    Between CPU tensors of one dtype the copies go through numpy views of the bits (about 1 us of
    overhead per copy against about 10 us for a torch ``copy_`` plus the slicing: it dominated the 420
    small copies of an all-projection adapter); otherwise torch copies.
    """
    if all(_bitwise_on_cpu(layer, a, bt) for layer, a, bt, _ in parts):
        fill_slot_bits(slot, [(layer, _maybe_bits(a), _maybe_bits(bt), s) for layer, a, bt, s in parts])
        return
    stale: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    scaled: dict[float, list[torch.Tensor]] = {}
    for layer, a, bt, scale in parts:
        old = layer.filled.pop(slot, 0)
        rank = a.shape[0] if a is not None and bt is not None else 0
        if old > rank:
            stale += [layer.a[slot, rank:old], layer.bt[slot, rank:old]]
        if rank:
            targets += [layer.a[slot, :rank], layer.bt[slot, :rank]]
            sources += [a, bt]
            if scale != 1.0:
                scaled.setdefault(scale, []).append(targets[-1])
            layer.filled[slot] = rank
    if stale:
        torch._foreach_zero_(stale)
    if targets and targets[0].device != sources[0].device:  # host -> accelerator
        sources = staged(sources, lambda host: host.to(targets[0].device, non_blocking=True)) or sources
    if targets and all(t.device == s.device for t, s in zip(targets, sources, strict=True)):
        torch._foreach_copy_(targets, sources)
    else:
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source, non_blocking=True)
    _scale_all(scaled)


def staged(
    sources: list[torch.Tensor], transfer: Callable[[torch.Tensor], torch.Tensor]
) -> list[torch.Tensor] | None:
    """``sources`` as views of one ``transfer`` of the host storage they all view (one host-to-device
    copy of an adapter instead of one per matrix, then one device-side ``_foreach_copy_``); None when
    they do not share a storage.

    ``transfer`` maps the whole storage, as a 1-D uint8 tensor, to its copy (``.to(device)``).
    """
    storage = sources[0].untyped_storage()
    if any(s.untyped_storage().data_ptr() != storage.data_ptr() for s in sources):
        return None
    copy = transfer(torch.empty(0, dtype=torch.uint8, device=sources[0].device).set_(storage))
    typed: dict[torch.dtype, torch.Tensor] = {}
    views = []
    for source in sources:
        size = source.element_size()
        if source.dtype not in typed:
            typed[source.dtype] = copy[: copy.numel() // size * size].view(source.dtype)
        views.append(typed[source.dtype].as_strided(source.shape, source.stride(), source.storage_offset()))
    return views


def _bitwise_on_cpu(layer: BatchedLoraLinear, a: torch.Tensor | None, bt: torch.Tensor | None) -> bool:
    if layer.a.device.type != "cpu":
        return False
    return a is None or (a.device.type == bt.device.type == "cpu" and a.dtype == bt.dtype == layer.a.dtype)


BitsPart = tuple[BatchedLoraLinear, np.ndarray | None, np.ndarray | None, float]


@torch.no_grad()
def fill_slot_bits(slot: int, parts: list[BitsPart]) -> None:
    """:func:`fill_slot` for CPU slot buffers, from numpy views of the matrices' bits in the slot
    dtype (``HostAdapter.cpu_bits``): one ``copyto`` per matrix, about 1 us of overhead each, then
    one ``_foreach_mul_`` per distinct scaling over the copies of B^T."""
    scaled: dict[float, list[torch.Tensor]] = {}
    for layer, a, bt, scale in parts:
        slot_a, slot_bt = layer.slot_arrays()
        old = layer.filled.pop(slot, 0)
        rank = a.shape[0] if a is not None and bt is not None else 0
        if old > rank:
            slot_a[slot, rank:old] = 0
            slot_bt[slot, rank:old] = 0
        if rank:
            np.copyto(slot_a[slot, :rank], a)
            np.copyto(slot_bt[slot, :rank], bt)
            if scale != 1.0:
                scaled.setdefault(scale, []).append(layer.bt[slot, :rank])
            layer.filled[slot] = rank
    _scale_all(scaled)


def _scale_all(scaled: dict[float, list[torch.Tensor]]) -> None:
    for scale, tensors in scaled.items():
        torch._foreach_mul_(tensors, scale)


def _maybe_bits(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else tensor_bits(t)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def install_lora_layers(
    model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype
) -> tuple[LoraContext, dict[str, BatchedLoraLinear]]:
    """Wrap every supported projection of ``model`` in place; return the context and the layers by name
    (names as PEFT writes them, e.g. ``model.layers.0.self_attn.q_proj``)."""
    context = LoraContext(max_rank=max_rank)
    layers: dict[str, BatchedLoraLinear] = {}
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in SUPPORTED_TARGETS and hasattr(module, "in_features")
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        wrapped = BatchedLoraLinear(module, num_slots, max_rank, context, dtype)
        setattr(model.get_submodule(parent_name), child, wrapped)
        layers[name] = wrapped
    return context, layers

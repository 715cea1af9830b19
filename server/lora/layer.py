"""The batched LoRA linear layer: it owns its slot buffers and how they are filled.

Each targeted projection of the base is wrapped once, at start-up, by :class:`BatchedLoraLinear`,
which owns slot buffers allocated once. Activating an adapter copies its matrices into a slot
(:meth:`BatchedLoraLinear.set_slot` for one layer, :func:`fill_slot` for all layers of an adapter at
once); the base layer itself is never modified (no ``state_dict()``, no weight edits: safe on a
quantized base).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from loraswap.adapter_format import SUPPORTED_TARGETS
from loraswap.server.lora.bits import tensor_bits
from loraswap.server.lora.context import LoraContext


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
        return self.add_delta(self.base(x), x)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` (this projection's base output for ``x``, however it was computed: alone, or as a slice
        of a fused projection) plus the batch's LoRA deltas of this layer."""
        ctx = self.context
        if ctx.op is None or ctx.used.isdisjoint(self.filled):
            return y  # no adapter of this batch targets this layer
        flat = x.reshape(-1, x.shape[-1]).to(self.a.dtype)  # [T, in]
        return ctx.op.apply(y, flat, self.a, self.bt, ctx)

    def set_slot(self, slot: int, a: torch.Tensor, bt: torch.Tensor, scale: float = 1.0) -> None:
        """Copy ``a: [r, in]`` and ``scale * bt`` (``bt: [r, out]``) into ``slot``."""
        fill_slot(slot, [(self, a, bt, scale)])

    def reset_slot(self, slot: int) -> None:
        """Zero the rows of ``slot`` that held weights (this layer then skips batches using only it)."""
        fill_slot(slot, [(self, None, None, 1.0)])

    def slot_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Numpy views of the CPU slot buffers' bits (made once), for :func:`fill_slot_bits`."""
        if self._arrays is None:
            self._arrays = (tensor_bits(self.a), tensor_bits(self.bt))
        return self._arrays

    def slot_bytes(self) -> int:
        return (self.a[0].numel() + self.bt[0].numel()) * self.a.element_size()


class SharedShrink:
    """The LoRA layers of projections that read the same input (a fused q/k/v or gate/up group), with
    one shrink for all of them: their A slot buffers become views of one buffer
    ``[slots, max_rank, P, in]`` (layer i's ``a`` is ``shared[:, :, i]``), so the batch's ``A x`` of every
    projection is one matmul; each projection's expand then runs on its own output
    (:meth:`~loraswap.server.lora.ops.LoraOp.apply_shared`).

    The layers keep their ``a`` (a view, filled by :func:`fill_slot` as before) and their contents;
    nothing is stored twice. Ops without a shared shrink, and batches that target fewer than two of the
    projections, run each projection's :meth:`BatchedLoraLinear.add_delta` (the reference path).

    Args:
        layers: The projections' LoRA layers (same context, slots, rank, input size, dtype, device).
    """

    def __init__(self, layers: list[BatchedLoraLinear]) -> None:
        if not shareable(layers):
            raise ValueError("the layers do not share one input and one slot layout")
        slots, rank, in_features = layers[0].a.shape
        self.a = layers[0].a.new_zeros(slots, rank, len(layers), in_features)
        for i, layer in enumerate(layers):
            self.a[:, :, i].copy_(layer.a)
            layer.a = self.a[:, :, i]
            layer._arrays = None  # numpy views of the old buffer
        self.layers = layers
        self.context = layers[0].context

    def add_deltas(self, ys: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        """``ys`` (the projections' base outputs for ``x``) plus the batch's LoRA deltas of each."""
        ctx = self.context
        targeted = [ctx.op is not None and not ctx.used.isdisjoint(layer.filled) for layer in self.layers]
        if sum(targeted) >= 2:
            flat = x.reshape(-1, x.shape[-1]).to(self.a.dtype)
            bts = [layer.bt for layer in self.layers]
            out = ctx.op.apply_shared(ys, flat, self.a, bts, targeted, ctx)
            if out is not None:
                return out
        return [layer.add_delta(y, x) for layer, y in zip(self.layers, ys, strict=True)]


def shareable(layers: list[nn.Module]) -> bool:
    """Whether ``layers`` are LoRA layers that a :class:`SharedShrink` can join."""
    if len(layers) < 2 or not all(isinstance(layer, BatchedLoraLinear) for layer in layers):
        return False
    first = layers[0]
    return all(
        layer.context is first.context
        and layer.a.shape == first.a.shape
        and layer.a.dtype == first.a.dtype
        and layer.a.device == first.a.device
        for layer in layers
    )


SlotPart = tuple[BatchedLoraLinear, torch.Tensor | None, torch.Tensor | None, float]


@torch.no_grad()
def fill_slot(slot: int, parts: list[SlotPart]) -> None:
    """Load one adapter into ``slot`` of many layers: ``(layer, a: [r, in], bt: [r, out], scale)`` per
    layer, the slot getting ``scale * bt``; None matrices clear it. Only rows that held weights are
    zeroed, so layers the adapter leaves alone cost nothing.

    Between CPU tensors of one dtype the copies go through numpy views of the bits, whose per-copy
    overhead is a fraction of a torch ``copy_`` plus its slicing (the bench's "slot fill" A/B measures
    both paths side by side); otherwise torch copies.
    """
    if all(_bitwise_on_cpu(layer, a, bt) for layer, a, bt, _ in parts):
        fill_slot_bits(slot, [(layer, _maybe_bits(a), _maybe_bits(bt), s) for layer, a, bt, s in parts])
    else:
        fill_slot_torch(slot, parts)


@torch.no_grad()
def fill_slot_torch(slot: int, parts: list[SlotPart]) -> None:
    """:func:`fill_slot` with torch copies, for any devices and dtypes (one transfer of the adapter's
    host storage into accelerator slots, see :func:`staged`)."""
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
    dtype (``HostAdapter.cpu_bits``): one ``copyto`` per matrix, then one ``_foreach_mul_`` per
    distinct scaling over the copies of B^T."""
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

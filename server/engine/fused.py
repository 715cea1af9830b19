"""Fused base projections: q/k/v as one matmul and gate/up as one, over the same weights.

A decode step on a small model is many small matmuls; three projections that read the same input are one
larger matmul. The fused weight is one tensor, held once, and every projection stays a callable layer
with its own ``in_features``/``out_features``. LoRA deltas are added per projection on the slices of the
fused output (:meth:`~loraswap.server.lora.layer.BatchedLoraLinear.add_delta`); where every projection
of a group is LoRA-wrapped, their shrinks ``A x`` are one matmul too
(:class:`~loraswap.server.lora.layer.SharedShrink`).

Two forms of the fused weight:

- plain (``pack_weights=false``, or where packing is not supported): each projection's weight becomes a
  view of its rows of the fused tensor, so every other user of the projections (a LoRA wrapper,
  PEFT-style code, ``state_dict``) still sees its own weight;
- packed (:mod:`~loraswap.server.engine.packed`, CPU): the fused weight is one oneDNN-packed tensor,
  registered on the layer's attention or MLP module (``qkv_proj``, ``gate_up_proj``), and each
  projection's base is replaced by a :class:`FusedSlice` that holds no weight.

Only plain ``nn.Linear`` bases without bias are fused (a bitsandbytes quantized layer is a subclass with
its own packed storage and is left alone); the unfused path stays beside it as the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from loraswap.server.engine.packed import PackedLinear, packed_linear, packing_supported
from loraswap.server.lora.layer import SharedShrink, shareable


def base_linear(module: nn.Module) -> nn.Module:
    """The projection's own linear layer (a LoRA wrapper's ``base``, or the module itself)."""
    return getattr(module, "base", module)


def fusable(modules: Sequence[nn.Module]) -> bool:
    bases = [base_linear(m) for m in modules]
    return (
        all(type(b) is nn.Linear and b.bias is None and b.weight.dtype.is_floating_point for b in bases)
        and len({(b.in_features, b.weight.dtype, b.weight.device) for b in bases}) == 1
    )


class FusedProjection:
    """Several projections of one input as one matmul, each then getting its own LoRA delta.

    Args:
        parent: The module holding the projections (a layer's ``self_attn`` or ``mlp``).
        names: The projections' attribute names on ``parent`` (plain ``nn.Linear`` or LoRA wrappers
            around one, see :func:`fusable`), in output order.
        packed_name: With ``batch_hint``: the attribute of ``parent`` the packed fused layer is
            registered as (so it is among the model's buffers, once).
        batch_hint: Pack the fused weight for about this many input rows (where packing is supported);
            None keeps it plain, each projection's weight a view of it.

    Attributes:
        weight: The plain fused weight (None when packed).
        linear: The packed fused layer (None when plain).
        sizes: Each projection's output width.
        shared: The group's one LoRA shrink, where every projection is LoRA-wrapped (else None).
    """

    def __init__(
        self, parent: nn.Module, names: Sequence[str], packed_name: str, batch_hint: int | None = None
    ) -> None:
        modules = [getattr(parent, name) for name in names]
        bases = [base_linear(m) for m in modules]
        fused = torch.cat([b.weight.detach() for b in bases], dim=0)
        self.in_features = int(fused.shape[1])
        self.sizes = [int(b.out_features) for b in bases]
        self.lora = [m if hasattr(m, "add_delta") else None for m in modules]
        # One LoRA shrink for the group where every projection is LoRA-wrapped (server/lora/layer.py).
        self.shared = SharedShrink(self.lora) if shareable(self.lora) else None
        self.weight: torch.Tensor | None = None
        self.linear: PackedLinear | None = None
        if batch_hint is not None and packing_supported(fused.dtype, fused.device):
            self.linear = PackedLinear(fused, batch_hint=batch_hint)
            del fused  # the packed copy is the only one; the plain bases go below
            setattr(parent, packed_name, self.linear)
            for index, (name, module) in enumerate(zip(names, modules, strict=True)):
                piece = FusedSlice(self, index)
                if module is bases[index]:
                    setattr(parent, name, piece)
                else:
                    module.base = piece
            return
        self.weight = fused
        start = 0
        for base, size in zip(bases, self.sizes, strict=True):
            base.weight = nn.Parameter(fused[start : start + size], requires_grad=False)
            start += size

    def base_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each projection's base output for ``x`` (slices of one matmul's output)."""
        if self.linear is not None:
            out = packed_linear(x, self.linear.packed)
        else:
            out = torch.nn.functional.linear(x, self.weight)
        return out.split(self.sizes, dim=-1)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.shared is not None:
            return self.shared.add_deltas(list(self.base_outputs(x)), x)
        pairs = zip(self.base_outputs(x), self.lora, strict=True)
        return [y if layer is None else layer.add_delta(y, x) for y, layer in pairs]


class FusedSlice(nn.Module):
    """One projection's base in a packed fused group: its slice of the group's output. It holds no
    weight (the group's packed layer, registered on the parent module, is the one copy).

    Args:
        group: The fused group.
        index: The projection's place in it.
    """

    def __init__(self, group: FusedProjection, index: int) -> None:
        super().__init__()
        self.group = group  # a plain object, not a submodule
        self.index = index
        self.in_features = group.in_features
        self.out_features = group.sizes[index]
        self.start = sum(group.sizes[:index])

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of this projection's weight (``[out, in]``), made on every read."""
        return self.group.linear.weight[self.start : self.start + self.out_features].clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This projection's base output alone (the whole group's matmul, then its slice: the packed
        forward calls the group once instead)."""
        return self.group.base_outputs(x)[self.index]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, index={self.index}"


def fuse_layer(
    layer: nn.Module, batch_hint: int | None = None
) -> tuple[FusedProjection | None, FusedProjection | None]:
    """The fused q/k/v and gate/up of one decoder layer (None where they cannot be fused); packed for
    about ``batch_hint`` rows where supported, plain when it is None."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = ("q_proj", "k_proj", "v_proj")
    gate_up = ("gate_proj", "up_proj")
    fused_qkv = None
    if fusable([getattr(attn, name) for name in qkv]):
        fused_qkv = FusedProjection(attn, qkv, "qkv_proj", batch_hint)
    fused_gate_up = None
    plain_mlp = all(hasattr(mlp, name) for name in (*gate_up, "act_fn", "down_proj"))
    if plain_mlp and fusable([getattr(mlp, name) for name in gate_up]):
        fused_gate_up = FusedProjection(mlp, gate_up, "gate_up_proj", batch_hint)
    return fused_qkv, fused_gate_up

"""Fused base projections: q/k/v as one matmul and gate/up as one, over the same weights.

A decode step on a small model is many small matmuls; three projections that read the same input are one
larger matmul. The fused weight is one tensor and each projection's weight becomes a view of its rows,
so nothing is stored twice, and every other user of the projections (a LoRA wrapper, PEFT-style code,
``state_dict``) still sees its own weight. LoRA deltas are added per projection on the slices of the
fused output (:meth:`~loraswap.server.lora.layer.BatchedLoraLinear.add_delta`).

Only plain ``nn.Linear`` bases without bias are fused (a bitsandbytes quantized layer is a subclass with
its own packed storage and is left alone); the unfused path stays beside it as the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


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
        modules: The projections (plain ``nn.Linear`` or LoRA wrappers around one), in output order.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        bases = [base_linear(m) for m in modules]
        self.weight = torch.cat([b.weight.detach() for b in bases], dim=0)
        self.sizes = [b.out_features for b in bases]
        start = 0
        for base, size in zip(bases, self.sizes, strict=True):
            base.weight = nn.Parameter(self.weight[start : start + size], requires_grad=False)
            start += size
        self.lora = [m if hasattr(m, "add_delta") else None for m in modules]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = torch.nn.functional.linear(x, self.weight).split(self.sizes, dim=-1)
        pairs = zip(out, self.lora, strict=True)
        return [y if layer is None else layer.add_delta(y, x) for y, layer in pairs]


def fuse_layer(layer: nn.Module) -> tuple[FusedProjection | None, FusedProjection | None]:
    """The fused q/k/v and gate/up of one decoder layer (None where they cannot be fused)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    gate_up = (getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None))
    fused_qkv = FusedProjection(qkv) if fusable(qkv) else None
    plain_mlp = None not in gate_up and hasattr(mlp, "act_fn") and hasattr(mlp, "down_proj")
    fused_gate_up = FusedProjection(gate_up) if plain_mlp and fusable(gate_up) else None
    return fused_qkv, fused_gate_up

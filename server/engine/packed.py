"""Prepacked (oneDNN) weights for the CPU linear layers of the packed forward.

On CPU, ``F.linear`` hands its weight to oneDNN's matmul, which reorders it into its blocked layout on
every call. Reordering each weight once, at start-up, and calling the matmul on the packed weight does
the same arithmetic without that copy per call (what inductor's freezing pass does on CPU). A packed
weight is an opaque mkldnn-layout tensor (``is_mkldnn``; ``to_dense()`` gives a plain copy back); it
accepts inputs of any leading shape and any number of tokens, whatever batch size it was packed for.

:class:`PackedLinear` replaces a plain ``nn.Linear`` and holds only the packed weight (registered as a
buffer, so it counts among the model's buffers and goes with the model). The reference beside the fast
op is :func:`reference_linear`: ``F.linear`` on the plain weight, what ``pack_weights=false`` runs.
Packing is for CPU bf16 (where oneDNN supports it) and fp32 weights; other devices and dtypes, and
bitsandbytes quantized layers (subclasses of ``nn.Linear`` with their own storage), are left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether weights of ``dtype`` on ``device`` can be packed: CPU, oneDNN built in with its linear
    ops, and fp32 or (where the CPU supports it) bf16."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not all(hasattr(ops, op) for op in ("_reorder_linear_weight", "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return bool(ops._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def packable(module: nn.Module) -> bool:
    """Whether ``module`` is a plain ``nn.Linear`` (not a subclass) whose weight can be packed."""
    return type(module) is nn.Linear and packing_supported(module.weight.dtype, module.weight.device)


def pack(weight: torch.Tensor, batch_hint: int) -> torch.Tensor:
    """``weight: [out, in]`` reordered once into oneDNN's layout for about ``batch_hint`` input rows
    (any number of rows works); an opaque mkldnn tensor of the same shape and dtype."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), max(1, batch_hint))


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x: [..., in]`` in the weight's dtype, ``packed`` from :func:`pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`packed_linear` on the plain weight: ``F.linear``, the path without packing."""
    return F.linear(x, weight, bias)


class PackedLinear(nn.Module):
    """A linear layer over a packed weight (see the module docstring); replaces an ``nn.Linear``.

    Args:
        weight: ``[out, in]``, CPU, in a dtype :func:`packing_supported` accepts; not kept.
        bias: ``[out]`` in the weight's dtype, or None.
        batch_hint: Input rows the packed layout is chosen for (any number works).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, batch_hint: int = 1) -> None:
        super().__init__()
        if not packing_supported(weight.dtype, weight.device):
            raise ValueError(f"cannot pack a {weight.dtype} weight on {weight.device}")
        if bias is not None and (bias.dtype != weight.dtype or bias.shape != weight.shape[:1]):
            shapes = f"{tuple(bias.shape)} {bias.dtype}, weight {tuple(weight.shape)} {weight.dtype}"
            raise ValueError(f"the bias does not fit the weight: bias {shapes}")
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        self.register_buffer("packed", pack(weight, batch_hint))
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())

    @classmethod
    def replacing(cls, linear: nn.Module, batch_hint: int) -> PackedLinear:
        """The packed layer to put in place of ``linear`` (a :func:`packable` ``nn.Linear``)."""
        if not packable(linear):
            raise ValueError(f"cannot pack {type(linear).__name__}")
        return cls(linear.weight, linear.bias, batch_hint)

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of the weight (``[out, in]``), made on every read: for the rare reader only."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


def pack_base(parent: nn.Module, name: str, batch_hint: int) -> bool:
    """Replace the projection ``parent.<name>``'s base (a LoRA wrapper's ``base``, or the projection
    itself) by a :class:`PackedLinear` when it is :func:`packable`; whether it was.

    The plain layer is dropped, so its weight is freed unless something else holds it (a tied
    ``lm_head`` shares the embedding's weight, which stays).
    """
    module = getattr(parent, name, None)
    if module is None:
        return False
    owner, attr = (module, "base") if hasattr(module, "base") else (parent, name)
    base = getattr(owner, attr)
    if not packable(base):
        return False
    setattr(owner, attr, PackedLinear.replacing(base, batch_hint))
    return True

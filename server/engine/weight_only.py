"""Weight-only fp16 base projections on CPU (``quantization=fp16w``): weights held in half precision,
every matmul in fp32.

On a CPU without native bf16 the engine computes in fp32 (:mod:`loraswap.precision`), so a plain base
holds 4 bytes a weight. fbgemm's fp16 GEMM (``quantized::linear_prepack_fp16`` and
``quantized::linear_dynamic_fp16``, part of torch on x86 CPUs with AVX2 and F16C) keeps each weight in
fp16, widens it to fp32 in registers and multiplies and accumulates in fp32: half the bytes of an fp32
base, and at the engine's batch sizes faster than fp32 matmuls, which are bound by reading the weights
(``bench/quantized_cpu.py``). The result is ``F.linear`` on the fp16-rounded weight, the reference op
(:func:`reference_linear`). For a checkpoint stored in bf16 (the embedded SmolLM2) or fp16 that rounding
changes nothing but weights under 2**-17 in magnitude (fp16's subnormals hold fewer bits) or over 65504
(clipped): bf16's 8 significant bits fit in fp16's 11.

:class:`HalfWeightLinear` replaces a plain ``nn.Linear`` (the seven projections of every decoder layer
and ``lm_head``: a tied one gets its own fp16 copy, the embedding keeps its weight). It is not an
``nn.Linear`` subclass, so the engine neither fuses (``engine/fused.py``) nor packs (``engine/packed.py``)
it, and LoRA layers wrap it as they wrap any projection. The packed weight is an opaque fbgemm object,
not a parameter or buffer: :meth:`HalfWeightLinear.weight_bytes` says what it holds, and the module has
no ``state_dict`` entry for it.

Only the packed tensors are held, no fp32 copy, so the float32 model this starts from is freed layer by
layer as it is converted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def half_weights_supported() -> bool:
    """Whether this CPU and torch build run fbgemm's fp16 GEMM (x86 with AVX2 and F16C, fbgemm built in)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(8, 8), None)
        out = torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 8), packed)
    except (RuntimeError, AttributeError):  # no such op, or fbgemm refuses this CPU
        return False
    return bool(torch.equal(out, torch.full((1, 8), 8.0)))


def pack_half(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.ScriptObject:
    """``weight: [out, in]`` (any float dtype) rounded to fp16 and packed for fbgemm once; ``bias: [out]``
    kept in fp32 beside it. Magnitudes over 65504 are clipped (fbgemm warns)."""
    weight = weight.detach().to(torch.float32).contiguous()
    return torch.ops.quantized.linear_prepack_fp16(weight, None if bias is None else bias.detach().float())


def half_linear(x: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x: [..., in]`` in fp32 over a :func:`pack_half` weight: fp32 products and
    sums of the fp16-rounded weights."""
    return torch.ops.quantized.linear_dynamic_fp16(x, packed)


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`half_linear` by plain ops: ``F.linear`` in fp32 on the weight rounded to fp16 and back."""
    bias = None if bias is None else bias.float()
    return F.linear(x, weight.to(torch.float16).float(), bias)


class HalfWeightLinear(nn.Module):
    """A linear layer whose weight is held in fp16 and multiplied in fp32 (see the module docstring).

    Args:
        weight: ``[out, in]``, any float dtype, on the CPU; not kept.
        bias: ``[out]`` or None.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.device.type != "cpu" or weight.dim() != 2 or not weight.dtype.is_floating_point:
            what = f"{tuple(weight.shape)} {weight.dtype} on {weight.device}"
            raise ValueError(f"need a 2-d float CPU weight, got {what}")
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"the bias {tuple(bias.shape)} does not fit the weight {tuple(weight.shape)}")
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        self.has_bias = bias is not None
        self.packed = pack_half(weight, bias)  # an opaque fbgemm object: not a parameter or buffer

    @classmethod
    def replacing(cls, linear: nn.Linear) -> HalfWeightLinear:
        """The layer to put in place of ``linear``."""
        return cls(linear.weight, linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the matmul sees it (fp16 values, as fp32 ``[out, in]``), a copy made on every
        read: for the rare reader (an oracle, a test)."""
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[0]

    @property
    def bias(self) -> torch.Tensor | None:
        """The fp32 bias (a copy), or None."""
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[1]

    def weight_bytes(self) -> int:
        """Bytes the layer holds: 2 a weight, 4 a bias value."""
        return 2 * self.out_features * self.in_features + (4 * self.out_features if self.has_bias else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return half_linear(x, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"


def replace_linears(
    model: nn.Module, make: Callable[[nn.Linear], nn.Module] = HalfWeightLinear.replacing
) -> list[str]:
    """Replace every plain ``nn.Linear`` of ``model`` (not a subclass: those hold their own storage) by
    ``make(linear)`` (default: a :class:`HalfWeightLinear`), one at a time, so each float weight is freed
    as soon as it is converted (unless something else holds it: a tied ``lm_head``'s is the embedding's).
    Returns the replaced modules' names."""
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(getattr(parent, child)))
    return names

"""The int8 weight-only candidate that ``bench/quantized_cpu.py`` measures (not an engine option).

Per-output-channel symmetric int8 weights (``scale = max |w| / 127`` per row) multiplied by torch's own
``aten._weight_int8pack_mm`` (what gpt-fast and torchao run on CPU): 1 byte a weight plus 4 a row. On
x86 that kernel is vectorised (AVX2, AVX-512) for bf16 activations only; fp32 ones take a scalar loop,
tens of times slower than an fp32 matmul (the bench's op table). So the candidate takes ``act_dtype``:
bf16 rounds the activations to bf16 for the matmul and its output back to the model's dtype; fp32 is the
same arithmetic in fp32 on the slow path. :func:`reference_int8_linear` is the same arithmetic by plain
ops (dequantize, ``F.linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight: [out, in]`` as int8 ``[out, in]`` and fp32 scales ``[out]`` (symmetric, per row)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, act_dtype: torch.dtype
) -> torch.Tensor:
    """``x @ (qweight * scales)^T`` for ``x: [..., in]``, computed on ``act_dtype`` activations (fp32
    products and sums, the output rounded to ``act_dtype``), returned in ``x``'s dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(act_dtype).contiguous()  # [T, in]
    out = torch._weight_int8pack_mm(flat, qweight, scales.to(act_dtype))  # [T, out]
    return out.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


def reference_int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, act_dtype: torch.dtype
) -> torch.Tensor:
    """:func:`int8_linear` by plain ops: the activations and scales rounded to ``act_dtype``, each weight
    ``q * scale`` in fp32, ``F.linear`` in fp32, the output rounded to ``act_dtype``."""
    weight = qweight.float() * scales.to(act_dtype).float()[:, None]
    return F.linear(x.to(act_dtype).float(), weight).to(act_dtype).to(x.dtype)


class Int8WeightOnlyLinear(nn.Module):
    """A linear layer over int8 weights and per-row scales (see the module docstring).

    Args:
        weight: ``[out, in]``, any float dtype; not kept.
        bias: ``[out]`` or None (added in the model's dtype after the matmul).
        act_dtype: The activations' dtype in the matmul (bf16: the vectorised kernel).
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, act_dtype: torch.dtype = torch.bfloat16
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        self.act_dtype = act_dtype
        qweight, scales = quantize_int8(weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def replacing(cls, linear: nn.Linear, act_dtype: torch.dtype = torch.bfloat16) -> Int8WeightOnlyLinear:
        """The layer to put in place of ``linear``."""
        return cls(linear.weight, linear.bias, act_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The weight the matmul multiplies by (``q * scale``, the scale rounded to ``act_dtype``) as fp32
        ``[out, in]``, a copy made on every read."""
        return self.qweight.float() * self.scales.to(self.act_dtype).float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_linear(x, self.qweight, self.scales, self.act_dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act={self.act_dtype}"

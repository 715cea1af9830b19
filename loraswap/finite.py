"""The one NaN/Inf scan: whether a tensor holds only finite values.

Semantics (:func:`all_finite_reference`): a tensor is finite when no element is NaN, +Inf or -Inf; a
tensor of integers or booleans, and an empty tensor, is finite. :func:`all_finite` is the fast op with
the same answer: one ``aminmax`` reduction (NaN propagates to both bounds and an infinity shows as a
bound), where ``isfinite(t).all()`` first writes a boolean tensor the size of ``t``. Float8 tensors,
which neither op implements on CPU, are widened to float32 first.
"""

from __future__ import annotations

import math

import torch


def _scannable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, widened to float32 when its float dtype has no reductions (float8)."""
    return tensor.float() if tensor.element_size() == 1 else tensor


def all_finite_reference(tensor: torch.Tensor) -> bool:
    """The reference op: ``isfinite(t).all()``; non-float tensors are finite."""
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(_scannable(tensor)).all())


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN or Inf (:func:`all_finite_reference`'s answer, one reduction)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(_scannable(tensor).reshape(-1))
    return math.isfinite(float(low)) and math.isfinite(float(high))

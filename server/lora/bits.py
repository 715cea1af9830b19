"""Tensors as numpy views of their bits: how a CPU slot fill copies an adapter's matrices (numpy copies
bfloat16 data that numpy cannot name, as integers of the same size)."""

from __future__ import annotations

import numpy as np
import torch

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_bits(t: torch.Tensor) -> np.ndarray:
    """A numpy view of CPU tensor ``t``'s bytes as integers of its element size (numpy has no bfloat16)."""
    return t.view(_INT_OF_SIZE[t.element_size()]).numpy()

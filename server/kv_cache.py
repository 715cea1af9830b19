"""The KV cache: one row per running sequence, allocated once and accounted in bytes."""

from __future__ import annotations

import torch


class KVCache:
    """Per layer ``k``/``v`` buffers of ``[rows, max_len, kv_heads, head_dim]`` plus a free-row list.

    Args:
        num_layers: Decoder layers.
        rows: Sequences that can be resident at once (the engine's max batch size).
        max_len: Tokens per sequence (prompt + generated).
        kv_heads: Key/value heads.
        head_dim: Size of one head.
        dtype: Storage dtype.
        device: Where the cache lives.
    """

    def __init__(
        self,
        num_layers: int,
        rows: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (rows, max_len, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self._free = list(range(rows - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Take a free row (the caller checked ``free_rows``)."""
        return self._free.pop()

    def release(self, row: int) -> None:
        self._free.append(row)

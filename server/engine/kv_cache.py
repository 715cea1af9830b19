"""The KV cache: one row per running sequence, allocated once and accounted in bytes."""

from __future__ import annotations

import heapq

import torch


class KVCache:
    """Per layer ``k``/``v`` buffers of ``[rows, kv_heads, max_len, head_dim]`` plus a free-row heap.

    Heads before positions, so a range of rows up to a length is a view that attention multiplies
    directly (no gather); the lowest free row is handed out first, which keeps the rows in use compact.

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
        shape = (rows, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self._free = list(range(rows))  # a heap

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Take the lowest free row (the caller checked ``free_rows``)."""
        return heapq.heappop(self._free)

    def release(self, row: int) -> None:
        heapq.heappush(self._free, row)

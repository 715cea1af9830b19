"""The KV cache: one row per running sequence, allocated once and accounted in bytes.

:func:`head_dim` and :func:`kv_cache_bytes` are the one formula of a model's head size and KV-cache
size: the engine builds its cache with them, and a route estimates its memory with them before any
model is loaded. ``config`` there is a transformers config or ``config.json`` as a dict.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any

import torch


def _field(config: Any, key: str) -> Any:
    """``config[key]`` of a dict, ``config.key`` of a config object; None when absent."""
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def head_dim(config: Any) -> int:
    """Size of one attention head: ``head_dim`` when the config sets it, else hidden size / heads."""
    heads = _field(config, "num_attention_heads")
    return _field(config, "head_dim") or _field(config, "hidden_size") // heads


def kv_heads(config: Any) -> int:
    """Key/value heads: ``num_key_value_heads``, else (no grouping) the attention heads."""
    return _field(config, "num_key_value_heads") or _field(config, "num_attention_heads")


def kv_cache_bytes(config: Any, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of the KV cache of ``batch`` rows of ``seq_len`` tokens in ``dtype`` (what
    :attr:`KVCache.nbytes` of :meth:`KVCache.for_model` reports): ``k`` and ``v`` of
    ``[batch, kv_heads, seq_len, head_dim]`` per layer."""
    per_layer = batch * kv_heads(config) * seq_len * head_dim(config)
    return 2 * _field(config, "num_hidden_layers") * per_layer * dtype.itemsize


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

    @classmethod
    def for_model(
        cls, config: Any, rows: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        """The cache of a model of ``config`` (a transformers config or ``config.json``'s dict)."""
        layers = _field(config, "num_hidden_layers")
        return cls(layers, rows, max_len, kv_heads(config), head_dim(config), dtype, device)

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

"""The host-RAM tier: adapters kept as tensors under a byte budget, least recently used first out.

Not thread-safe. In the server, :class:`~loraswap.server.adapters.manager.AdapterManager` owns the
cache and guards every access (its pins included) with its lock.
"""

from __future__ import annotations

from loraswap.server.adapters.lru import LRU
from loraswap.server.adapters.reader import HostAdapter


class HostCache:
    """LRU of :class:`HostAdapter` by digest, bounded in bytes; pinned digests are never evicted."""

    def __init__(self, budget_bytes: int) -> None:
        self._items: LRU[str, HostAdapter] = LRU(budget_bytes, weigh=_host_bytes)
        self.pinned: set[str] = set()

    def __contains__(self, digest: str) -> bool:
        return digest in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def budget(self) -> int:
        """The byte budget that insertions evict down to."""
        return self._items.capacity

    @property
    def nbytes(self) -> int:
        """Host memory held by the entries."""
        return self._items.weight

    def peek(self, digest: str) -> HostAdapter | None:
        """The entry without counting it as a use (for listings and metrics scrapes)."""
        return self._items.peek(digest)

    def get(self, digest: str) -> HostAdapter | None:
        return self._items.get(digest)

    def put(self, adapter: HostAdapter, keep: set[str] = frozenset()) -> list[str]:
        """Insert ``adapter``; evict LRU entries (never pinned ones or ``keep``) to fit; return evicted.
        When the protected entries alone exceed the budget, the cache stays over it."""

        def protected(digest: str) -> bool:
            return digest in self.pinned or digest in keep

        return [digest for digest, _ in self._items.put(adapter.digest, adapter, protected)]

    def remove(self, digest: str) -> HostAdapter | None:
        self.pinned.discard(digest)
        return self._items.pop(digest)

    def items(self) -> list[HostAdapter]:
        return self._items.values()


def _host_bytes(adapter: HostAdapter) -> int:
    return adapter.nbytes

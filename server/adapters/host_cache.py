"""The host-RAM tier: adapters kept as tensors under a byte budget, least recently used first out."""

from __future__ import annotations

from collections import OrderedDict

from loraswap.server.adapters.reader import HostAdapter


class HostCache:
    """LRU of :class:`HostAdapter` by digest, bounded in bytes; pinned digests are never evicted."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._items: OrderedDict[str, HostAdapter] = OrderedDict()
        self.pinned: set[str] = set()

    def __contains__(self, digest: str) -> bool:
        return digest in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self._items.values())

    def peek(self, digest: str) -> HostAdapter | None:
        """The entry without counting it as a use (for listings and metrics scrapes)."""
        return self._items.get(digest)

    def get(self, digest: str) -> HostAdapter | None:
        item = self._items.get(digest)
        if item is not None:
            self._items.move_to_end(digest)
        return item

    def put(self, adapter: HostAdapter, keep: set[str] = frozenset()) -> list[str]:
        """Insert ``adapter``; evict LRU entries (never pinned ones or ``keep``) to fit; return evicted."""
        self._items[adapter.digest] = adapter
        self._items.move_to_end(adapter.digest)
        evicted = []
        total = self.nbytes
        for digest in list(self._items):
            if total <= self.budget:
                break
            if digest == adapter.digest or digest in self.pinned or digest in keep:
                continue
            total -= self._items.pop(digest).nbytes
            evicted.append(digest)
        return evicted

    def remove(self, digest: str) -> HostAdapter | None:
        self.pinned.discard(digest)
        return self._items.pop(digest, None)

    def items(self) -> list[HostAdapter]:
        return list(self._items.values())

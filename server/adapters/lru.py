"""A least-recently-used map, optionally bounded by a total weight: the one LRU the adapter tiers share.

The host cache (bounded in bytes), the device slot table (unbounded: its slots bound it), the manager's
usage and resolution tables and the reader's plans (bounded in entries) are each one :class:`LRU`.
Eviction walks entries oldest first and skips those a predicate protects (pinned, in use, loading), so
a protected entry stays even when that leaves the map over its capacity.

Not thread-safe: its owner guards it (see each owner's docstring for the lock).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


def _unprotected(key: object) -> bool:
    return False


class LRU(Generic[K, V]):
    """Entries by key, least recently used first.

    Args:
        capacity: Bound on the total weight that :meth:`put` evicts down to; None for no bound.
        weigh: An entry's weight (default 1, so ``capacity`` counts entries). Called once per
            :meth:`put`; a value's weight must not change while it is stored.
    """

    def __init__(self, capacity: int | None = None, weigh: Callable[[V], int] | None = None) -> None:
        if capacity is not None and capacity < 0:
            raise ValueError(f"LRU capacity must be at least 0, got {capacity}")
        self.capacity = capacity
        self._weigh = weigh
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()  # oldest first
        self._weight = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def weight(self) -> int:
        """The total weight of the entries."""
        return self._weight

    def keys(self) -> list[K]:
        """The keys, least recently used first."""
        return list(self._entries)

    def values(self) -> list[V]:
        """The values, least recently used first."""
        return [value for value, _ in self._entries.values()]

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value of ``key`` (``default`` when absent), which becomes the most recently used."""
        entry = self._entries.get(key)
        if entry is None:
            return default
        self._entries.move_to_end(key)
        return entry[0]

    def peek(self, key: K, default: V | None = None) -> V | None:
        """The value of ``key`` (``default`` when absent), leaving the order as it is."""
        entry = self._entries.get(key)
        return default if entry is None else entry[0]

    def touch(self, key: K) -> None:
        """Make the present ``key`` the most recently used.

        Raises:
            KeyError: ``key`` is absent.
        """
        self._entries.move_to_end(key)

    def put(self, key: K, value: V, protect: Callable[[K], bool] | None = None) -> list[tuple[K, V]]:
        """Store ``value`` as the most recently used entry (replacing any value of ``key``), then evict
        the least recently used entries ``protect`` does not protect until the total weight is within
        the capacity. ``key`` itself is never evicted by its own insertion.

        Returns:
            The evicted ``(key, value)`` pairs, oldest first.
        """
        old = self._entries.pop(key, None)
        if old is not None:
            self._weight -= old[1]
        weight = self._weigh(value) if self._weigh is not None else 1
        self._entries[key] = (value, weight)
        self._weight += weight
        if self.capacity is None or self._weight <= self.capacity:
            return []
        protected = protect or _unprotected
        evicted = []
        for victim in list(self._entries):
            if self._weight <= self.capacity:
                break
            if victim == key or protected(victim):
                continue
            value_out, weight_out = self._entries.pop(victim)
            self._weight -= weight_out
            evicted.append((victim, value_out))
        return evicted

    def pop(self, key: K, default: V | None = None) -> V | None:
        """Remove ``key`` and return its value (``default`` when absent)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return default
        self._weight -= entry[1]
        return entry[0]

    def oldest(self, protect: Callable[[K], bool] | None = None) -> K | None:
        """The least recently used key that ``protect`` does not protect (None when there is none)."""
        protected = protect or _unprotected
        return next((key for key in self._entries if not protected(key)), None)

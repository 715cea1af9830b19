"""Which adapter sits in which device slot: LRU with pins and in-use counts.

A slot holding an adapter used by a running request, or pinned, is never evicted, and at least one
slot always stays unpinned so that traffic for other adapters can run. Pure bookkeeping (no tensors),
so the state machine can be tested step by step.

Not thread-safe. In the server, :class:`~loraswap.server.adapters.manager.AdapterManager` owns the
table and guards every access with its lock; only the engine thread (or a holder of the engine's step
lock) changes it, load workers and listings only read it.
"""

from __future__ import annotations

from collections.abc import Sequence

from loraswap.errors import OverloadedError
from loraswap.server.adapters.lru import LRU


class SlotTable:
    """Maps adapter keys (digests) to slot indices ``0 .. num_slots-1``."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._slot_of: LRU[str, int] = LRU()  # its size is bounded by the free list
        self._free = list(range(num_slots - 1, -1, -1))
        self._in_use: dict[str, int] = {}
        self._pinned: set[str] = set()

    @classmethod
    def restore(cls, residents: Sequence[tuple[str, int, bool]], free_slots: int) -> SlotTable:
        """A table as :meth:`residents` and :attr:`free_slots` reported it: what a planner changes to
        try its decisions under the same rules, without touching the real table (the pin limit is
        not checked again: the snapshot came from a table that kept it)."""
        table = cls(len(residents) + free_slots)
        for key, users, pinned in residents:  # least recently used first: the LRU order is kept
            table.place(key)
            if users:
                table._in_use[key] = users
            if pinned:
                table._pinned.add(key)
        return table

    def __contains__(self, key: str) -> bool:
        return key in self._slot_of

    def slot_of(self, key: str) -> int | None:
        return self._slot_of.peek(key)

    def keys(self) -> list[str]:
        return self._slot_of.keys()

    @property
    def free_slots(self) -> int:
        """Slots that hold no adapter."""
        return len(self._free)

    def residents(self) -> list[tuple[str, int, bool]]:
        """``(key, requests using it, pinned)`` of every resident key, least recently used first."""
        keys = self._slot_of.keys()  # an LRU is not iterable: keys() is its order
        return [(key, self._in_use.get(key, 0), key in self._pinned) for key in keys]

    def can_place(self, key: str, victim: str | None = None) -> bool:
        """Whether ``key`` is resident or could be made resident now (evicting ``victim``, if given,
        when no slot is free)."""
        if key in self._slot_of or self._free:
            return True
        if victim is not None:
            return victim in self._slot_of and not self._protected(victim)
        return self._victim() is not None

    def place(self, key: str, victim: str | None = None) -> tuple[int, str | None, bool]:
        """Make ``key`` resident. Returns (slot, evicted key or None, whether a copy is needed).

        Args:
            key: The adapter to place.
            victim: The resident key to evict when no slot is free (default: the least recently used
                one that is neither in use nor pinned).

        Raises:
            RuntimeError: when no slot is free or evictable, or ``victim`` is not resident or is in use
                or pinned (check :meth:`can_place` first).
        """
        slot = self._slot_of.get(key)
        if slot is not None:
            return slot, None, False
        evicted = None
        if not self._free:
            if not self.can_place(key, victim):
                raise RuntimeError(
                    f"cannot evict {victim}: it is not resident, or in use, or pinned"
                    if victim is not None
                    else "every adapter slot is pinned or in use"
                )
            evicted = victim if victim is not None else self._victim()
            self._free.append(self._slot_of.pop(evicted))
        slot = self._free.pop()
        self._slot_of.put(key, slot)
        return slot, evicted, True

    def acquire(self, key: str) -> None:
        """A request starts using the resident ``key``.

        Raises:
            KeyError: ``key`` is not resident.
        """
        self._slot_of.touch(key)
        self._in_use[key] = self._in_use.get(key, 0) + 1

    def release(self, key: str) -> None:
        count = self._in_use.get(key, 0) - 1
        if count > 0:
            self._in_use[key] = count
        else:
            self._in_use.pop(key, None)

    def in_use(self, key: str) -> bool:
        return key in self._in_use

    def pin(self, key: str) -> None:
        """Keep ``key`` resident until unpinned.

        Raises:
            OverloadedError: pinning ``key`` would leave no unpinned slot for other adapters' traffic.
        """
        if key in self._pinned:
            return
        if len(self._pinned) + 1 >= self.num_slots:
            raise OverloadedError(
                f"cannot pin {key}: {len(self._pinned)} of the {self.num_slots} adapter slots are pinned"
                f" and at most {self.num_slots - 1} may be, so that traffic for other adapters has a slot"
            )
        self._pinned.add(key)

    def unpin(self, key: str) -> None:
        self._pinned.discard(key)

    def is_pinned(self, key: str) -> bool:
        return key in self._pinned

    def remove(self, key: str) -> int | None:
        """Drop an idle ``key`` (unpinning it); return its freed slot (None when not resident or busy)."""
        if key not in self._slot_of or key in self._in_use:
            return None
        self._pinned.discard(key)
        slot = self._slot_of.pop(key)
        self._free.append(slot)
        return slot

    def _protected(self, key: str) -> bool:
        return key in self._in_use or key in self._pinned

    def _victim(self) -> str | None:
        return self._slot_of.oldest(self._protected)

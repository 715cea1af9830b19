"""The device-slot table stepped case by case, and the host cache's byte budget."""

from __future__ import annotations

import pytest
import torch

from loraswap.errors import OverloadedError
from loraswap.server.adapters.host_cache import HostCache
from loraswap.server.adapters.reader import HostAdapter
from loraswap.server.adapters.slots import SlotTable


def test_place_reuses_resident_and_fills_free_slots() -> None:
    table = SlotTable(2)
    assert table.place("a") == (0, None, True)
    assert table.place("b") == (1, None, True)
    assert table.place("a") == (0, None, False)  # resident: no copy, becomes most recent


def test_lru_eviction_skips_in_use_and_pinned() -> None:
    table = SlotTable(2)
    table.place("a")
    table.place("b")
    table.acquire("a")  # a running request uses a
    assert table.place("c") == (1, "b", True)  # b is the only idle one
    table.pin("c")
    assert not table.can_place("d")  # a in use, c pinned
    with pytest.raises(RuntimeError):
        table.place("d")
    table.release("a")
    assert table.place("d") == (0, "a", True)


def test_acquire_counts_and_remove() -> None:
    table = SlotTable(1)
    table.place("a")
    table.acquire("a")
    table.acquire("a")
    table.release("a")
    assert table.in_use("a")
    assert table.remove("a") is None  # busy
    table.release("a")
    assert table.remove("a") == 0
    assert "a" not in table and table.can_place("b")


def test_a_pin_that_would_leave_traffic_no_slot_is_refused() -> None:
    table = SlotTable(3)
    for key in "abc":
        table.place(key)
    table.pin("a")
    table.pin("b")
    with pytest.raises(OverloadedError, match="cannot pin c: 2 of the 3 adapter slots are pinned"):
        table.pin("c")
    assert not table.is_pinned("c")
    table.pin("b")  # pinning a pinned key again is no new pin
    assert table.place("d") == (2, "c", True)  # the unpinned slot still serves traffic
    table.unpin("a")
    table.pin("d")
    assert [table.is_pinned(k) for k in "abd"] == [False, True, True]
    with pytest.raises(OverloadedError, match="at most 0 may be"):
        SlotTable(1).pin("a")


def _adapter(digest: str, numel: int) -> HostAdapter:
    return HostAdapter(digest, digest, 1, {"m": (torch.zeros(numel), torch.zeros(0))})


def test_host_cache_evicts_lru_within_budget_and_keeps_pinned() -> None:
    cache = HostCache(budget_bytes=3 * 400)
    for name in "abc":
        assert cache.put(_adapter(name, 100)) == []
    cache.get("a")  # a is now most recent
    cache.pinned.add("b")
    assert cache.put(_adapter("d", 100)) == ["c"]
    assert cache.put(_adapter("e", 100), keep={"a"}) == ["d"]
    assert set(item.digest for item in cache.items()) == {"a", "b", "e"}
    assert cache.nbytes <= cache.budget


def test_host_cache_peek_does_not_refresh_lru_order() -> None:
    cache = HostCache(budget_bytes=2 * 400)
    cache.put(_adapter("a", 100))
    cache.put(_adapter("b", 100))
    assert cache.peek("a") is not None  # a listing looks at a: it stays the oldest
    assert cache.put(_adapter("c", 100)) == ["a"]

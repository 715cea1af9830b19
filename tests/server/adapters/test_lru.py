"""The shared LRU stepped as a state machine: after every operation, its order, size and weight."""

from __future__ import annotations

import pytest

from loraswap.server.adapters.lru import LRU


def _state(lru: LRU) -> tuple[list, int, int]:
    return lru.keys(), len(lru), lru.weight


def test_get_touches_peek_does_not() -> None:
    lru: LRU[str, int] = LRU()
    assert lru.put("a", 1) == []
    assert lru.put("b", 2) == []
    assert lru.put("c", 3) == []
    assert _state(lru) == (["a", "b", "c"], 3, 3)
    assert lru.peek("a") == 1
    assert lru.keys() == ["a", "b", "c"]  # peek leaves the order
    assert lru.get("a") == 1
    assert lru.keys() == ["b", "c", "a"]  # get makes it the most recent
    assert lru.get("zz") is None and lru.peek("zz", -1) == -1
    assert lru.keys() == ["b", "c", "a"]  # a miss changes nothing
    lru.touch("b")
    assert lru.keys() == ["c", "a", "b"]
    with pytest.raises(KeyError):
        lru.touch("zz")
    assert lru.values() == [3, 1, 2]


def test_put_replaces_and_moves_to_the_end_pop_removes() -> None:
    lru: LRU[str, int] = LRU()
    lru.put("a", 1)
    lru.put("b", 2)
    lru.put("a", 10)
    assert _state(lru) == (["b", "a"], 2, 2)
    assert lru.peek("a") == 10
    assert lru.pop("b") == 2
    assert _state(lru) == (["a"], 1, 1)
    assert lru.pop("b") is None and lru.pop("b", 0) == 0
    assert "a" in lru and "b" not in lru


def test_capacity_in_entries_evicts_the_least_recent() -> None:
    lru: LRU[str, int] = LRU(capacity=2)
    assert lru.put("a", 1) == []
    assert lru.put("b", 2) == []
    lru.get("a")
    assert lru.put("c", 3) == [("b", 2)]  # b is the least recently used
    assert _state(lru) == (["a", "c"], 2, 2)
    assert lru.put("a", 4) == []  # replacing keeps the count
    assert lru.keys() == ["c", "a"]
    assert lru.put("d", 5) == [("c", 3)]
    assert _state(lru) == (["a", "d"], 2, 2)


def test_eviction_skips_protected_entries_and_never_the_one_put() -> None:
    lru: LRU[str, int] = LRU(capacity=2)
    protected = {"a"}
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.put("c", 3, protect=protected.__contains__) == [("b", 2)]  # a is older but protected
    protected.add("c")
    assert lru.put("d", 4, protect=protected.__contains__) == []  # all others protected: over capacity
    assert _state(lru) == (["a", "c", "d"], 3, 3)
    protected.clear()
    assert lru.put("e", 5, protect=protected.__contains__) == [("a", 1), ("c", 3)]  # back within it
    assert _state(lru) == (["d", "e"], 2, 2)
    zero: LRU[str, int] = LRU(capacity=0)
    assert zero.put("x", 1) == [] and zero.keys() == ["x"]  # its own insertion never evicts it
    assert zero.put("y", 2) == [("x", 1)] and zero.keys() == ["y"]


def test_weights_bound_the_total_and_are_taken_back_on_replace_and_pop() -> None:
    lru: LRU[str, bytes] = LRU(capacity=10, weigh=len)
    assert lru.put("a", b"xxxx") == []
    assert lru.put("b", b"xxxx") == []
    assert _state(lru) == (["a", "b"], 2, 8)
    assert lru.put("c", b"xxx") == [("a", b"xxxx")]  # 11 > 10: the oldest goes
    assert _state(lru) == (["b", "c"], 2, 7)
    assert lru.put("b", b"x") == []  # replaced: its old weight is taken back
    assert _state(lru) == (["c", "b"], 2, 4)
    assert lru.put("big", b"x" * 12) == [("c", b"xxx"), ("b", b"x")]  # alone over capacity: kept
    assert _state(lru) == (["big"], 1, 12)
    assert lru.pop("big") == b"x" * 12
    assert _state(lru) == ([], 0, 0)


def test_oldest_skips_protected_and_changes_nothing() -> None:
    lru: LRU[str, int] = LRU()
    assert lru.oldest() is None
    for key in "abc":
        lru.put(key, 0)
    assert lru.oldest() == "a"
    assert lru.oldest(protect=lambda k: k in {"a", "b"}) == "c"
    assert lru.oldest(protect=lambda k: True) is None
    assert lru.keys() == ["a", "b", "c"]


def test_capacity_can_change_and_applies_at_the_next_put() -> None:
    lru: LRU[str, int] = LRU(capacity=3)
    for key in "abc":
        lru.put(key, 0)
    lru.capacity = 1
    assert len(lru) == 3
    assert lru.put("d", 0) == [("a", 0), ("b", 0), ("c", 0)]
    with pytest.raises(ValueError, match="at least 0, got -1"):
        LRU(capacity=-1)

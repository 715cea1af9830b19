"""The registry's retries through :mod:`loraswap.retry`: a tag's compare-and-swap tries again after a
short jittered wait when another writer wins; a local write takes a fresh temporary name when ``gc``
removes its file before it is locked."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

import pytest

from loraswap.errors import ConflictError
from loraswap.registry import local_store
from loraswap.registry.consistency import TAG_BACKOFF_S, TAG_MAX_BACKOFF_S, move_tag, read_tag, tag_retry
from loraswap.registry.layout import tag_document
from loraswap.registry.local_store import LocalStore
from loraswap.registry.store import StoreError

OURS, THEIRS = "sha256:" + "1" * 64, "sha256:" + "2" * 64


class _LosingStore(LocalStore):
    """A real store where another writer moves the tag between our read and our write, ``losses`` times."""

    def __init__(self, root: Path, losses: int) -> None:
        super().__init__(root)
        self.losses, self.swaps = losses, 0

    def compare_and_swap(self, key: str, data: bytes, expected: str | None) -> str:
        self.swaps += 1
        if self.swaps <= self.losses:
            LocalStore(self.root).put(key, tag_document(THEIRS))
        return super().compare_and_swap(key, data, expected)


def test_a_tag_move_retries_lost_races_after_a_jittered_wait(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _LosingStore(tmp_path, losses=2)
    with caplog.at_level(logging.DEBUG, logger="loraswap.registry.consistency"):
        assert move_tag(store, "bot", "prod", OURS, retries=2) is not None
    assert store.swaps == 3 and read_tag(store, "bot", "prod")[0] == OURS
    waits = [float(r.getMessage().split(" in ")[1].split()[0]) for r in caplog.records]
    assert len(waits) == 2 and all(0 < w <= TAG_MAX_BACKOFF_S for w in waits)
    store = _LosingStore(tmp_path / "other", losses=3)
    with pytest.raises(ConflictError):
        move_tag(store, "bot", "prod", OURS, retries=2)
    assert store.swaps == 3 and read_tag(store, "bot", "prod")[0] == THEIRS  # the winner's write is kept


def test_the_tag_policy_backs_off_with_full_jitter_up_to_its_cap() -> None:
    policy = tag_retry(5)
    assert policy.attempts == 6 and policy.retry_on == (ConflictError,)
    assert [policy.wait(n, 0.0) for n in (1, 2, 3)] == pytest.approx([TAG_BACKOFF_S, 2 * TAG_BACKOFF_S, 0.04])
    assert policy.wait(30, 0.0) == TAG_MAX_BACKOFF_S and policy.wait(1, 0.5) == pytest.approx(
        TAG_BACKOFF_S / 2
    )


def _gc_removes_temp_files(monkeypatch: pytest.MonkeyPatch, times: int) -> None:
    """Make ``gc`` win the race ``times`` times: the temp file goes between its creation and its lock."""
    real_flock = fcntl.flock
    left = [times]

    def flock(fd: int, operation: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if left[0] and f"{os.sep}.tmp{os.sep}" in path:
            left[0] -= 1
            os.unlink(path)
        real_flock(fd, operation)

    monkeypatch.setattr(local_store.fcntl, "flock", flock)


def test_a_write_takes_a_fresh_temporary_name_when_gc_removed_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path)
    _gc_removes_temp_files(monkeypatch, times=2)
    store.put("a/b", b"data")
    assert store.read("a/b")[0] == b"data" and os.listdir(tmp_path / ".tmp") == []
    _gc_removes_temp_files(monkeypatch, times=3)
    with pytest.raises(StoreError, match="removed 3 times by gc"):
        store.put("a/c", b"data")
    assert os.listdir(tmp_path / ".tmp") == []

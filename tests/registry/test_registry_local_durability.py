"""The local store after a power cut and over a long life (issue 23, items 9 and 10): folders are
fsynced in publishing order, and the lock files are bounded whatever the number of keys written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from loraswap.registry import open_registry
from loraswap.registry.local_store import LOCK_STRIPES, LocalStore


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """What the file system is asked, in order: ("fsync", folder) for each folder fsynced, ("publish",
    path) for each rename or link into place, ("unlink", path) for each removal."""
    seen: list[tuple[str, str]] = []
    real_fsync, real_link, real_replace, real_unlink = os.fsync, os.link, os.replace, os.unlink

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def link(src, dst, *args, **kwargs) -> None:
        real_link(src, dst, *args, **kwargs)
        seen.append(("publish", os.fspath(dst)))

    def replace(src, dst, *args, **kwargs) -> None:
        real_replace(src, dst, *args, **kwargs)
        seen.append(("publish", os.fspath(dst)))

    def unlink(path, *args, **kwargs) -> None:
        real_unlink(path, *args, **kwargs)
        seen.append(("unlink", os.fspath(path)))

    for name, patched in (("fsync", fsync), ("link", link), ("replace", replace), ("unlink", unlink)):
        monkeypatch.setattr(os, name, patched)
    return seen


def _durable_before(events: list[tuple[str, str]], done: tuple[str, Path], then: tuple[str, Path]) -> None:
    """``done`` happened, its folder was fsynced after it, and both before ``then``."""
    first = events.index((done[0], str(done[1])))
    later = events.index((then[0], str(then[1])))
    synced = [i for i, event in enumerate(events) if event == ("fsync", str(done[1].parent)) and i > first]
    assert synced and synced[0] < later, (done, then, events)


def test_each_object_is_durable_before_anything_names_it(tmp_path: Path, make_adapter, events) -> None:
    root = (tmp_path / "registry").resolve()
    reg = open_registry(f"file://{root}")
    manifest = reg.push(make_adapter(), "bot", tags=["prod"])
    blobs = [root / "blobs" / "sha256" / entry.digest.split(":")[1] for entry in manifest.files]
    stored = root / "adapters" / "bot" / "manifests" / manifest.hex
    latest, prod = (root / "adapters" / "bot" / "tags" / tag for tag in ("latest", "prod"))
    for blob in blobs:
        _durable_before(events, ("publish", blob), ("publish", stored))
    _durable_before(events, ("publish", stored), ("publish", latest))
    _durable_before(events, ("publish", latest), ("publish", prod))
    assert ("fsync", str(prod.parent)) in events[events.index(("publish", str(prod))) :]
    for created in (
        root / "blobs",
        root / "blobs" / "sha256",
        root / "adapters" / "bot",
        root / "adapters" / "bot" / "manifests",
    ):
        # a folder made for an object is itself durable (its parent fsynced) before the object is published
        assert events.index(("fsync", str(created.parent))) < events.index(("fsync", str(created)))

    events.clear()
    reg.rm("bot", force=True)  # a power cut in the middle never keeps a tag whose manifest went
    _durable_before(events, ("unlink", latest), ("unlink", stored))
    _durable_before(events, ("unlink", prod), ("unlink", stored))
    assert ("fsync", str(stored.parent)) in events[events.index(("unlink", str(stored))) :]


def test_lock_files_are_bounded(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    store = LocalStore(root)
    for index in range(1000):
        store.compare_and_swap(f"adapters/bot/tags/t{index}", b"x", None)
    assert 0 < len(list((root / ".locks").iterdir())) <= LOCK_STRIPES == 256
    assert len(list(store.list("adapters/"))) == 1000

"""push, tag, rm and gc racing on one version (issue 23, item 8), on both backends.

Each interleaving is forced with a hook: a real store whose chosen call first runs the other operation
to completion, at the exact point between two steps of the first. A last test races real processes.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loraswap.errors import ConflictError, NotFoundError
from loraswap.registry import Registry, open_registry, open_store
from loraswap.registry.layout import tag_key
from loraswap.registry.store import ObjectInfo, ObjectStore, Progress


class _Hooked(ObjectStore):
    """A real store that runs ``action`` once, just before the first ``method`` call on a key ending in
    ``suffix`` (``delete`` also stands for gc's ``delete_stale``)."""

    def __init__(self, inner: ObjectStore, method: str, suffix: str, action: Callable[[], None]) -> None:
        self.inner, self.url = inner, inner.url
        self.method, self.suffix, self.action = method, suffix, action
        self.fired = False

    def _at(self, method: str, key: str) -> None:
        if not self.fired and method == self.method and key.endswith(self.suffix):
            self.fired = True
            self.action()

    def read(self, key: str) -> tuple[bytes, str]:
        self._at("read", key)
        return self.inner.read(key)

    def open(self, key: str):
        self._at("open", key)
        return self.inner.open(key)

    def put(self, key: str, data: bytes | Path, progress: Progress | None = None) -> None:
        self._at("put", key)
        self.inner.put(key, data, progress)

    def put_if_absent(self, key: str, data: bytes | Path, progress: Progress | None = None) -> bool:
        self._at("put_if_absent", key)
        return self.inner.put_if_absent(key, data, progress)

    def compare_and_swap(self, key: str, data: bytes, expected: str | None) -> str:
        self._at("compare_and_swap", key)
        return self.inner.compare_and_swap(key, data, expected)

    def delete(self, key: str, expected: str | None = None) -> None:
        self._at("delete", key)
        self.inner.delete(key, expected)

    def delete_stale(self, seen: ObjectInfo, cutoff: float) -> bool:
        self._at("delete", seen.key)
        return self.inner.delete_stale(seen, cutoff)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def stat(self, key: str) -> ObjectInfo | None:
        self._at("stat", key)
        return self.inner.stat(key)

    def touch(self, key: str) -> None:
        self._at("touch", key)
        self.inner.touch(key)

    def remove_stale_temp(self, older_than: float) -> int:
        return self.inner.remove_stale_temp(older_than)


def _hooked(url: str, method: str, suffix: str, action: Callable[[], None]) -> Registry:
    return Registry(_Hooked(open_store(url), method, suffix, action))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _assert_sound(url: str) -> None:
    """``verify`` finds nothing and every tag resolves to a stored version."""
    reg = open_registry(url)
    assert reg.verify() == []
    for entry in reg.list():
        for tag in entry.tags:
            assert reg.resolve(f"{entry.manifest.name}:{tag}", kind=None).digest == entry.manifest.digest


def test_rm_after_a_push_found_its_manifest_is_undone_by_the_push(backend_url: str, make_adapter) -> None:
    """rm --force lands between a re-push finding the version's manifest and moving ``latest``: the
    push writes the manifest back, and both its tags name a stored version."""
    adapter = make_adapter()
    version = open_registry(backend_url).push(adapter, "bot", tags=["v1"])

    def rm() -> None:
        assert open_registry(backend_url).rm(f"bot@{version.digest}", force=True).digest == version.digest

    pusher = _hooked(backend_url, "read", "/tags/latest", rm)
    assert pusher.push(adapter, "bot", tags=["v1"]).digest == version.digest
    assert pusher.store.fired
    reg = open_registry(backend_url)
    assert reg.resolve("bot").digest == reg.resolve("bot:v1").digest == version.digest
    assert _files(reg.pull("bot")) == _files(adapter)
    _assert_sound(backend_url)


def test_a_push_between_rm_deleting_tags_and_the_manifest_keeps_the_version(
    backend_url: str, make_adapter
) -> None:
    """A whole push runs after rm deleted the tags and before it deletes the manifest: rm sees the new
    tags when it checks after its delete, writes the manifest back and says so."""
    adapter = make_adapter()
    version = open_registry(backend_url).push(adapter, "bot", tags=["v1"])

    def push() -> None:
        assert open_registry(backend_url).push(adapter, "bot", tags=["v1"]).digest == version.digest

    remover = _hooked(backend_url, "delete", f"/manifests/{version.hex}", push)
    with pytest.raises(ConflictError, match=r"tagged latest, v1 by a concurrent push or tag .* it is kept"):
        remover.rm(f"bot@{version.digest}", force=True)
    assert remover.store.fired
    reg = open_registry(backend_url)
    assert reg.resolve("bot").digest == reg.resolve("bot:v1").digest == version.digest
    _assert_sound(backend_url)


def test_tag_of_a_version_removed_meanwhile_is_taken_back(backend_url: str, make_adapter) -> None:
    """rm --force lands between ``tag`` resolving the version and writing the tag: ``tag`` finds the
    manifest gone after its write, deletes its tag and raises NotFoundError."""
    version = open_registry(backend_url).push(make_adapter(), "bot")

    def rm() -> None:
        open_registry(backend_url).rm(f"bot@{version.digest}", force=True)

    tagger = _hooked(backend_url, "read", "/tags/prod", rm)
    with pytest.raises(NotFoundError, match="was removed while being tagged"):
        tagger.tag(f"bot@{version.digest}", "prod")
    assert tagger.store.fired
    assert open_store(backend_url).stat(tag_key("bot", "prod")) is None
    _assert_sound(backend_url)


def test_a_tag_between_rm_deleting_tags_and_the_manifest_keeps_the_version(
    backend_url: str, make_adapter
) -> None:
    version = open_registry(backend_url).push(make_adapter(), "bot")

    def tag() -> None:
        open_registry(backend_url).tag(f"bot@{version.digest}", "prod")

    remover = _hooked(backend_url, "delete", f"/manifests/{version.hex}", tag)
    with pytest.raises(ConflictError, match="tagged prod by a concurrent push or tag"):
        remover.rm(f"bot@{version.digest}", force=True)
    assert open_registry(backend_url).resolve("bot:prod").digest == version.digest
    _assert_sound(backend_url)


def test_gc_keeps_a_blob_a_push_reuses_after_the_listing(backend_url: str, make_adapter) -> None:
    """gc --grace 0 has listed the blobs of a removed version as unreferenced; before its first delete,
    a push of the same content touches them and writes its manifest. Every blob survives: gc's delete
    is conditional on the blob being unchanged since the listing."""
    adapter = make_adapter()
    reg = open_registry(backend_url)
    version = reg.push(adapter, "bot")
    reg.rm("bot", force=True)

    def push() -> None:
        assert open_registry(backend_url).push(adapter, "bot").digest == version.digest

    collector = _hooked(backend_url, "delete", "", push)
    report = collector.gc(grace_seconds=0)
    assert collector.store.fired
    assert report.removed == [] and report.kept_young == len(version.files)
    assert _files(reg.pull("bot")) == _files(adapter)
    _assert_sound(backend_url)
    assert reg.gc(grace_seconds=0).removed == []  # referenced now


# -- real processes ------------------------------------------------------------------------------------

ROUNDS = 10


def _race_worker(url: str, action: str, arg: str, barrier, results) -> None:
    reg = open_registry(url)
    barrier.wait(timeout=60)
    try:
        if action == "push":
            reg.push(Path(arg), "bot", tags=["v1"])
        else:
            reg.rm(arg, force=True)
        results.put((action, "ok"))
    except (ConflictError, NotFoundError) as exc:
        results.put((action, type(exc).__name__))


def test_pushes_and_forced_rms_racing_in_processes_leave_no_dangling_tag(
    tmp_path: Path, make_adapter
) -> None:
    """Two processes push one adapter while two others ``rm --force`` it, several rounds: after each
    round ``verify`` is clean and every tag resolves; each operation succeeded or raised a conflict (rm
    also: not found), never anything else."""
    url = f"file://{tmp_path / 'registry'}"
    adapter = make_adapter()
    ref = f"bot@{open_registry(url).push(adapter, 'bot', tags=['v1']).digest}"
    context = multiprocessing.get_context("fork")
    allowed = {"push": {"ok", "ConflictError"}, "rm": {"ok", "ConflictError", "NotFoundError"}}
    for _ in range(ROUNDS):
        barrier, results = context.Barrier(4), context.Queue()
        jobs = [("push", str(adapter))] * 2 + [("rm", ref)] * 2
        workers = [context.Process(target=_race_worker, args=(url, *job, barrier, results)) for job in jobs]
        for worker in workers:
            worker.start()
        outcomes = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
        assert [w.exitcode for w in workers] == [0, 0, 0, 0]
        assert all(outcome in allowed[action] for action, outcome in outcomes), outcomes
        _assert_sound(url)

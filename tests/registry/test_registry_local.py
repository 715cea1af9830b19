"""The registry on the local-directory backend: round trips, tags, crash safety, races, cache, gc, verify."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from loraswap import paths
from loraswap.errors import ConflictError, IntegrityError, InvalidArgumentError, NotFoundError
from loraswap.models import base_fingerprint, resolve_base
from loraswap.registry import Registry, open_registry
from loraswap.registry.layout import tag_document
from loraswap.registry.local_store import LocalStore


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _blob_paths(root: Path) -> list[Path]:
    return sorted((root / "blobs" / "sha256").iterdir())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def reg(root: Path) -> Registry:
    return open_registry(f"file://{root}")


def test_push_pull_round_trip_is_byte_identical(reg: Registry, make_adapter, tmp_path: Path) -> None:
    adapter = make_adapter()
    manifest = reg.push(adapter, "support-bot", tags=["prod"], description="first")
    pulled = reg.pull("support-bot:prod", tmp_path / "out")
    assert _files(pulled) == _files(adapter)
    cached = reg.pull(f"support-bot@{manifest.digest}")
    assert cached == paths.adapter_cache_dir() / manifest.hex
    assert _files(cached) == _files(adapter)
    assert (manifest.rank, manifest.alpha, manifest.target_modules) == (8, 16.0, ("q_proj", "v_proj"))
    assert manifest.description == "first" and manifest.base_fingerprint is None


def test_digest_is_stable_and_first_annotations_kept(reg: Registry, make_adapter, tmp_path: Path) -> None:
    first = reg.push(make_adapter(), "a", description="one")
    copy = shutil.copytree(make_adapter(), tmp_path / "copy")
    os.utime(copy / "adapter_model.safetensors", (1, 1))  # timestamps are not content
    again = reg.push(copy, "a", description="two")
    assert again.digest == first.digest and again.description == "one"
    assert reg.push(make_adapter(), "other-name").digest == first.digest
    assert reg.push(make_adapter(seed=2), "a").digest != first.digest


def test_manifest_records_base_and_training(reg: Registry, make_adapter, tiny_base: Path, tmp_path) -> None:
    adapter = shutil.copytree(make_adapter(), tmp_path / "a")
    lineage = {"dataset": "faq-v3", "base": "tiny", "metrics": {"eval_loss": 1.25}}
    (adapter / "training_metadata.json").write_text(json.dumps(lineage))
    base = resolve_base(tiny_base)
    manifest = reg.push(adapter, "bot", base=base)
    resolved = reg.resolve("bot")
    assert resolved.training == lineage
    assert resolved.base_fingerprint == base_fingerprint(tiny_base)
    assert resolved.base_model_id == base.model_id
    assert "training_metadata.json" in [f.path for f in manifest.files]


def test_resolve_errors(reg: Registry, make_adapter) -> None:
    with pytest.raises(NotFoundError, match="adapter 'nope' not found"):
        reg.resolve("nope")
    reg.push(make_adapter(), "bot")
    with pytest.raises(NotFoundError, match="tag bot:prod not found"):
        reg.resolve("bot:prod")
    with pytest.raises(NotFoundError, match="version"):
        reg.resolve("bot@sha256:" + "1" * 64)
    with pytest.raises(InvalidArgumentError):
        reg.resolve("../etc")


def test_tags_list_untag_and_rm(reg: Registry, make_adapter) -> None:
    v1 = reg.push(make_adapter(), "bot", tags=["prod"])
    v2 = reg.push(make_adapter(seed=2), "bot")
    assert reg.resolve("bot").digest == v2.digest and reg.resolve("bot:prod").digest == v1.digest
    listed = {e.manifest.digest: e.tags for e in reg.list("bot")}
    assert listed == {v1.digest: ("prod",), v2.digest: ("latest",)}
    reg.tag(f"bot@{v2.digest}", "prod")
    assert reg.resolve("bot:prod").digest == v2.digest
    with pytest.raises(ConflictError, match="tagged latest, prod; untag it or use --force"):
        reg.rm("bot")
    reg.rm(f"bot@{v1.digest}")  # untagged now: allowed
    reg.untag("bot", "prod")
    with pytest.raises(NotFoundError):
        reg.untag("bot", "prod")
    reg.rm("bot", force=True)
    with pytest.raises(NotFoundError):
        reg.list("bot")
    assert reg.list() == [] and reg.verify() == []


class _CrashBeforeManifest(LocalStore):
    """A real local store whose process "dies" right after the blobs were written."""

    def put_if_absent(self, key, data, progress=None):
        if "/manifests/" in key:
            raise RuntimeError("killed")
        return super().put_if_absent(key, data, progress)


class _CrashBeforeTag(LocalStore):
    def compare_and_swap(self, key, data, expected):
        if key.endswith("/tags/prod"):
            raise RuntimeError("killed")
        return super().compare_and_swap(key, data, expected)


def test_killed_push_leaves_no_version_and_no_moved_tag(root: Path, make_adapter) -> None:
    v1 = Registry(LocalStore(root)).push(make_adapter(), "bot", tags=["prod"])
    with pytest.raises(RuntimeError):
        Registry(_CrashBeforeManifest(root)).push(make_adapter(seed=2), "bot", tags=["prod"])
    reg = Registry(LocalStore(root))
    assert [e.manifest.digest for e in reg.list("bot")] == [v1.digest]
    assert reg.resolve("bot").digest == reg.resolve("bot:prod").digest == v1.digest
    assert len(_blob_paths(root)) == 4  # the half-push's weights blob exists but nothing refers to it
    assert reg.gc(grace_seconds=3600).kept_young == 1
    assert reg.gc(grace_seconds=0).removed and reg.verify() == []


def test_push_killed_between_tags_leaves_complete_version(root: Path, make_adapter) -> None:
    with pytest.raises(RuntimeError):
        Registry(_CrashBeforeTag(root)).push(make_adapter(), "bot", tags=["prod"])
    reg = Registry(LocalStore(root))
    assert reg.resolve("bot").files  # latest moved first, to a complete version
    with pytest.raises(NotFoundError):
        reg.resolve("bot:prod")
    assert reg.verify() == []


def test_concurrent_pushes_to_one_tag(root: Path, make_adapter) -> None:
    adapters = [make_adapter(seed=1), make_adapter(seed=2)]
    barrier = threading.Barrier(2)
    results, errors = [], []

    def push(folder: Path) -> None:
        barrier.wait()
        try:
            results.append(Registry(LocalStore(root)).push(folder, "bot", tags=["prod"]))
        except ConflictError as exc:  # allowed outcome, never a silent loss
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(a,)) for a in adapters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2
    reg = Registry(LocalStore(root))
    digests = {m.digest for m in results}
    assert {e.manifest.digest for e in reg.list("bot")} == digests
    assert reg.resolve("bot:prod").digest in digests and reg.resolve("bot").digest in digests
    assert reg.verify() == []


def test_cas_never_loses_an_update(root: Path) -> None:
    """Eight threads increment one counter by read + compare-and-swap; every increment survives."""
    store = LocalStore(root)
    store.compare_and_swap("counter", b"0", None)

    threads = [threading.Thread(target=_increment_in, args=(store, 25)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.get("counter") == b"200"


def test_stale_cas_raises_conflict(root: Path) -> None:
    store = LocalStore(root)
    etag = store.compare_and_swap("t", b"a", None)
    assert store.read("t") == (b"a", etag)
    store.compare_and_swap("t", b"b", etag)  # another writer wins
    with pytest.raises(ConflictError):
        store.compare_and_swap("t", b"c", etag)
    with pytest.raises(ConflictError):
        store.compare_and_swap("t", b"c", None)
    with pytest.raises(ConflictError):
        store.delete("t", expected=etag)
    assert store.get("t") == b"b"


class _RacingStore(LocalStore):
    """A real store with a second writer that moves the tag between our read and our write."""

    def __init__(self, root: Path, other_digest: str) -> None:
        super().__init__(root)
        self.other_digest = other_digest

    def compare_and_swap(self, key, data, expected):
        if key.endswith("/tags/prod"):
            LocalStore(self.root).put(key, tag_document(self.other_digest))
        return super().compare_and_swap(key, data, expected)


def test_registry_tag_conflict_is_reported(root: Path, make_adapter) -> None:
    v1 = Registry(LocalStore(root)).push(make_adapter(), "bot", tags=["prod"])
    v2 = Registry(LocalStore(root)).push(make_adapter(seed=2), "bot")
    racing = Registry(_RacingStore(root, v1.digest), tag_retries=0)
    with pytest.raises(ConflictError):
        racing.tag(f"bot@{v2.digest}", "prod")
    assert racing.resolve("bot:prod").digest == v1.digest  # the other writer's update is kept


def test_verify_finds_flipped_byte_and_pull_refuses_it(reg: Registry, root: Path, make_adapter) -> None:
    reg.push(make_adapter(), "bot")
    assert reg.verify() == []
    blob = max(_blob_paths(root), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    problems = reg.verify()
    assert any(f"blob sha256:{blob.name} is corrupt" in p for p in problems)
    assert any("bot@sha256:" in p and "adapter_model.safetensors is in corrupt blob" in p for p in problems)
    with pytest.raises(IntegrityError):
        reg.pull("bot")


def test_verify_finds_tampered_manifest_and_dangling_tag(reg: Registry, root: Path, make_adapter) -> None:
    manifest = reg.push(make_adapter(), "bot", tags=["prod"])
    path = root / "adapters" / "bot" / "manifests" / manifest.hex
    path.write_bytes(path.read_bytes().replace(b'"rank":8', b'"rank":9'))
    problems = reg.verify()
    assert any("does not match its content" in p for p in problems)
    assert any("tag bot:prod points at missing or corrupt version" in p for p in problems)
    with pytest.raises(IntegrityError):
        reg.resolve("bot")


def test_manifest_cannot_name_a_path_outside_the_folder(reg: Registry, root: Path, make_adapter) -> None:
    manifest = reg.push(make_adapter(), "bot")
    path = root / "adapters" / "bot" / "manifests" / manifest.hex
    path.write_bytes(path.read_bytes().replace(b'"path":"README.md"', b'"path":"../../evil"'))
    with pytest.raises(IntegrityError, match="bad file entry"):
        reg.pull(f"bot@{manifest.digest}")


def test_pull_cache_is_reused_and_repaired(reg: Registry, root: Path, make_adapter) -> None:
    adapter = make_adapter()
    reg.push(adapter, "bot")
    cached = reg.pull("bot")
    shutil.rmtree(root / "blobs")  # a second pull must not need the store's blobs
    assert reg.pull("bot") == cached and _files(cached) == _files(adapter)
    reg2 = open_registry(root)
    reg2.push(adapter, "bot")  # restores the blobs
    weights = cached / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert reg2.pull("bot") == cached and _files(cached) == _files(adapter)


def test_gc_keeps_young_and_referenced_blobs(reg: Registry, root: Path, make_adapter) -> None:
    reg.push(make_adapter(), "bot", tags=["prod"])
    old = reg.push(make_adapter(seed=2), "bot")
    reg.rm(f"bot@{old.digest}", force=True)
    assert len(_blob_paths(root)) == 4
    report = reg.gc(grace_seconds=60)
    assert report.removed == [] and report.kept_young == 1
    weights = next(f for f in old.files if f.path == "adapter_model.safetensors")
    long_ago = time.time() - 3600
    os.utime(root / "blobs" / "sha256" / weights.digest.split(":")[1], (long_ago, long_ago))
    report = reg.gc(grace_seconds=60)
    assert report.removed == [weights.digest] and report.freed_bytes == weights.size
    assert len(_blob_paths(root)) == 3
    assert reg.verify() == [] and reg.pull("bot:prod")


def test_reused_blob_is_touched_for_gc(reg: Registry, root: Path, make_adapter) -> None:
    manifest = reg.push(make_adapter(), "bot")
    reg.rm("bot", force=True)
    long_ago = time.time() - 3600
    for blob in _blob_paths(root):
        os.utime(blob, (long_ago, long_ago))
    reg.push(make_adapter(), "bot")  # reuses the old blobs: they must look young again
    assert reg.gc(grace_seconds=60).removed == []
    assert reg.resolve("bot").digest == manifest.digest


def test_default_registry_location(make_adapter, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reg = open_registry()
    assert reg.url == f"file://{paths.default_registry_dir()}"
    monkeypatch.setenv("LORASWAP_REGISTRY", str(tmp_path / "env-reg"))
    assert open_registry().url == f"file://{tmp_path / 'env-reg'}"


def test_looking_up_the_local_folders_creates_nothing(
    make_adapter, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``paths.*`` is a lookup (the engine asks for the cache folder per adapter per metrics scrape); a
    folder appears only once something is written into it."""
    home = tmp_path / "fresh-home"
    monkeypatch.setenv("LORASWAP_HOME", str(home))
    assert paths.home() == home
    found = [paths.models_dir(), paths.adapter_cache_dir(), paths.default_registry_dir()]
    assert found == [home / "models", home / "adapters", home / "registry"] and not home.exists()
    reg = open_registry()
    assert paths.default_registry_dir().is_dir() and not paths.adapter_cache_dir().exists()
    reg.push(make_adapter(), "bot")
    assert reg.pull("bot").parent == paths.adapter_cache_dir()


def test_digests_are_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    import hashlib

    from loraswap.registry.cache import file_digest
    from loraswap.trainer.data import file_sha256

    for size in (0, 1, (1 << 18) + 3, (1 << 20) * 2 + 1):  # around hashlib's and the old loops' buffers
        data = os.urandom(size)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert file_digest(path) == file_sha256(path) == "sha256:" + hashlib.sha256(data).hexdigest()


def test_verify_finds_a_manifest_whose_file_size_is_wrong(reg: Registry, make_adapter) -> None:
    import dataclasses

    from loraswap.registry.layout import manifest_key
    from loraswap.registry.manifest import Manifest

    good = reg.push(make_adapter(), "bot")
    files = tuple(
        dataclasses.replace(f, size=f.size + 1) if f.path == "adapter_model.safetensors" else f
        for f in good.files
    )
    fields = {f.name: getattr(good, f.name) for f in dataclasses.fields(Manifest) if f.name != "digest"}
    bad = Manifest.build(**{**fields, "files": files})
    assert reg.store.put_if_absent(manifest_key("bot", bad.digest), bad.to_bytes())
    assert reg.verify() == [f"bot@{bad.digest}: adapter_model.safetensors has the wrong size"]


def test_store_keys_cannot_escape(root: Path) -> None:
    store = LocalStore(root)
    for key in ("../x", "a/../../x", "/abs", "a//b", ".tmp/x", "a\\b"):
        with pytest.raises(InvalidArgumentError):
            store.put(key, b"x")


def test_any_peft_adapter_round_trips(reg: Registry, make_adapter, tiny_base: Path, tmp_path: Path) -> None:
    """All seven supported projections, rsLoRA, another rank: pushed and pulled unchanged."""
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapter = make_adapter(r=4, alpha=8.0, target_modules=targets, use_rslora=True)
    manifest = reg.push(adapter, "all-linear", base=resolve_base(tiny_base))
    assert manifest.target_modules == tuple(sorted(targets)) and manifest.use_rslora and manifest.rank == 4
    assert _files(reg.pull("all-linear", tmp_path / "out")) == _files(adapter)


def _increment(root: str, times: int) -> None:
    _increment_in(LocalStore(Path(root)), times)


def _increment_in(store: LocalStore, times: int) -> None:
    """Add 1 to ``counter`` ``times`` times by read + compare-and-swap, retrying on conflict."""
    for _ in range(times):
        while True:
            data, etag = store.read("counter")
            try:
                store.compare_and_swap("counter", str(int(data) + 1).encode(), etag)
                break
            except ConflictError:
                continue


def test_cas_across_processes(root: Path) -> None:
    """The flock-based compare-and-swap also holds between processes."""
    LocalStore(root).compare_and_swap("counter", b"0", None)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_increment, args=(str(root), 20)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    assert LocalStore(root).get("counter") == b"80"


class _KillBeforeManifest(LocalStore):
    def put_if_absent(self, key, data, progress=None):
        if "/manifests/" in key:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().put_if_absent(key, data, progress)


def _push_and_die(root: str, folder: str) -> None:
    Registry(_KillBeforeManifest(Path(root))).push(Path(folder), "bot", tags=["prod"])


def test_push_process_killed_halfway(root: Path, make_adapter) -> None:
    v1 = Registry(LocalStore(root)).push(make_adapter(), "bot", tags=["prod"])
    worker = multiprocessing.get_context("fork").Process(
        target=_push_and_die, args=(str(root), str(make_adapter(seed=2)))
    )
    worker.start()
    worker.join(timeout=60)
    assert worker.exitcode == -signal.SIGKILL
    reg = Registry(LocalStore(root))
    assert [e.manifest.digest for e in reg.list("bot")] == [v1.digest]
    assert reg.resolve("bot:prod").digest == reg.resolve("bot").digest == v1.digest
    assert reg.verify() == []


def test_a_verified_cache_folder_is_trusted_until_a_file_changes(
    reg: Registry, make_adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loraswap.registry.cache as cache

    adapter = make_adapter()
    manifest = reg.push(adapter, "bot")
    cached = reg.pull("bot")
    assert (cached.parent / f"{manifest.hex}.verified.json").is_file()
    assert sorted(p.name for p in cached.iterdir()) == sorted(e.path for e in manifest.files)

    hashed = []
    real_digest = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda path: hashed.append(path) or real_digest(path))
    assert reg.pull("bot") == cached and hashed == []  # unchanged since verified: no re-hash

    weights = cached / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, new content (and mtime)
    weights.write_bytes(bytes(data))
    assert reg.pull("bot") == cached
    assert hashed and _files(cached) == _files(adapter)  # re-hashed, found corrupt, fetched again
    hashed.clear()
    assert reg.pull("bot") == cached and hashed == []  # verified again

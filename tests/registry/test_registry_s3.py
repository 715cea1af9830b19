"""The registry on the S3 backend, against a real S3 API server (moto's server mode on 127.0.0.1; the
fixtures are in this folder's conftest.py).

moto 5.2 honours ``If-None-Match: *`` and ``If-Match`` on PutObject/DeleteObject, but checks the
condition and writes without a lock, so two truly simultaneous conditional writes can both pass there:
the conflict tests interleave writers deterministically instead of counting on its atomicity.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from loraswap import paths
from loraswap.errors import ConflictError, IntegrityError, NotFoundError
from loraswap.registry import Registry, open_registry, open_store
from loraswap.registry import s3_store as s3_module
from loraswap.registry.s3_store import S3Store

boto3 = pytest.importorskip("boto3")  # the [s3] extra; the GPU check runs without it


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _client(endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def _store(bucket: str, conditional: bool | None = None, **kwargs) -> S3Store:
    return S3Store(bucket, "reg", conditional=conditional, settle_seconds=0.01, **kwargs)


def _ignoring_client(endpoint: str):
    """A client whose conditional headers never reach the server: a store that ignores them."""
    client = _client(endpoint)

    def strip(request, **_kwargs) -> None:
        for header in ("If-None-Match", "If-Match"):
            if header in request.headers:
                del request.headers[header]

    client.meta.events.register("before-sign.s3", strip)
    return client


def test_probe_detects_conditional_writes(bucket: str, s3_endpoint: str) -> None:
    assert _store(bucket).conditional is True  # moto 5 honours If-None-Match / If-Match
    assert _store(bucket, client=_ignoring_client(s3_endpoint)).conditional is False
    assert open_store(f"s3://{bucket}/reg?conditional=false").conditional is False


def test_missing_bucket(bucket: str) -> None:
    with pytest.raises(NotFoundError):
        open_registry("s3://no-such-bucket-here/x")


@pytest.mark.parametrize("conditional", [True, False])
def test_round_trip_digest_and_verify(
    bucket: str, s3_endpoint: str, make_adapter, tmp_path, conditional
) -> None:
    reg = Registry(_store(bucket, conditional))
    adapter = make_adapter()
    manifest = reg.push(adapter, "bot", tags=["prod"])
    assert reg.push(adapter, "bot").digest == manifest.digest
    local = open_registry(tmp_path / "local").push(adapter, "bot")
    assert local.digest == manifest.digest  # same content, same digest on every backend
    assert _files(reg.pull("bot:prod", tmp_path / "out")) == _files(adapter)
    assert reg.verify() == []
    weights = next(f for f in manifest.files if f.path == "adapter_model.safetensors")
    key = "reg/blobs/sha256/" + weights.digest.split(":")[1]
    data = bytearray(adapter.joinpath(weights.path).read_bytes())
    data[100] ^= 0x01
    _client(s3_endpoint).put_object(Bucket=bucket, Key=key, Body=bytes(data))
    assert any(f"blob {weights.digest} is corrupt" in p for p in reg.verify())
    shutil.rmtree(paths.adapter_cache_dir())  # the verified cache would still serve the old pull
    with pytest.raises(IntegrityError):
        reg.pull(f"bot@{manifest.digest}", tmp_path / "again")


@pytest.mark.parametrize("conditional", [True, False])
def test_stale_cas_raises_conflict(bucket: str, conditional: bool) -> None:
    store = _store(bucket, conditional)
    etag = store.compare_and_swap("t", b"a", None)
    assert store.read("t") == (b"a", etag)
    store.compare_and_swap("t", b"b", etag)  # another writer wins
    for expected in (etag, None):
        with pytest.raises(ConflictError):
            store.compare_and_swap("t", b"c", expected)
    with pytest.raises(ConflictError):
        store.delete("t", expected=etag)
    assert store.get("t") == b"b"
    assert store.put_if_absent("t", b"d") is False and store.put_if_absent("u", b"d") is True


def test_fallback_read_back_sees_the_other_writer(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fallback mode: a writer that overwrites ours inside the settle window makes our CAS fail."""
    store = _store(bucket, conditional=False)
    etag = store.compare_and_swap("tag", b"v0", None)
    other = _store(bucket, conditional=False)

    def other_writer_meanwhile(_seconds: float) -> None:
        other.put("tag", b"theirs")

    monkeypatch.setattr(s3_module.time, "sleep", other_writer_meanwhile)
    with pytest.raises(ConflictError, match="another writer"):
        store.compare_and_swap("tag", b"ours", etag)
    monkeypatch.undo()
    assert store.get("tag") == b"theirs"


class _CrashBeforeManifest(S3Store):
    def put_if_absent(self, key, data, progress=None):
        if "/manifests/" in key:
            raise RuntimeError("killed")
        return super().put_if_absent(key, data, progress)


def test_killed_push_leaves_no_version(bucket: str, make_adapter) -> None:
    v1 = Registry(_store(bucket)).push(make_adapter(), "bot", tags=["prod"])
    with pytest.raises(RuntimeError):
        Registry(_CrashBeforeManifest(bucket, "reg")).push(make_adapter(seed=2), "bot", tags=["prod"])
    reg = Registry(_store(bucket))
    assert [e.manifest.digest for e in reg.list("bot")] == [v1.digest]
    assert reg.resolve("bot:prod").digest == reg.resolve("bot").digest == v1.digest
    assert reg.gc(grace_seconds=3600).kept_young == 1
    assert len(reg.gc(grace_seconds=0).removed) == 1
    assert reg.verify() == []


def test_concurrent_pushes_to_one_tag(bucket: str, make_adapter) -> None:
    adapters = [make_adapter(seed=1), make_adapter(seed=2)]
    barrier = threading.Barrier(2)
    results = []

    def push(folder: Path) -> None:
        reg = Registry(_store(bucket, conditional=True), tag_retries=20)
        barrier.wait()
        results.append(reg.push(folder, "bot", tags=["prod"]))

    threads = [threading.Thread(target=push, args=(a,)) for a in adapters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reg = Registry(_store(bucket))
    digests = {m.digest for m in results}
    assert len(digests) == 2
    assert {e.manifest.digest for e in reg.list("bot")} == digests
    assert reg.resolve("bot:prod").digest in digests and reg.resolve("bot").digest in digests
    assert reg.verify() == []


def test_rm_gc_and_touch(bucket: str, make_adapter) -> None:
    reg = Registry(_store(bucket))
    reg.push(make_adapter(), "bot", tags=["prod"])
    old = reg.push(make_adapter(seed=2), "bot")
    with pytest.raises(ConflictError):
        reg.rm(f"bot@{old.digest}")
    reg.rm(f"bot@{old.digest}", force=True)
    assert reg.gc(grace_seconds=3600).removed == []
    report = reg.gc(grace_seconds=0)
    assert len(report.removed) == 1 and reg.verify() == []
    before = reg.store.stat("blobs/sha256/" + old.files[0].digest.split(":")[1])
    reg.store.touch("blobs/sha256/" + old.files[0].digest.split(":")[1])
    after = reg.store.stat("blobs/sha256/" + old.files[0].digest.split(":")[1])
    assert before and after and after.modified >= before.modified
    assert _files(reg.pull("bot:prod")) == _files(make_adapter())


def test_large_blob_multipart_and_stale_upload_cleanup(bucket: str, tmp_path: Path) -> None:
    store = _store(bucket)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * 1024 * 1024))  # over boto3's 8 MiB multipart threshold
    seen = []
    assert store.put_if_absent("blobs/sha256/" + "a" * 64, big, seen.append) is True
    assert sum(seen) == big.stat().st_size
    assert store.get("blobs/sha256/" + "a" * 64) == big.read_bytes()
    store.client.create_multipart_upload(Bucket=bucket, Key="reg/blobs/sha256/" + "b" * 64)
    # moto reports a fixed 2010 'Initiated' time, so only the removal of an old upload is testable here
    assert store.remove_stale_temp(time.time()) == 1
    assert store.remove_stale_temp(time.time()) == 0


def test_listing_follows_pages(bucket: str) -> None:
    store = _store(bucket)
    store.page_size = 2
    for index in range(5):
        store.put(f"adapters/a/tags/t{index}", b"x")
    assert [info.key for info in store.list("adapters/")] == [f"adapters/a/tags/t{i}" for i in range(5)]


def test_cli_against_s3(bucket: str, make_adapter, tmp_path: Path, capsys) -> None:
    from loraswap.cli import main

    url = f"s3://{bucket}/cli"
    assert main(["registry", "--registry", url, "push", str(make_adapter()), "--name", "bot"]) == 0
    assert main(["registry", "--registry", url, "pull", "bot", str(tmp_path / "out")]) == 0
    assert main(["registry", "--registry", url, "verify"]) == 0
    assert _files(tmp_path / "out") == _files(make_adapter())
    assert main(["registry", "--registry", "s3://no-such-bucket-here", "list"]) == 1
    assert "not found" in capsys.readouterr().err


def test_touch_always_changes_the_etag(bucket: str) -> None:
    """gc deletes a blob only if its ETag is still the one it saw, so every touch must change it: a
    plain copy keeps the MD5 ETag, so touch alternates a one-part multipart copy and a plain copy."""
    store = _store(bucket)
    key = "blobs/sha256/" + "d" * 64
    store.put(key, b"blob content")
    seen = [store.stat(key)]
    for _ in range(3):
        store.touch(key)
        seen.append(store.stat(key))
        assert store.get(key) == b"blob content"  # the copy's checksum validates
    for before, after in itertools.pairwise(seen):
        assert after.version != before.version and after.modified >= before.modified


def test_touch_over_the_copy_limit_copies_in_parts(bucket: str) -> None:
    """An object over the single-copy limit (5 GiB on S3; lowered here) is copied with upload_part_copy,
    each time in a number of parts other than the last (so the ETag changes too)."""
    store = _store(bucket)
    store.copy_threshold = 1024 * 1024
    store.copy_part_size = s3_module.MIN_PART
    data = os.urandom(11 * 1024 * 1024)  # 5 + 5 + 1 MiB
    key = "blobs/sha256/" + "e" * 64
    store.put(key, data)
    before = store.stat(key)
    for parts in (3, 2, 3):
        store.touch(key)
        after = store.stat(key)
        assert after.version.strip('"').endswith(f"-{parts}") and after.version != before.version
        assert after.modified >= before.modified and after.size == len(data)
        assert store.get(key) == data
        before = after
    head = store.client.head_object(Bucket=bucket, Key="reg/" + key)
    assert "loraswap-touched" in head["Metadata"]


@pytest.mark.parametrize("size", [5 * 1024**3 + 1, 12 * 1024**3, 50 * 1024**3])
@pytest.mark.parametrize("parts_now", [0, 1, 2, 21, 48, 200])
def test_a_touch_over_5_gib_is_always_a_multipart_copy_of_other_parts(size: int, parts_now: int) -> None:
    step = s3_module._copy_step(size, parts_now, s3_module.COPY_LIMIT, 256 * 1024**2)
    count = -(-size // step)
    assert s3_module.MIN_PART <= step <= s3_module.COPY_LIMIT and count != parts_now and count <= 10_000

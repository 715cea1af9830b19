"""The registry against hostile and careless input (issue 16), with real files, on both backends.

A refusal is one line naming the problem, exit code 1, and the store byte for byte as it was.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import socket
import stat
import struct
from pathlib import Path

import pytest

from loraswap import paths
from loraswap.cli import main
from loraswap.errors import IntegrityError, InvalidArgumentError
from loraswap.registry import open_registry, open_store, parse_ref
from loraswap.registry.cache import cached_adapter_dir, file_digest
from loraswap.registry.layout import manifest_key
from loraswap.registry.local_store import LocalStore
from loraswap.registry.maintenance import collect_garbage
from loraswap.registry.store import check_key

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
SECRET = b"root:x:0:0:TOP SECRET, never to be pushed\n"


# -- helpers ------------------------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _snapshot(url: str) -> dict[str, bytes]:
    store = open_store(url)
    return {info.key: store.get(info.key) for info in store.list("")}


def _cli(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    code = main(["registry", "--registry", url, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys, url: str, *argv: str, reason: str) -> str:
    """Run a command that must be refused; check the contract and return stderr."""
    before = _snapshot(url)
    code, out, err = _cli(capsys, url, *argv)
    assert code == 1, (out, err)
    assert err.startswith("loraswap: error: ") and reason in err and err.count("\n") == 1, err
    assert _snapshot(url) == before
    return err


def _tree(root: Path) -> dict[Path, bytes | None]:
    """Every entry under ``root`` but LORASWAP_HOME (the cache), with a regular file's content."""
    return {
        p: (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in root.rglob("*")
        if "home" not in p.relative_to(root).parts
    }


def _push_refused(capsys, url: str, folder: Path, reason: str, *extra: str) -> str:
    """A push that validation refuses for one reason: "cannot push X: <reason>"."""
    return _refused(capsys, url, "push", str(folder), "--name", "bot", *extra, reason=reason)


def _raw_put(url: str, key: str, data: bytes, s3_client=None) -> None:
    """Write ``key`` behind the registry's back (another tool, an old version, an attacker)."""
    if url.startswith("file://"):
        path = Path(url.removeprefix("file://")) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        bucket, prefix = url.removeprefix("s3://").split("/", 1)
        s3_client().put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)


@pytest.fixture
def adapter(make_adapter, tmp_path: Path) -> Path:
    """A private, writable copy of a valid PEFT adapter (r=8, q_proj + v_proj)."""
    return Path(shutil.copytree(make_adapter(), tmp_path / "adapter"))


def _config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _write_config(folder: Path, text: str) -> None:
    (folder / "adapter_config.json").write_text(text)


def _split(weights: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + length]), weights[8 + length :]


def _join(header_text: str, data: bytes) -> bytes:
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


# -- push never reads through links or special files -----------------------------------------------


LINKED = ["README.md", "training_metadata.json", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("name", LINKED)
def test_push_refuses_a_link_out_of_the_folder(backend_url, adapter, tmp_path, capsys, name) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / name
    if (adapter / name).exists():  # a valid file, so that the link is the only problem
        shutil.move(adapter / name, target)
    else:
        target.write_bytes(SECRET)
    (adapter / name).symlink_to(target)
    _push_refused(capsys, backend_url, adapter, f"{name} is a symbolic link")
    assert _snapshot(backend_url) == {}


@pytest.mark.parametrize("kind", ["fifo", "socket", "device", "link-to-folder", "folder-as-readme"])
def test_push_refuses_what_is_not_a_regular_file(
    backend_url, adapter, tmp_path, capsys, monkeypatch, kind
) -> None:
    if kind == "fifo":  # never opened: reading a pipe would block the push
        os.mkfifo(adapter / "optimizer.pt")
        reason = "optimizer.pt is a named pipe"
    elif kind == "socket":
        monkeypatch.chdir(adapter)  # a short relative path: socket paths are limited to ~100 bytes
        server = socket.socket(socket.AF_UNIX)
        server.bind("ipc.sock")
        server.close()
        reason = "ipc.sock is a socket"
    elif kind == "device":
        try:
            os.mknod(adapter / "tokenizer.json", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null
        except PermissionError:
            pytest.skip("making a device node needs CAP_MKNOD")
        reason = "tokenizer.json is a device"
    elif kind == "link-to-folder":
        (tmp_path / "elsewhere").mkdir()
        (adapter / "checkpoint-1").symlink_to(tmp_path / "elsewhere")
        reason = "checkpoint-1 is a symbolic link"
    else:
        (adapter / "README.md").unlink()
        (adapter / "README.md").mkdir()
        reason = "README.md is a folder"
    _push_refused(capsys, backend_url, adapter, reason)


def test_a_store_never_reads_a_source_through_a_link(backend_url, adapter, tmp_path) -> None:
    """Behind validation, every upload opens its source without following a link: a file swapped for
    a link after validation is refused there too."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    link = tmp_path / "README.md"
    link.symlink_to(secret)
    store = open_store(backend_url)
    with pytest.raises(InvalidArgumentError, match="symbolic link"):
        store.put_if_absent("blobs/sha256/" + "a" * 64, link)
    with pytest.raises(InvalidArgumentError, match="symbolic link"):
        store.put("blobs/sha256/" + "b" * 64, link)
    with pytest.raises(InvalidArgumentError, match="symbolic link"):
        file_digest(link)
    assert _snapshot(backend_url) == {}


# -- pull into new or empty folders only; never through a link ---------------------------------------


@pytest.mark.parametrize(
    "case", ["file", "link-to-folder", "dangling-link", "not-empty", "link-inside", "below-a-file"]
)
def test_pull_refuses_a_dest_it_could_damage(backend_url, adapter, tmp_path, capsys, case) -> None:
    assert _cli(capsys, backend_url, "push", str(adapter), "--name", "bot")[0] == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(SECRET)
    dest = tmp_path / "dest"
    if case == "file":
        dest.write_bytes(SECRET)
        reason = "it is a regular file, not a folder"
    elif case == "link-to-folder":
        dest.symlink_to(outside)
        reason = "it is a symbolic link"
    elif case == "dangling-link":
        dest.symlink_to(tmp_path / "nowhere")
        reason = "it is a symbolic link"
    elif case == "not-empty":
        dest.mkdir()
        (dest / "adapter_config.json").write_bytes(SECRET)
        reason = "the folder is not empty"
    elif case == "link-inside":
        dest.mkdir()
        (dest / "README.md").symlink_to(outside / "keep.txt")
        reason = "the folder is not empty"
    else:
        (tmp_path / "plain").write_bytes(SECRET)
        dest = tmp_path / "plain" / "dest"
        reason = "is a file, not a folder"
    before = _tree(tmp_path)
    _refused(capsys, backend_url, "pull", "bot", str(dest), reason=reason)
    assert _tree(tmp_path) == before  # nothing written anywhere but the cache (under LORASWAP_HOME)
    assert not (tmp_path / "nowhere").exists()


def test_pull_into_a_new_or_an_empty_folder(backend_url, adapter, tmp_path, capsys) -> None:
    assert _cli(capsys, backend_url, "push", str(adapter), "--name", "bot")[0] == 0
    new = tmp_path / "a" / "b" / "new"
    assert _cli(capsys, backend_url, "pull", "bot", str(new))[0] == 0
    (tmp_path / "empty").mkdir()
    assert _cli(capsys, backend_url, "pull", "bot", str(tmp_path / "empty"))[0] == 0
    assert _files(new) == _files(tmp_path / "empty") == _files(adapter)


def test_pull_force_replaces_only_the_adapter_files(backend_url, adapter, tmp_path, capsys) -> None:
    (adapter / "training_metadata.json").write_text('{"dataset": "faq"}')
    assert _cli(capsys, backend_url, "push", str(adapter), "--name", "old")[0] == 0
    (adapter / "training_metadata.json").unlink()
    assert _cli(capsys, backend_url, "push", str(adapter), "--name", "bot")[0] == 0
    outside = tmp_path / "outside.txt"
    outside.write_bytes(SECRET)
    dest = tmp_path / "dest"
    assert _cli(capsys, backend_url, "pull", "old", str(dest))[0] == 0
    (dest / "notes.txt").write_text("mine")
    (dest / "README.md").unlink()
    (dest / "README.md").symlink_to(outside)  # a link at an adapter file's name: replaced, not followed
    code, _, err = _cli(capsys, backend_url, "pull", "bot", str(dest), "--force")
    assert code == 0, err
    assert outside.read_bytes() == SECRET
    assert not (dest / "README.md").is_symlink()
    assert _files(dest) == {**_files(adapter), "notes.txt": b"mine"}  # the old version's metadata is gone
    assert sorted(p.name for p in dest.iterdir()) == sorted([*_files(adapter), "notes.txt"])  # no temp left
    (dest / "README.md").unlink()
    (dest / "README.md").mkdir()
    _refused(capsys, backend_url, "pull", "bot", str(dest), "--force", reason="README.md in it is a folder")
    _refused(capsys, backend_url, "pull", "bot", "--force", reason="--force needs a DEST folder")


# -- every name, tag and reference pattern matches the whole string ----------------------------------


def test_names_tags_and_references_ending_in_a_newline_are_refused(backend_url, adapter, capsys) -> None:
    _refused(capsys, backend_url, "push", str(adapter), "--name", "good\n", reason="invalid adapter name")
    _push_refused(capsys, backend_url, adapter, "invalid tag", "--tag", "prod\n")
    code, out, _ = _cli(capsys, backend_url, "push", str(adapter), "--name", "good")
    assert code == 0
    digest = out.split("@", 1)[1].split()[0]
    for ref in ("good\n", "good:latest\n", f"good@{digest}\n", "good\n:latest"):
        _refused(capsys, backend_url, "pull", ref, reason="invalid")
        _refused(capsys, backend_url, "show", ref, reason="invalid")
    _refused(capsys, backend_url, "tag", "good", "prod\n", reason="invalid tag")
    _refused(capsys, backend_url, "untag", "good:latest\n", reason="invalid tag")
    for bad in ("good\n", "good:latest\n", f"good@{digest}\n"):
        with pytest.raises(InvalidArgumentError):
            parse_ref(bad)
    for key in ("a\n", "adapters/good\n/tags/latest"):
        with pytest.raises(InvalidArgumentError):
            check_key(key)
    code, out, _ = _cli(capsys, backend_url, "list")
    assert code == 0 and out.count("\n") == 2 and "good" in out


# -- loose checks ---------------------------------------------------------------------------------------


FINITE = "lora_alpha must be a positive finite number"
CONFIG_CASES = {  # name: (the field as JSON text, the reason given)
    "alpha-nan": ('"lora_alpha": NaN', FINITE),
    "alpha-inf": ('"lora_alpha": Infinity', FINITE),
    "alpha-minus-inf": ('"lora_alpha": -Infinity', FINITE),
    "alpha-overflow": ('"lora_alpha": 1e999', FINITE),
    "rslora-string": ('"use_rslora": "false"', "use_rslora must be true or false"),
    "dora-string": ('"use_dora": "false"', "use_dora must be true or false"),
    "alpha-pattern-string": ('"alpha_pattern": "q_proj"', "alpha_pattern must be an object"),
    "alpha-pattern-float": ('"alpha_pattern": 1.5', "alpha_pattern must be an object"),
    "alpha-pattern-value": ('"alpha_pattern": {"q_proj": "16"}', "alpha_pattern['q_proj'] must be a"),
    "alpha-pattern-nan": ('"alpha_pattern": {"q_proj": NaN}', "alpha_pattern['q_proj'] must be a"),
    "rank-pattern-string": ('"rank_pattern": "q_proj"', "rank_pattern must be an object"),
    "rank-pattern-list": ('"rank_pattern": [8]', "rank_pattern must be an object"),
    "rank-pattern-regex": ('"rank_pattern": {"(q_proj": 8}', "key '(q_proj' is not a valid regular"),
    "rank-pattern-flags": ('"rank_pattern": {"(?i)q_proj": 8}', "is not a valid regular expression"),
    "rank-pattern-str-value": ('"rank_pattern": {"q_proj": "8"}', "rank_pattern['q_proj'] must be a"),
    "rank-pattern-float-value": ('"rank_pattern": {"q_proj": 8.0}', "rank_pattern['q_proj'] must be a"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_loose_config_values_are_refused(backend_url, adapter, capsys, case) -> None:
    field, reason = CONFIG_CASES[case]
    doc = _config(adapter)
    doc.pop(field.split('"')[1], None)
    _write_config(adapter, json.dumps(doc)[:-1] + ", " + field + "}")  # NaN & co. are not json.dumps output
    _push_refused(capsys, backend_url, adapter, reason)


def test_loose_weights_are_refused(backend_url, adapter, capsys) -> None:
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    header, data = _split(weights)

    (adapter / "adapter_model.safetensors").write_bytes(_join("{}", b""))
    _push_refused(capsys, backend_url, adapter, "adapter_model.safetensors holds no tensors")

    twice = json.dumps(header)[:-1] + f", {json.dumps(Q_A)}: {json.dumps(header[Q_A])}}}"
    (adapter / "adapter_model.safetensors").write_bytes(_join(twice, data))
    _push_refused(capsys, backend_url, adapter, f"lists '{Q_A}' twice")

    (adapter / "adapter_model.safetensors").write_bytes(weights)
    doc = _config(adapter)
    _write_config(adapter, json.dumps({**doc, "target_modules": [*doc["target_modules"], "k_proj"]}))
    _push_refused(capsys, backend_url, adapter, "target module 'k_proj' has no tensors")


def test_max_bytes_must_be_a_positive_integer(backend_url, adapter, capsys, monkeypatch) -> None:
    push = ("push", str(adapter), "--name", "bot")
    for value in ("0", "-1"):
        reason = f"max_bytes must be a positive number of bytes, got {value}"
        _refused(capsys, backend_url, *push, "--max-bytes", value, reason=reason)
    monkeypatch.setenv("LORASWAP_MAX_ADAPTER_BYTES", "2GB")
    _refused(capsys, backend_url, *push, reason="$LORASWAP_MAX_ADAPTER_BYTES='2GB' is not a positive integer")
    monkeypatch.setenv("LORASWAP_MAX_ADAPTER_BYTES", "100")
    _push_refused(capsys, backend_url, adapter, "over the 100-byte limit")


def test_push_of_a_missing_folder_or_a_file_names_the_reason(backend_url, adapter, tmp_path, capsys) -> None:
    missing = tmp_path / "nope"
    _push_refused(capsys, backend_url, missing, f"{missing} does not exist")
    _push_refused(
        capsys, backend_url, adapter / "adapter_model.safetensors", "is a regular file, not a folder"
    )


def test_gc_with_no_grace_never_removes_a_write_in_progress(tmp_path: Path, adapter: Path) -> None:
    """A local push's temp file is locked by its writer: gc --grace 0 meanwhile leaves it alone (it
    used to delete it, and the push failed with a traceback); a killed writer's temp file still goes."""
    root = tmp_path / "registry"
    writer, gc_side = LocalStore(root), LocalStore(root)
    reports = []

    def gc_meanwhile(_count: int) -> None:
        if not reports:
            for temp in (root / ".tmp").iterdir():  # make the write look old as well
                os.utime(temp, (1, 1))
            reports.append(collect_garbage(gc_side, grace_seconds=0))

    weights = adapter / "adapter_model.safetensors"
    key = "blobs/sha256/" + file_digest(weights).split(":")[1]
    assert writer.put_if_absent(key, weights, gc_meanwhile) is True
    assert reports[0].temp_removed == 0
    assert writer.get(key) == weights.read_bytes()
    leftover = root / ".tmp" / "killed-writer"
    leftover.write_bytes(b"half")
    os.utime(leftover, (1, 1))
    assert collect_garbage(gc_side, grace_seconds=0).temp_removed == 1 and not leftover.exists()


@pytest.mark.parametrize("grace", ["-1", "nan", "inf"])
def test_gc_grace_must_be_finite_and_not_negative(backend_url, capsys, grace) -> None:
    _refused(capsys, backend_url, "gc", "--grace", grace, reason="gc grace must be")


# -- one bad entry never hides the rest --------------------------------------------------------------


def test_a_damaged_manifest_does_not_break_list_or_gc(backend_url, make_adapter, capsys) -> None:
    reg = open_registry(backend_url)
    bad = reg.push(make_adapter(), "bot")
    reg.push(make_adapter(seed=2), "other")
    gone = reg.push(make_adapter(seed=3), "gone")
    reg.rm("gone", force=True)
    key = manifest_key("bot", bad.digest)
    reg.store.put(key, reg.store.get(key).replace(b'"rank":8', b'"rank":9'))  # no longer its digest
    code, out, err = _cli(capsys, backend_url, "list")
    assert code == 1 and "other" in out and "bot" not in out, (out, err)
    assert f"loraswap: warning: bot@{bad.digest}" in err and "does not match its content" in err
    code, out, err = _cli(capsys, backend_url, "gc", "--grace", "0")
    assert code == 1 and f"bot@{bad.digest}" in err and "the blobs its bytes still name are kept" in err
    weights = next(f for f in gone.files if f.path == "adapter_model.safetensors")
    assert out.startswith("removed ") and not out.startswith("removed 0 ")  # the rest was collected
    assert reg.store.stat("blobs/sha256/" + weights.digest.split(":")[1]) is None
    for entry in bad.files:  # still named by the damaged manifest: kept
        assert reg.store.stat("blobs/sha256/" + entry.digest.split(":")[1]) is not None
    assert _files(reg.pull("other")) == _files(make_adapter(seed=2))


def test_keys_that_fit_no_layout_are_reported_and_skipped(backend_url, make_adapter, request, capsys) -> None:
    reg = open_registry(backend_url)
    manifest = reg.push(make_adapter(), "bot", tags=["prod"])
    data = reg.store.get(manifest_key("bot", manifest.digest))
    writer = request.getfixturevalue("s3_client") if backend_url.startswith("s3://") else None
    _raw_put(backend_url, "adapters/bot/manifests/" + "Z" * 64, data, writer)  # 64 characters, not hex
    _raw_put(backend_url, "adapters/bot/manifests/not-a-digest", data, writer)
    # what an old version let in (moto cannot route a key with a newline: an upper-case name there)
    bad_name = "good\n" if writer is None else "Good"
    _raw_put(backend_url, f"adapters/{bad_name}/tags/latest", b"{}", writer)
    _raw_put(backend_url, "adapters/bot/tags/broken", b'{"digest": "../../x"}', writer)
    problems = reg.verify()
    assert sum("is not a registry key" in p for p in problems) == 3
    assert "tag adapters/bot/tags/broken is unreadable: '../../x' is not a digest" in problems
    assert len(problems) == 4
    code, out, err = _cli(capsys, backend_url, "list")
    assert code == 1 and "latest,prod" in out and out.count("\n") == 2
    assert "'adapters/bot/manifests/not-a-digest' is not a manifest" in err
    assert _cli(capsys, backend_url, "show", "bot:prod")[0] == 0


# -- S3: multipart blobs and read errors --------------------------------------------------------------


@pytest.fixture
def big_adapter(adapter: Path) -> Path:
    """An adapter whose README is over boto3's 8 MiB multipart threshold (a multipart blob)."""
    (adapter / "README.md").write_bytes(random.Random(16).randbytes(9 << 20))
    return adapter


def test_pushing_a_multipart_blob_twice_keeps_it_readable(bucket, big_adapter, tmp_path, capsys) -> None:
    url = f"s3://{bucket}/reg"
    reg = open_registry(url)
    first = reg.push(big_adapter, "bot")
    assert reg.push(big_adapter, "bot").digest == first.digest  # the blobs exist: touched
    assert reg.verify() == []
    assert _files(reg.pull("bot", tmp_path / "out")) == _files(big_adapter)
    assert _cli(capsys, url, "verify")[0] == 0


def test_a_checksum_the_store_finds_wrong_is_an_integrity_error(
    bucket, big_adapter, s3_client, tmp_path, capsys
) -> None:
    url = f"s3://{bucket}/reg"
    reg = open_registry(url)
    manifest = reg.push(big_adapter, "bot")
    readme = next(f for f in manifest.files if f.path == "README.md")
    key = "reg/blobs/sha256/" + readme.digest.split(":")[1]
    source = {"Bucket": bucket, "Key": key}  # the old touch: a plain copy keeps the multipart checksum
    s3_client().copy_object(
        Bucket=bucket, Key=key, CopySource=source, Metadata={"t": "1"}, MetadataDirective="REPLACE"
    )
    problems = reg.verify()
    assert any(p.startswith(f"blob {readme.digest} cannot be read") and "checksum" in p for p in problems)
    assert any("file README.md is in corrupt blob" in p for p in problems)  # the rest still checked
    with pytest.raises(IntegrityError, match="checksum"):
        reg.pull("bot")
    code, _, err = _cli(capsys, url, "pull", "bot", str(tmp_path / "out"))  # (a snapshot cannot read it)
    assert code == 1 and err.startswith("loraswap: error: ") and "checksum" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    code, _, err = _cli(capsys, url, "verify")
    assert code == 1 and "Traceback" not in err
    reg.push(big_adapter, "bot")  # a re-push touches the blob: a fresh checksum repairs it
    assert reg.verify() == []


# -- the disk cache: damage that stat cannot see -----------------------------------------------------


def _damage_in_place(path: Path) -> None:
    """Change bytes inside the JSON header, keeping size, mtime and inode."""
    before = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(20)
        handle.write(b"\xff" * 20)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )


def test_pull_rehash_and_verify_cache(backend_url, adapter, capsys) -> None:
    reg = open_registry(backend_url)
    manifest = reg.push(adapter, "bot")
    cached = reg.pull("bot") / "adapter_model.safetensors"
    good = cached.read_bytes()
    _damage_in_place(cached)
    assert reg.pull("bot") == cached.parent and cached.read_bytes() != good  # trusted by its stats
    code, out, _ = _cli(capsys, backend_url, "pull", "bot", "--rehash")
    assert code == 0 and cached.read_bytes() == good

    _damage_in_place(cached)
    code, out, err = _cli(capsys, backend_url, "verify", "--cache")
    assert code == 1 and f"cached version {manifest.digest} was damaged and is removed" in out
    assert "damaged versions in" in err and not cached.parent.exists()
    code, out, _ = _cli(capsys, backend_url, "verify", "--cache")
    assert code == 0 and "ok (0 versions hashed)" in out
    assert reg.pull("bot") == cached.parent and cached.read_bytes() == good
    (cached.parent.parent / f"{manifest.hex}.manifest.json").unlink()  # a cache filled by an old version
    code, out, _ = _cli(capsys, backend_url, "verify", "--cache")
    assert code == 0 and "ok (1 versions hashed)" in out  # its manifest looked up in the registry


def _session_then(action: str, conn) -> None:
    from loraswap.registry.cache import CacheSession

    session = CacheSession.open()
    conn.send(session.unclean)
    if action == "die":
        os._exit(0)  # ends without close: what a crash or a kill leaves
    conn.recv()  # hold the session until told to close
    session.close()


def _in_child(action: str):
    parent, child = multiprocessing.Pipe()
    context = multiprocessing.get_context("fork")
    process = context.Process(target=_session_then, args=(action, child), daemon=True)
    process.start()
    return process, parent


def test_after_an_unclean_end_every_cached_version_is_hashed_before_use(adapter, tmp_path) -> None:
    from loraswap.registry.cache import CacheSession  # new with issue 16

    reg = open_registry(tmp_path / "registry")
    manifest = reg.push(adapter, "bot")
    cached = reg.pull("bot") / "adapter_model.safetensors"
    good = cached.read_bytes()

    with CacheSession.open() as session:  # a first, clean session
        assert session.unclean is False
    live, conn = _in_child("hold")  # another live server: not an unclean end
    assert conn.recv() is False
    with CacheSession.open() as session:
        assert session.unclean is False
    conn.send("close")
    live.join(timeout=60)
    assert live.exitcode == 0

    dead, conn = _in_child("die")
    assert conn.recv() is False
    dead.join(timeout=60)
    _damage_in_place(cached)  # e.g. pages lost at a power cut: the stats still look right
    assert reg.pull("bot") == cached.parent and cached.read_bytes() != good  # trusted by its stats
    with CacheSession.open() as session:
        assert session.unclean is True
        assert reg.pull("bot") == cached_adapter_dir(manifest.digest)
        assert cached.read_bytes() == good  # hashed, found damaged, fetched again before use
    with CacheSession.open() as session:
        assert session.unclean is False  # the stale session was cleared
    assert sorted(p.name for p in (paths.adapter_cache_dir() / ".sessions").iterdir()) == []

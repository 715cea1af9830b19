"""Merged models as a second artifact kind of the registry: push, list, show, pull, tag, rm, gc, verify on
both backends; strict folder validation that leaves nothing behind; adapter/model mix-ups refused with
the kind named; large files streamed by chunks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loraswap import paths
from loraswap.cli import main
from loraswap.errors import ConflictError, IntegrityError, InvalidArgumentError, NotFoundError
from loraswap.registry import Manifest, Registry, WrongKindError, open_registry
from loraswap.registry.manifest import MODEL, FileEntry, canonical_json
from loraswap.registry.validate_model import MERGE_RECORD, validate_model_dir

ADAPTER_DIGEST = "sha256:" + "a" * 64
BASE_FINGERPRINT = "sha256:" + "b" * 64
MIB = 1 << 20


def _record(**changes) -> dict:
    record = {
        "adapters": [
            {"ref": "bot:prod", "name": "bot", "digest": ADAPTER_DIGEST, "weight": 0.7},
            {
                "ref": "faq@" + "sha256:" + "c" * 64,
                "name": "faq",
                "digest": "sha256:" + "c" * 64,
                "weight": 0.3,
            },
        ],
        "method": "ties",
        "parameters": {"density": 0.5, "majority_sign_method": "total"},
        "base_model_id": "tiny-llama",
        "base_fingerprint": BASE_FINGERPRINT,
        "dtype": "fp32",
        "loraswap_version": "0.1.0",
        "created": "2025-01-01T00:00:00+00:00",
    }
    record.update(changes)
    return record


@pytest.fixture
def model_dir(tiny_base: Path, tmp_path: Path) -> Path:
    """A merged-model folder: the tiny Llama plus a hand-written merge record."""
    folder = shutil.copytree(tiny_base, tmp_path / "merged")
    (folder / MERGE_RECORD).write_text(json.dumps(_record()))
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _shard(folder: Path) -> Path:
    """Rewrite ``folder``'s weights as two shards with an index (as save_pretrained shards them)."""
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, shard)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _store_keys(reg: Registry) -> list[str]:
    return [info.key for info in reg.store.list("")]


# -- the round trip --------------------------------------------------------------------------------


def test_push_list_show_pull_on_both_backends(backend_url: str, model_dir: Path, tmp_path: Path) -> None:
    reg = open_registry(backend_url)
    manifest = reg.push_model(model_dir, "bot-merged:v1", "ties of bot and faq")
    assert manifest.kind == MODEL and manifest.name == "bot-merged"
    assert manifest.base_fingerprint == BASE_FINGERPRINT and manifest.base_model_id == "tiny-llama"
    assert manifest.model.architecture == "LlamaForCausalLM" and manifest.model.model_type == "llama"
    assert manifest.model.dtype == "float32" and manifest.model.num_hidden_layers == 2
    assert manifest.model.parameters == sum(
        t.numel() for t in load_file(str(model_dir / "model.safetensors")).values()
    )
    lineage = manifest.lineage
    assert [(a.digest, a.weight) for a in lineage.adapters] == [
        (ADAPTER_DIGEST, 0.7),
        ("sha256:" + "c" * 64, 0.3),
    ]
    assert lineage.method == "ties" and lineage.parameters == {
        "density": 0.5,
        "majority_sign_method": "total",
    }
    assert sorted(f.path for f in manifest.files) == sorted(os.listdir(model_dir))

    [entry] = reg.list()
    assert entry.manifest.kind == MODEL and entry.tags == ("latest", "v1")
    assert reg.resolve_model("bot-merged:v1") == manifest
    assert reg.resolve(f"bot-merged@{manifest.digest}", kind=None) == manifest
    # the same content gives the same digest on every backend, and pushing again keeps the first notes
    assert open_registry(tmp_path / "other").push_model(model_dir, "x").digest == manifest.digest
    assert reg.push_model(model_dir, "bot-merged").description == "ties of bot and faq"

    cached = reg.pull_model("bot-merged:v1")
    assert cached == paths.model_cache_dir() / manifest.hex and _files(cached) == _files(model_dir)
    assert not paths.adapter_cache_dir().exists()  # models never land in the adapter cache
    assert reg.pull("bot-merged", tmp_path / "out") == tmp_path / "out"
    assert _files(tmp_path / "out") == _files(model_dir)
    assert reg.verify() == []


def test_sharded_model_round_trip(backend_url: str, model_dir: Path, tmp_path: Path) -> None:
    reg = open_registry(backend_url)
    folder = _shard(model_dir)
    manifest = reg.push_model(folder, "sharded")
    assert {"model-00001-of-00002.safetensors", "model.safetensors.index.json"} <= {
        f.path for f in manifest.files
    }
    assert _files(reg.pull_model("sharded", tmp_path / "out")) == _files(folder)


def test_adapter_digests_are_unchanged() -> None:
    """An adapter manifest has no kind field: its digest is the one it had before models existed."""
    manifest = Manifest.build(
        name="bot",
        files=(
            FileEntry("adapter_model.safetensors", "sha256:" + "1" * 64, 10),
            FileEntry("adapter_config.json", "sha256:" + "2" * 64, 3),
        ),
        rank=8,
        alpha=16.0,
        target_modules=("q_proj", "v_proj"),
        use_rslora=False,
        dtype="float32",
        base_model_id="tiny",
        base_fingerprint="sha256:" + "3" * 64,
        created="2024-01-01T00:00:00+00:00",
        training={"steps": 3},
    )
    assert manifest.digest == "sha256:eea6c5e35b061bc8ab0d4683131c1af503cea759f600dd0e4f51fcf9f614634f"
    assert "kind" not in manifest.content() and manifest.kind == "adapter"
    assert Manifest.from_bytes(manifest.to_bytes(), manifest.digest).kind == "adapter"


def test_stored_model_manifest_is_not_trusted(model_dir: Path, tmp_path: Path) -> None:
    manifest = open_registry(tmp_path / "reg").push_model(model_dir, "m")
    assert Manifest.from_bytes(manifest.to_bytes(), manifest.digest) == manifest
    doc = json.loads(manifest.to_bytes())

    def tampered(change) -> bytes:
        copy = json.loads(json.dumps(doc))
        change(copy["content"])
        return canonical_json(copy)

    bad = [
        lambda c: c["model"].update(parameters="12"),
        lambda c: c["model"].update(hidden_size=True),
        lambda c: c.update(kind="adapter"),
        lambda c: c["files"].append({"path": "../evil.py", "digest": ADAPTER_DIGEST, "size": 1}),
        lambda c: c["files"].append(dict(c["files"][0])),
        lambda c: c["lineage"]["adapters"][0].update(digest="sha256:xyz"),
        lambda c: c["lineage"].update(method=""),
        lambda c: c.pop("model"),
    ]
    for change in bad:
        with pytest.raises(IntegrityError):
            Manifest.from_bytes(tampered(change))


# -- tags, rm, gc, verify ----------------------------------------------------------------------------


def test_tags_move_and_rm(model_dir: Path, tmp_path: Path) -> None:
    reg = open_registry(tmp_path / "reg")
    v1 = reg.push_model(model_dir, "m:prod")
    (model_dir / "README.md").write_text("second version\n")
    v2 = reg.push_model(model_dir, "m")
    assert v1.digest != v2.digest
    assert reg.resolve_model("m").digest == v2.digest and reg.resolve_model("m:prod").digest == v1.digest
    assert reg.tag("m", "prod").digest == v2.digest
    assert reg.resolve_model("m:prod").digest == v2.digest
    assert reg.rm(f"m@{v1.digest}").digest == v1.digest  # untagged: no --force needed
    with pytest.raises(NotFoundError):
        reg.resolve_model(f"m@{v1.digest}")
    with pytest.raises(ConflictError, match="is tagged latest, prod"):
        reg.rm("m")
    reg.rm("m", force=True)
    with pytest.raises(NotFoundError, match="model 'm' not found"):
        reg.resolve_model("m")


def test_gc_keeps_referenced_model_blobs(model_dir: Path, tmp_path: Path) -> None:
    reg = open_registry(tmp_path / "reg")
    kept = reg.push_model(model_dir, "kept")
    (model_dir / "README.md").write_text("only in the removed version\n")
    gone = reg.push_model(model_dir, "gone")
    only_gone = {f.digest for f in gone.files} - {f.digest for f in kept.files}
    assert len(only_gone) == 1
    reg.rm("gone", force=True)
    blobs = tmp_path / "reg" / "blobs" / "sha256"
    for blob in blobs.iterdir():
        os.utime(blob, (time.time() - 7200,) * 2)
    report = reg.gc(grace_seconds=3600)
    assert set(report.removed) == only_gone and report.problems == []
    assert {"sha256:" + p.name for p in blobs.iterdir()} == {f.digest for f in kept.files}
    assert reg.verify() == []
    (model_dir / "README.md").unlink()  # the kept version was pushed without it
    assert _files(reg.pull_model("kept", tmp_path / "out")) == _files(model_dir)


def test_verify_detects_a_corrupt_model_blob(model_dir: Path, tmp_path: Path) -> None:
    reg = open_registry(tmp_path / "reg")
    manifest = reg.push_model(model_dir, "m")
    weights = next(f for f in manifest.files if f.path == "model.safetensors")
    blob = tmp_path / "reg" / "blobs" / "sha256" / weights.digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    problems = reg.verify()
    assert any(f"blob {weights.digest} is corrupt" in p for p in problems)
    assert any("file model.safetensors is in corrupt blob" in p for p in problems)
    with pytest.raises(IntegrityError):
        reg.pull_model("m")


def test_verify_cache_covers_the_model_cache(model_dir: Path, tmp_path: Path) -> None:
    reg = open_registry(tmp_path / "reg")
    manifest = reg.push_model(model_dir, "m")
    cached = reg.pull_model("m")
    assert reg.verify_cache().intact == [manifest.digest]
    config = cached / "config.json"
    stats = config.stat()
    config.write_bytes(config.read_bytes().replace(b"llama", b"LLAMA"))
    os.utime(config, ns=(stats.st_atime_ns, stats.st_mtime_ns))  # damage stat cannot see
    report = reg.verify_cache()
    assert report.removed == [manifest.digest] and not cached.exists()
    assert _files(reg.pull_model("m")) == _files(model_dir)


def test_pull_force_replaces_only_model_files(model_dir: Path, tmp_path: Path) -> None:
    reg = open_registry(tmp_path / "reg")
    reg.push_model(model_dir, "m")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    (dest / "model-00001-of-00002.safetensors").write_text("a stale shard of another version")
    with pytest.raises(InvalidArgumentError, match="replace the model's files"):
        reg.pull("m", dest)
    reg.pull("m", dest, force=True)
    assert (dest / "notes.txt").read_text() == "mine"
    assert not (dest / "model-00001-of-00002.safetensors").exists()
    assert {n: b for n, b in _files(dest).items() if n != "notes.txt"} == _files(model_dir)


# -- kind mix-ups ------------------------------------------------------------------------------------


def test_adapter_and_model_references_are_not_mixed(make_adapter, model_dir: Path, tmp_path: Path) -> None:
    reg = open_registry(tmp_path / "reg")
    reg.push(make_adapter(), "bot")
    model = reg.push_model(model_dir, "bot-merged")
    for ref in ("bot-merged", "bot-merged:latest", f"bot-merged@{model.digest}"):
        with pytest.raises(
            WrongKindError, match=f"{ref} is a merged model, not an adapter; serve it with --route"
        ):
            reg.resolve(ref)  # the adapter path (the server's adapter manager)
    with pytest.raises(WrongKindError, match="bot is an adapter, not a merged model") as info:
        reg.resolve_model("bot")
    assert (info.value.kind, info.value.expected) == ("adapter", "model")
    with pytest.raises(WrongKindError, match="bot is an adapter"):
        reg.pull_model("bot", tmp_path / "never")
    assert not (tmp_path / "never").exists() and not paths.model_cache_dir().exists()
    # a name holds one kind: neither push may take the other's name
    with pytest.raises(
        InvalidArgumentError, match="bot holds adapters; a merged model needs a name of its own"
    ):
        reg.push_model(model_dir, "bot:merged")
    with pytest.raises(InvalidArgumentError, match="bot-merged holds merged models; an adapter needs"):
        reg.push(make_adapter(), "bot-merged", tags=["x"])
    assert {e.manifest.name: e.tags for e in reg.list()} == {"bot": ("latest",), "bot-merged": ("latest",)}
    assert reg.verify() == []


def test_adapter_manager_refuses_a_model_reference(model_dir: Path, tmp_path: Path) -> None:
    """The server's adapter manager resolves through the adapter path: a model ref fails naming the kind."""
    from loraswap.server.adapters.manager import AdapterManager
    from loraswap.server.adapters.reader import BaseShape
    from loraswap.server.engine.api import NullObserver
    from loraswap.server.lora.layer import install_lora_layers

    reg = open_registry(tmp_path / "reg")
    reg.push_model(model_dir, "merged")
    root = nn.Module()
    root.q_proj = nn.Linear(8, 8, bias=False)
    _, layers = install_lora_layers(root, 1, 4, torch.float32)
    base = BaseShape({n: (m.in_features, m.out_features) for n, m in layers.items()}, 4, "tiny")
    manager = AdapterManager(
        registry_factory=lambda: reg,
        base=base,
        layers=layers,
        num_slots=1,
        host_budget=1 << 20,
        dtype=torch.float32,
        tag_ttl_s=60.0,
        workers=1,
        observer=NullObserver(),
    )
    try:
        with pytest.raises(WrongKindError, match="merged is a merged model, not an adapter"):
            manager.request("merged").result(timeout=60)
    finally:
        manager.close()


def test_racing_pushes_of_both_kinds_to_a_new_name(
    make_adapter, model_dir: Path, tmp_path, monkeypatch
) -> None:
    """An adapter pushed under the name between the model push's name check and its manifest: the model
    push takes its manifest back and fails; the name keeps one kind."""
    reg = open_registry(tmp_path / "reg")
    real_check = reg._first_kind

    raced: list[bool] = []

    def check_then_race(name: str):
        kind = real_check(name)  # the name is new here ...
        if not raced:
            raced.append(True)
            reg.push(make_adapter(), name)  # ... and another writer's adapter lands now
        return kind

    monkeypatch.setattr(reg, "_first_kind", check_then_race)
    with pytest.raises(ConflictError, match="bot holds adapters"):
        reg.push_model(model_dir, "bot")
    monkeypatch.undo()
    assert [e.manifest.kind for e in reg.list("bot")] == ["adapter"] and reg.verify() == []


# -- refused folders ------------------------------------------------------------------------------------


def _pickle(folder: Path) -> None:
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")


def _symlink(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to("/etc/passwd")


def _missing_shard(folder: Path) -> None:
    _shard(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()


def _unindexed_shard(folder: Path) -> None:
    _shard(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v.startswith("model-00001")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _wrong_shard_map(folder: Path) -> None:
    _shard(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(k for k, v in sorted(index["weight_map"].items()) if v.startswith("model-00001"))
    index["weight_map"][first] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _bad_header(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + data[8:])


BAD_FOLDERS = {
    "pickle weights": (_pickle, "pytorch_model.bin is a pickle file"),
    "symbolic link": (_symlink, "tokenizer.json is a symbolic link"),
    "missing shard": (
        _missing_shard,
        "names shard model-00002-of-00002.safetensors, which is not in the folder",
    ),
    "shard not in the index": (_unindexed_shard, "shard model-00002-of-00002.safetensors is not named by"),
    "tensor in another shard": (_wrong_shard_map, "which does not hold it"),
    "broken config.json": (lambda f: (f / "config.json").write_text("{"), "config.json is not valid JSON"),
    "config without model_type": (
        lambda f: (f / "config.json").write_text('{"hidden_size": 8}'),
        "model_type must be a non-empty string",
    ),
    "record not JSON": (lambda f: (f / MERGE_RECORD).write_text("[1,"), f"{MERGE_RECORD} is not valid JSON"),
    "record NaN weight": (
        lambda f: (f / MERGE_RECORD).write_text(json.dumps(_record()).replace("0.7", "NaN")),
        f"{MERGE_RECORD} is not valid JSON",
    ),
    "record bad digest": (
        lambda f: (f / MERGE_RECORD).write_text(
            json.dumps(_record(adapters=[{"digest": "abc", "weight": 1}]))
        ),
        "adapters[0].digest must be sha256:",
    ),
    "record without method": (
        lambda f: (f / MERGE_RECORD).write_text(json.dumps(_record(method=None))),
        "method must be a non-empty string",
    ),
    "unknown file": (
        lambda f: (f / "modeling_evil.py").write_text("import os"),
        "modeling_evil.py is not a file",
    ),
    "sub-folder": (lambda f: (f / "checkpoint-1").mkdir(), "checkpoint-1 is a folder"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no weights: model.safetensors"),
    "no tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer"),
    "bad safetensors header": (_bad_header, "model.safetensors is not a readable safetensors file"),
    "weights twice": (
        lambda f: shutil.copy(f / "model.safetensors", f / "model-00001-of-00001.safetensors"),
        "both model.safetensors and sharded weights",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_model_folder_is_refused_and_leaves_nothing(case: str, model_dir: Path, tmp_path: Path) -> None:
    spoil, problem = BAD_FOLDERS[case]
    spoil(model_dir)
    reg = open_registry(tmp_path / "reg")
    with pytest.raises(InvalidArgumentError, match="cannot push") as info:
        reg.push_model(model_dir, "m")
    assert any(problem in p for p in info.value.problems), info.value.problems
    assert _store_keys(reg) == [] and os.listdir(tmp_path / "reg" / ".tmp") == []


def test_every_problem_is_reported_at_once(model_dir: Path, tmp_path: Path) -> None:
    _pickle(model_dir)
    (model_dir / "config.json").write_text("{")
    reg = open_registry(tmp_path / "reg")
    with pytest.raises(InvalidArgumentError) as info:
        reg.push_model(model_dir, "Bad:Name:x")
    text = str(info.value)
    assert (
        "invalid adapter name 'Bad'" in text and "pickle" in text and "config.json is not valid JSON" in text
    )
    with pytest.raises(InvalidArgumentError, match="push takes NAME or NAME:TAG"):
        reg.push_model(model_dir, "m@sha256:" + "0" * 64)
    assert _store_keys(reg) == []


def test_model_without_merge_record(model_dir: Path, tmp_path: Path) -> None:
    (model_dir / MERGE_RECORD).unlink()
    manifest = open_registry(tmp_path / "reg").push_model(model_dir, "plain")
    assert manifest.lineage is None and manifest.base_fingerprint is None and manifest.kind == MODEL


# -- large files stream -----------------------------------------------------------------------------


def _big_model(folder: Path, tiny_base: Path, size: int) -> Path:
    """A model folder whose one weight file holds a ``size``-byte F32 tensor (a sparse file: fast to
    make, read like any other)."""
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_base / name, folder / name)
    header = json.dumps({"w": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(folder / "model.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        out.truncate(8 + len(header) + size)
    return folder


def test_large_model_file_is_never_read_whole(tiny_base: Path, tmp_path: Path) -> None:
    """Push and pull of a weight file far larger than the chunk size: Python's peak allocation stays a
    small fraction of the file (a whole-file read would allocate at least its size)."""
    size = 48 * MIB
    folder = _big_model(tmp_path / "big", tiny_base, size)
    assert validate_model_dir(folder).info.parameters == size // 4
    reg = open_registry(tmp_path / "reg")
    tracemalloc.start()
    try:
        manifest = reg.push_model(folder, "big")
        _, push_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = reg.pull_model("big", tmp_path / "out")
        _, pull_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert push_peak < size / 8 and pull_peak < size / 8, (push_peak, pull_peak)
    weights = next(f for f in manifest.files if f.path == "model.safetensors")
    with open(out / "model.safetensors", "rb") as handle:
        assert "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest() == weights.digest


def test_large_model_file_goes_to_s3_as_a_multipart_upload(
    bucket: str, tiny_base: Path, tmp_path: Path, s3_client
) -> None:
    size = 20 * MIB  # over boto3's multipart threshold (8 MiB)
    folder = _big_model(tmp_path / "big", tiny_base, size)
    reg = open_registry(f"s3://{bucket}/reg")
    manifest = reg.push_model(folder, "big")
    weights = next(f for f in manifest.files if f.path == "model.safetensors")
    head = s3_client().head_object(Bucket=bucket, Key=f"reg/blobs/sha256/{weights.digest.split(':')[1]}")
    assert "-" in head["ETag"] and head["ContentLength"] == weights.size  # "<md5>-<parts>": multipart
    out = reg.pull_model("big", tmp_path / "out")
    with open(out / "model.safetensors", "rb") as handle:
        assert "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest() == weights.digest
    assert reg.verify() == []


# -- the CLI ---------------------------------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["registry", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_push_model_list_show_pull(
    make_adapter, model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("LORASWAP_REGISTRY", str(tmp_path / "reg"))
    code, out, err = _run(capsys, "push", "--model", str(model_dir), "bot-merged:v1", "--description", "ties")
    assert code == 0 and out.startswith("pushed model bot-merged@sha256:") and "tags: latest, v1" in out, err
    assert _run(capsys, "push", str(make_adapter()), "--name", "bot")[0] == 0
    code, out, _ = _run(capsys, "list")
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["NAME", "KIND", "DIGEST"]
    assert {row.split()[0]: row.split()[1] for row in rows} == {"bot": "adapter", "bot-merged": "model"}
    code, out, _ = _run(capsys, "list", "--json")
    assert {row["name"]: row["kind"] for row in json.loads(out)} == {"bot": "adapter", "bot-merged": "model"}
    code, out, _ = _run(capsys, "show", "bot-merged:v1")
    assert code == 0 and "kind:             model" in out and "LlamaForCausalLM (llama)" in out
    assert "ties" in out and f"0.7 x bot:prod {ADAPTER_DIGEST}" in out and BASE_FINGERPRINT in out
    code, out, _ = _run(capsys, "show", "bot", "--json")
    assert json.loads(out)["kind"] == "adapter"
    shown = json.loads(_run(capsys, "show", "bot-merged", "--json")[1])
    assert (
        shown["kind"] == "model"
        and shown["lineage"]["method"] == "ties"
        and shown["model"]["dtype"] == "float32"
    )
    code, out, _ = _run(capsys, "pull", "bot-merged:v1", str(tmp_path / "out"))
    assert code == 0 and _files(tmp_path / "out") == _files(model_dir)
    assert _run(capsys, "verify")[0] == 0


def test_cli_refusals(make_adapter, model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LORASWAP_REGISTRY", str(tmp_path / "reg"))
    _run(capsys, "push", "--model", str(model_dir), "merged")
    code, _, err = _run(capsys, "push", str(make_adapter()), "--name", "merged")
    assert (
        code == 1 and err.startswith("loraswap: error: cannot push") and "merged holds merged models" in err
    )
    code, _, err = _run(capsys, "push", "--model", str(model_dir), "m", "--base", "default")
    assert code == 1 and "--base applies to adapters" in err
    code, _, err = _run(capsys, "push", "--model", str(model_dir))
    assert code == 1 and "needs the model's NAME[:TAG]" in err
    code, _, err = _run(capsys, "push", str(model_dir))
    assert code == 1 and "push needs DIR --name NAME" in err
    (model_dir / "config.json").write_text("{")
    code, _, err = _run(capsys, "push", "--model", str(model_dir), "other")
    assert code == 1 and "config.json is not valid JSON" in err
    assert "other" not in _run(capsys, "list")[1]

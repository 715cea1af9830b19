"""The one shard lister: a folder's weight files as its index names them; fingerprints stay as recorded.

``base_fingerprint`` values are stored in registry manifests: for an ordinary folder (one file, or
indexed shards) the value must never change, so it is pinned here (computed before the lister existed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from loraswap.merge.builder import _shards
from loraswap.models import base_fingerprint
from loraswap.models.fingerprint import weight_shapes
from loraswap.models.weight_files import INDEX_FILE, SINGLE_FILE, weight_files

TINY_FINGERPRINT = "sha256:e5f64ca0936892e64ec13716a07990943019f309820f9d4ba5b582fa7d20be69"
"""``base_fingerprint`` of the tiny Llama (default sizes), single-file or sharded, as recorded before."""
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _sharded(tiny_base: Path, folder: Path) -> Path:
    """The tiny Llama as two indexed shards (as save_pretrained writes them)."""
    shutil.copytree(tiny_base, folder)
    tensors = load_file(str(folder / SINGLE_FILE))
    (folder / SINGLE_FILE).unlink()
    names = sorted(tensors)
    weight_map = {}
    for shard, keys in zip(SHARDS, (names[::2], names[1::2]), strict=True):
        save_file({k: tensors[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, shard)
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


def _with_consolidated(folder: Path, source: Path) -> Path:
    """Add a Mistral-style ``consolidated.safetensors``: the same tensors under other names."""
    tensors = load_file(str(source / SINGLE_FILE))
    renamed = {
        name.replace("model.", "").replace("self_attn.", "attention."): t for name, t in tensors.items()
    }
    save_file(renamed, str(folder / "consolidated.safetensors"))
    return folder


def test_ordinary_folders_keep_their_recorded_fingerprint(tiny_base: Path, tmp_path: Path) -> None:
    assert base_fingerprint(tiny_base) == TINY_FINGERPRINT
    assert base_fingerprint(_sharded(tiny_base, tmp_path / "sharded")) == TINY_FINGERPRINT


def test_a_consolidated_file_beside_indexed_shards_is_not_counted(tiny_base: Path, tmp_path: Path) -> None:
    plain = _sharded(tiny_base, tmp_path / "plain")
    mistral = _with_consolidated(_sharded(tiny_base, tmp_path / "mistral"), tiny_base)
    assert weight_files(mistral) == [mistral / shard for shard in SHARDS]
    assert _shards(mistral) == list(SHARDS)  # the merge streams (and writes) the same files
    assert weight_shapes(mistral) == weight_shapes(plain) == weight_shapes(tiny_base)  # each tensor once
    assert base_fingerprint(mistral) == base_fingerprint(plain) == TINY_FINGERPRINT


def test_without_an_index(tiny_base: Path, tmp_path: Path) -> None:
    single = _with_consolidated(Path(shutil.copytree(tiny_base, tmp_path / "single")), tiny_base)
    assert weight_files(single) == [single / SINGLE_FILE]
    loose = Path(shutil.copytree(tiny_base, tmp_path / "loose"))
    (loose / SINGLE_FILE).rename(loose / "weights-b.safetensors")
    save_file({}, str(loose / "weights-a.safetensors"))
    assert weight_files(loose) == [loose / "weights-a.safetensors", loose / "weights-b.safetensors"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert weight_files(empty) == []
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights"):
        weight_shapes(empty)

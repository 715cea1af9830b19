"""The one-read safetensors reader: the same tensors as safetensors itself, and clear errors."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError as SafetensorsSafeError
from safetensors.torch import load_file, save_file

from loraswap.server.adapters.safetensors_buffer import (
    SafetensorsError,
    _layout,
    read_tensor_file,
)
from loraswap.server.lora.bits import tensor_bits


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_matches_safetensors_for_mixed_dtypes_and_shares_one_buffer(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(4, 6).to(torch.bfloat16),
        "b": torch.randn(3).to(torch.float16),
        "c": torch.randn(2, 2, 2),
        "d": torch.arange(5, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    loaded = read_tensor_file(tmp_path / "x.safetensors")
    expected = load_file(str(tmp_path / "x.safetensors"))
    assert loaded.tensors.keys() == expected.keys() and loaded.metadata == {"format": "pt"}
    for key, tensor in expected.items():
        assert loaded.tensors[key].dtype == tensor.dtype
        assert torch.equal(loaded.tensors[key], tensor)
    storages = {t.untyped_storage().data_ptr() for t in loaded.tensors.values() if t.numel()}
    assert storages == {loaded.buffer.untyped_storage().data_ptr()}  # views, no per-tensor copies
    assert loaded.uniform_dtype() is None and loaded.all_finite()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_all_finite_finds_one_bad_value_in_a_uniform_file(tmp_path: Path, bad: float, dtype) -> None:
    tensors = {f"t{i}": torch.randn(16, 8).to(dtype) for i in range(5)}
    save_file(tensors, str(tmp_path / "ok.safetensors"))
    assert read_tensor_file(tmp_path / "ok.safetensors").all_finite()
    tensors["t3"][7, 2] = bad
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    loaded = read_tensor_file(tmp_path / "bad.safetensors")
    assert loaded.uniform_dtype() == dtype and not loaded.all_finite()


def test_unaligned_offsets_are_copied_not_refused(tmp_path: Path) -> None:
    data = b"\x00" + torch.tensor([1.5, -2.0], dtype=torch.float32).numpy().tobytes()
    header = {
        "pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "x": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
    }
    loaded = read_tensor_file(_write_raw(tmp_path / "u.safetensors", header, data))
    assert loaded.tensors["x"].tolist() == [1.5, -2.0]


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8), "do not hold"),
        ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "do not hold"),
        ({"x": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, bytes(1), "unsupported"),
        ({"x": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4), "malformed"),
        ({"x": "F32"}, bytes(4), "malformed"),
        ({"__metadata__": ["format", "pt"]}, b"", "__metadata__ is not a JSON object"),
        (
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            bytes(8),
            "overlap",
        ),
    ],
)
def test_malformed_headers_are_refused_with_the_reason(tmp_path: Path, header, data, message) -> None:
    with pytest.raises(SafetensorsError, match=message):
        read_tensor_file(_write_raw(tmp_path / "bad.safetensors", header, data))


def _f32(begin: int, count: int) -> dict:
    return {"dtype": "F32", "shape": [count], "data_offsets": [begin, begin + 4 * count]}


REFUSED_LAYOUTS = {  # layouts safetensors itself refuses ("invalid offset", "not fully covered")
    "gap between tensors": ({"x": _f32(0, 1), "y": _f32(8, 1)}, 12, "'y' begins at 8: a gap"),
    "first not at 0": ({"x": _f32(4, 1)}, 8, "'x' begins at 4: a gap"),
    "trailing bytes": ({"x": _f32(0, 1)}, 8, "end at byte 4 of a data section of 8 bytes"),
    "no tensors, some data": ({}, 4, "end at byte 0 of a data section of 4 bytes"),
    "overlap": ({"x": _f32(0, 2), "y": _f32(4, 1)}, 8, "overlap"),
    "empty tensor in a gap": (
        {"x": _f32(0, 1), "z": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}},
        8,
        "'z' begins at 8: a gap",
    ),
}
ACCEPTED_LAYOUTS = {
    "keys out of offset order": ({"y": _f32(4, 1), "x": _f32(0, 1)}, 8),
    "empty tensors between and at the end": (
        {
            "x": _f32(0, 1),
            "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},
            "y": _f32(4, 1),
            "w": {"dtype": "BF16", "shape": [2, 0], "data_offsets": [8, 8]},
        },
        8,
    ),
    "only empty tensors": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, 0),
    "no tensors": ({"__metadata__": {"format": "pt"}}, 0),
}


@pytest.mark.parametrize("case", REFUSED_LAYOUTS)
def test_layouts_safetensors_refuses_are_refused(tmp_path: Path, case: str) -> None:
    header, size, message = REFUSED_LAYOUTS[case]
    path = _write_raw(tmp_path / "bad.safetensors", header, bytes(size))
    with pytest.raises(SafetensorsSafeError):
        load_file(str(path))
    for mapped in (False, True):
        with pytest.raises(SafetensorsError, match=message):
            read_tensor_file(path, mapped=mapped)


@pytest.mark.parametrize("case", ACCEPTED_LAYOUTS)
def test_layouts_safetensors_accepts_are_read_the_same(tmp_path: Path, case: str) -> None:
    header, size = ACCEPTED_LAYOUTS[case]
    data = torch.arange(size // 4, dtype=torch.float32).numpy().tobytes()
    path = _write_raw(tmp_path / "ok.safetensors", header, data)
    expected = load_file(str(path))
    loaded = read_tensor_file(path, mapped=True)
    assert loaded.tensors.keys() == expected.keys()
    for key, tensor in expected.items():
        assert loaded.tensors[key].dtype == tensor.dtype and torch.equal(loaded.tensors[key], tensor)
    assert loaded.all_finite()


def test_truncated_and_non_json_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "short").write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="too short"):
        read_tensor_file(tmp_path / "short")
    (tmp_path / "long").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(SafetensorsError, match="does not fit"):
        read_tensor_file(tmp_path / "long")
    (tmp_path / "text").write_bytes(struct.pack("<Q", 3) + b"abc")
    with pytest.raises(SafetensorsError, match="not JSON"):
        read_tensor_file(tmp_path / "text")


@pytest.mark.parametrize("mapped", [False, True])
def test_malformed_files_are_refused_when_mapped_too(tmp_path: Path, mapped: bool) -> None:
    header = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    with pytest.raises(SafetensorsError, match="do not hold"):
        read_tensor_file(_write_raw(tmp_path / "bad.safetensors", header, bytes(8)), mapped=mapped)


def test_mapped_read_matches_and_writes_never_reach_the_file(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.randn(32, 40).to(torch.bfloat16) for i in range(3)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    before = path.read_bytes()
    loaded = read_tensor_file(path, mapped=True)
    for key, tensor in tensors.items():
        assert torch.equal(loaded.tensors[key], tensor)
        assert np.array_equal(loaded.bits(key), tensor_bits(tensor))  # numpy views of the same bits
    loaded.tensors["t1"].mul_(3.0)  # private: this copies the touched pages only
    assert torch.equal(loaded.tensors["t1"], tensors["t1"] * 3.0)
    assert path.read_bytes() == before
    assert torch.equal(read_tensor_file(path, mapped=True).tensors["t1"], tensors["t1"])


def test_a_file_replaced_by_rename_leaves_mapped_tensors_intact(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.arange(4096, dtype=torch.float32)}, str(path))
    loaded = read_tensor_file(path, mapped=True)
    save_file({"x": torch.zeros(4096)}, str(tmp_path / "new.safetensors"))
    os.replace(tmp_path / "new.safetensors", path)  # how the registry's disk cache updates a folder
    assert torch.equal(loaded.tensors["x"], torch.arange(4096, dtype=torch.float32))


def test_a_header_layout_is_parsed_once_for_files_that_share_it(tmp_path: Path) -> None:
    shapes = {"a": (8, 16), "b": (16, 8)}
    first = {k: torch.randn(*s) for k, s in shapes.items()}
    second = {k: torch.randn(*s) for k, s in shapes.items()}
    save_file(first, str(tmp_path / "1.safetensors"))
    save_file(second, str(tmp_path / "2.safetensors"))
    save_file({"a": torch.randn(8, 17)}, str(tmp_path / "3.safetensors"))
    _layout.cache_clear()
    one = read_tensor_file(tmp_path / "1.safetensors")
    two = read_tensor_file(tmp_path / "2.safetensors", mapped=True)
    assert (_layout.cache_info().misses, _layout.cache_info().hits) == (1, 1)
    assert one.header == two.header
    for key in shapes:  # one layout, each file's own data
        assert torch.equal(one.tensors[key], first[key]) and torch.equal(two.tensors[key], second[key])
    read_tensor_file(tmp_path / "3.safetensors")
    assert _layout.cache_info().misses == 2


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_mapped_files_hold_no_file_descriptor(tmp_path: Path) -> None:
    """A host tier of thousands of mapped adapters must not run into the open-files limit."""
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.randn(2048)}, str(path))
    before = len(os.listdir("/proc/self/fd"))
    kept = [read_tensor_file(path, mapped=True) for _ in range(64)]
    assert len(os.listdir("/proc/self/fd")) - before < 8
    assert all(torch.equal(k.tensors["x"], kept[0].tensors["x"]) for k in kept)


def test_a_file_system_that_cannot_map_gets_a_plain_read(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.randn(64)}, str(path))

    def cannot_map(*args, **kwargs):
        raise RuntimeError("unable to mmap 1024 bytes from file: No such device (19)")

    monkeypatch.setattr(torch, "from_file", cannot_map)
    loaded = read_tensor_file(path, mapped=True)
    assert torch.equal(loaded.tensors["x"], load_file(str(path))["x"])

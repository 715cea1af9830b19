"""The one safetensors header reader: its rules, and every caller that reads a header going through it.

A key listed twice is the reader's own refusal (the safetensors library keeps one of the two), so a
caller that refuses it reads headers here; the serving path used to keep the last one silently.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraswap.adapter_format import ADAPTER_WEIGHTS
from loraswap.errors import AdapterValidationError, InvalidArgumentError
from loraswap.models.fingerprint import weight_shapes
from loraswap.registry.validate import validate_adapter_dir
from loraswap.registry.validate_model import validate_model_dir
from loraswap.safetensors_header import (
    DTYPES,
    MAX_PROBLEMS,
    WEIGHT_FLOATS,
    SafetensorsError,
    dtype_label,
    parse_header,
    read_header,
    read_header_file,
)
from loraswap.server.adapters.reader import AdapterReader, BaseShape
from loraswap.server.adapters.safetensors_buffer import read_tensor_file

ROOT = Path(__file__).resolve().parents[1]


def _f32(begin: int, count: int) -> dict:
    return {"dtype": "F32", "shape": [count], "data_offsets": [begin, begin + 4 * count]}


def _file(header: str | bytes, data: bytes) -> bytes:
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + data


def _twice(header: dict, key: str) -> str:
    """``header`` as JSON with ``key`` listed a second time (last)."""
    return json.dumps(header)[:-1] + f", {json.dumps(key)}: {json.dumps(header[key])}}}"


def _with_duplicate(path: Path) -> None:
    """Rewrite the safetensors file at ``path`` with its first key listed twice (same entry)."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    key = next(k for k in header if k != "__metadata__")
    path.write_bytes(_file(_twice(header, key), blob[8 + length :]))


def test_a_saved_file_is_read_as_safetensors_writes_it(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.zeros(4), "c": torch.zeros(0, 2)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    header = read_header_file(tmp_path / "x.safetensors")
    assert header.shapes() == {"a": [2, 3], "b": [4], "c": [0, 2]} and header.metadata == {"format": "pt"}
    assert header.entries["a"].dtype == "BF16" and header.entries["a"].torch_dtype == torch.bfloat16
    assert header.entries["b"].end - header.entries["b"].begin == 16
    size = (tmp_path / "x.safetensors").stat().st_size
    assert header.data_start + max(e.end for e in header.entries.values()) == size


def test_the_one_dtype_table_matches_torch() -> None:
    for name, dtype in DTYPES.items():
        assert dtype.torch_dtype.itemsize == dtype.itemsize, name
    assert set(WEIGHT_FLOATS) <= set(DTYPES)
    assert [dtype_label(d) for d in ("BF16", "F32", "I32", "F8_E4M3")] == [
        "bfloat16",
        "float32",
        "I32",
        "F8_E4M3",
    ]


BAD_HEADERS = {
    "key twice": (_twice({"x": _f32(0, 1), "y": _f32(4, 1)}, "x"), 8, "lists 'x' twice"),
    "begin after end": (
        json.dumps({"x": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}),
        4,
        "do not hold",
    ),
    "end past the data": (json.dumps({"x": _f32(0, 2)}), 4, "offsets 0..8 do not hold"),
    "span not the shape's bytes": (json.dumps({"x": {**_f32(0, 2), "shape": [3]}}), 8, "do not hold"),
    "negative offset": (
        json.dumps({"x": {**_f32(0, 1), "data_offsets": [-4, 0]}}),
        4,
        "malformed data_offsets",
    ),
    "overlap": (json.dumps({"x": _f32(0, 2), "y": _f32(4, 1)}), 8, "'x' and 'y' overlap"),
    "gap": (json.dumps({"x": _f32(0, 1), "y": _f32(8, 1)}), 12, "'y' begins at 8: a gap"),
    "trailing bytes": (json.dumps({"x": _f32(0, 1)}), 8, "end at byte 4 of a data section of 8 bytes"),
    "unsupported dtype": (json.dumps({"x": {**_f32(0, 1), "dtype": "Q4"}}), 4, "unsupported dtype 'Q4'"),
    "bool shape": (json.dumps({"x": {**_f32(0, 1), "shape": [True]}}), 4, "malformed shape"),
    "metadata not strings": (json.dumps({"__metadata__": {"a": 1}}), 0, "__metadata__ is not a JSON object"),
    "not an object": ("[]", 0, "not a JSON object"),
    "not JSON": ("{", 0, "not JSON"),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_bad_headers_are_refused_with_the_reason(case: str) -> None:
    header, size, message = BAD_HEADERS[case]
    with pytest.raises(SafetensorsError, match=re.escape(message)):
        parse_header(header.encode(), size)
    blob = _file(header, bytes(size))
    with pytest.raises(SafetensorsError, match=re.escape(message)):
        read_header(io.BytesIO(blob), len(blob))


def test_every_problem_is_listed_up_to_the_cap() -> None:
    header = {f"t{i}": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]} for i in range(MAX_PROBLEMS + 5)}
    with pytest.raises(SafetensorsError) as info:
        parse_header(json.dumps(header).encode(), 1)
    assert (
        len(info.value.problems) == MAX_PROBLEMS + 1 and info.value.problems[-1] == "... and 5 more problems"
    )


def test_lengths_that_do_not_fit_are_refused() -> None:
    with pytest.raises(SafetensorsError, match="too short"):
        read_header(io.BytesIO(b"\x01"), 1)
    blob = struct.pack("<Q", 1 << 40) + b"{}"
    with pytest.raises(SafetensorsError, match="does not fit"):
        read_header(io.BytesIO(blob), len(blob))


# -- every caller reads headers through the one reader ------------------------------------------------


@pytest.fixture
def adapter(make_adapter, tmp_path: Path) -> Path:
    return Path(shutil.copytree(make_adapter(), tmp_path / "adapter"))


def test_the_serving_reader_refuses_a_duplicate_key(adapter: Path) -> None:
    """Defect: the buffer path kept the last of two entries of one key silently."""
    _with_duplicate(adapter / ADAPTER_WEIGHTS)
    with pytest.raises(SafetensorsError, match=r"adapter_model\.safetensors: its header lists .* twice"):
        read_tensor_file(adapter / ADAPTER_WEIGHTS, mapped=True)
    reader = AdapterReader(BaseShape({}, 64, "tiny"), torch.float32)
    with pytest.raises(AdapterValidationError) as info:
        reader.read(adapter, "dup", "sha256:" + "0" * 64)
    assert any("twice" in p for p in info.value.problems)


def test_the_serving_reader_refuses_bad_offsets(adapter: Path) -> None:
    blob = (adapter / ADAPTER_WEIGHTS).read_bytes()
    (adapter / ADAPTER_WEIGHTS).write_bytes(blob + bytes(4))  # trailing bytes after the last tensor
    with pytest.raises(AdapterValidationError) as info:
        AdapterReader(BaseShape({}, 64, "tiny"), torch.float32).read(adapter, "x", "sha256:" + "0" * 64)
    assert any("the tensors end at byte" in p for p in info.value.problems)


def test_the_serving_reader_refuses_weights_that_are_not_floats(tmp_path: Path, adapter: Path) -> None:
    """The dtypes the one table adds (float8, unsigned) are refused as validation refuses them."""
    from safetensors.torch import load_file

    tensors = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(adapter / ADAPTER_WEIGHTS).items()}
    save_file(tensors, str(adapter / ADAPTER_WEIGHTS))
    with pytest.raises(AdapterValidationError) as info:
        AdapterReader(BaseShape({}, 64, "tiny"), torch.float32).read(adapter, "f8", "sha256:" + "0" * 64)
    assert any("has dtype F8_E4M3; LoRA weights must be floats" in p for p in info.value.problems)
    problems = _refusal(validate_adapter_dir, adapter)
    assert any("has dtype F8_E4M3; LoRA weights must be floats" in p for p in problems)


def _refusal(validate, folder: Path) -> list[str]:
    with pytest.raises((AdapterValidationError, InvalidArgumentError)) as info:
        validate(folder)
    return info.value.problems


def test_push_validation_refuses_a_duplicate_key(adapter: Path, tiny_base: Path, tmp_path: Path) -> None:
    _with_duplicate(adapter / ADAPTER_WEIGHTS)
    assert any("twice" in p for p in _refusal(validate_adapter_dir, adapter))
    model = Path(shutil.copytree(tiny_base, tmp_path / "model"))
    _with_duplicate(model / "model.safetensors")
    assert any(
        "model.safetensors is not a readable safetensors file" in p
        for p in _refusal(validate_model_dir, model)
    )


def test_base_shapes_and_the_merge_refuse_a_duplicate_key(tiny_base: Path, tmp_path: Path) -> None:
    """weight_shapes (fingerprints, route sizing, base checks) and the merge's dtype read the one reader."""
    from loraswap.merge.builder import _output_dtype
    from loraswap.models import resolve_base

    base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    assert _output_dtype(None, resolve_base(base)) == "float32"
    _with_duplicate(base / "model.safetensors")
    with pytest.raises(SafetensorsError, match=r"model\.safetensors: its header lists"):
        weight_shapes(base)
    config = json.loads((base / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):  # without them the merge reads the dtype off the header
        config.pop(key, None)
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(SafetensorsError, match="twice"):
        _output_dtype(None, resolve_base(base))


def test_no_other_table_of_safetensors_dtypes_remains() -> None:
    """Only the one reader maps safetensors dtype names (``"BF16": ...``); precision names differ."""
    keyed = re.compile(r"""["'](?:BF16|F8_E4M3|F16|I64)["']\s*:""")
    found = [
        str(path.relative_to(ROOT))
        for folder in ("loraswap", "registry", "server", "trainer", "bench")
        for path in (ROOT / folder).rglob("*.py")
        if keyed.search(path.read_text())
    ]
    assert found == ["loraswap/safetensors_header.py"]

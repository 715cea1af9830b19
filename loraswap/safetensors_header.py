"""The one safetensors header reader and the one table of safetensors dtypes.

A safetensors file is an 8-byte little-endian header length, a UTF-8 JSON header, then the data
section. The header is checked by the rules of the ``safetensors`` library itself: a length of at most
:data:`MAX_HEADER_BYTES` that fits the file; a JSON object; an optional ``__metadata__`` object of
strings; per tensor a known dtype, a shape of non-negative integers and ``data_offsets`` whose span is
exactly the shape's bytes; sorted by offset, the tensors tile the data section exactly (the first
begins at 0, each begins where the previous one ends, the last ends at the end of the data: no gap, no
overlap, no trailing bytes). Stricter than the library: a key listed twice is refused (a JSON parser
keeps one of the two silently). Anything else raises :class:`SafetensorsError` listing every problem.

Only the header is read here; torch is imported only when a torch dtype is asked for.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000
"""The safetensors library's own limit on the JSON header."""
MAX_PROBLEMS = 20
"""Most problems listed for one file (then a line counting the rest)."""


@dataclass(frozen=True)
class Dtype:
    """A safetensors dtype: the torch dtype that holds it and its bytes per element.

    Attributes:
        torch_name: Name of the torch dtype (``float32``…): ``getattr(torch, torch_name)``.
        itemsize: Bytes per element.
    """

    torch_name: str
    itemsize: int

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.torch_name)


DTYPES: dict[str, Dtype] = {
    "F64": Dtype("float64", 8),
    "F32": Dtype("float32", 4),
    "F16": Dtype("float16", 2),
    "BF16": Dtype("bfloat16", 2),
    "F8_E5M2": Dtype("float8_e5m2", 1),
    "F8_E4M3": Dtype("float8_e4m3fn", 1),
    "I64": Dtype("int64", 8),
    "I32": Dtype("int32", 4),
    "I16": Dtype("int16", 2),
    "I8": Dtype("int8", 1),
    "U64": Dtype("uint64", 8),
    "U32": Dtype("uint32", 4),
    "U16": Dtype("uint16", 2),
    "U8": Dtype("uint8", 1),
    "BOOL": Dtype("bool", 1),
}
"""safetensors dtype name → torch dtype and bytes per element: every dtype a header may name."""
WEIGHT_FLOATS = ("F16", "BF16", "F32", "F64")
"""The float dtypes LoRA weights may have (the ones the server reads and converts)."""


def dtype_label(name: str) -> str:
    """How a summary names a dtype: the torch name of a :data:`WEIGHT_FLOATS` dtype, else its own."""
    return DTYPES[name].torch_name if name in WEIGHT_FLOATS else name


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file.

    Attributes:
        problems: Every problem found (at most :data:`MAX_PROBLEMS`, then one counting the rest).
    """

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))

    def named(self, file_name: str) -> SafetensorsError:
        """The same problems, each prefixed with ``file_name``."""
        return SafetensorsError([f"{file_name}: {p}" for p in self.problems])


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checked header: what it holds and where it lies in the data section (bytes).

    Attributes:
        key: Tensor name.
        dtype: safetensors dtype name (a key of :data:`DTYPES`).
        shape: Dimensions.
        begin: Offset of its first byte in the data section.
        end: Offset past its last byte.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return DTYPES[self.dtype].itemsize

    @property
    def torch_name(self) -> str:
        """Name of the torch dtype that holds it (``bfloat16``…)."""
        return DTYPES[self.dtype].torch_name

    @functools.cached_property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        return DTYPES[self.dtype].torch_dtype

    @functools.cached_property
    def strides(self) -> tuple[int, ...]:
        """Row-major strides of :attr:`shape`, in elements."""
        strides, step = [], 1
        for dim in reversed(self.shape):
            strides.append(step)
            step *= max(dim, 1)
        return tuple(reversed(strides))


@dataclass(frozen=True)
class Header:
    """A checked header.

    Attributes:
        entries: Tensor name → entry, in the header's order.
        metadata: The ``__metadata__`` strings.
        data_start: Offset of the data section in the file.
    """

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int

    def shapes(self) -> dict[str, list[int]]:
        """Tensor name → shape (lists, as JSON and the manifests hold them)."""
        return {name: list(entry.shape) for name, entry in self.entries.items()}


def header_length(prefix: bytes, size: int) -> int:
    """The JSON header's length from a file's first 8 bytes (``prefix``), checked against its ``size``."""
    if size < 8:
        raise SafetensorsError(f"{size} bytes is too short for a safetensors file")
    if len(prefix) < 8:
        raise SafetensorsError("the file changed while it was read")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise SafetensorsError(f"header length {length} does not fit the {size}-byte file")
    return length


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise _DuplicateKey(key)
        doc[key] = value
    return doc


def _json_object(header: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(header, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise SafetensorsError(f"its header lists {str(exc)[:80]!r} twice") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SafetensorsError(f"the header is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise SafetensorsError("the header is not a JSON object")
    return doc


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(key: str, info: Any, data_size: int) -> TensorEntry | str:
    """One header entry checked as the safetensors library does, or why it is malformed."""
    if not isinstance(info, dict):
        return f"tensor {key!r} has a malformed entry"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        return f"tensor {key!r} has a malformed entry (no dtype)"
    if dtype not in DTYPES:
        return f"tensor {key!r} has an unsupported dtype {dtype[:40]!r}"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"tensor {key!r} has a malformed shape"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        return f"tensor {key!r} has malformed data_offsets"
    begin, end = offsets
    if begin > end or end > data_size or end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        return f"tensor {key!r} offsets {begin}..{end} do not hold a {dtype} tensor of shape {shape}"
    return TensorEntry(key, dtype, tuple(shape), begin, end)


def by_offset(entry: TensorEntry) -> tuple[int, int]:
    """Sort key of entries in data order."""
    return entry.begin, entry.end


def _tiling_problem(entries: list[TensorEntry], data_size: int) -> str | None:
    """Why entries sorted by offset do not tile the data section exactly, or None."""
    end, previous = 0, None
    for entry in entries:
        if entry.begin < end:
            return f"tensors {previous.key!r} and {entry.key!r} overlap"
        if entry.begin > end:
            after = f"after {previous.key!r} ends at {end}" if previous else "the data section begins at 0"
            return f"tensor {entry.key!r} begins at {entry.begin}: a gap ({after})"
        end, previous = entry.end, entry
    if end != data_size:
        return f"the tensors end at byte {end} of a data section of {data_size} bytes"
    return None


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    return [*problems[:MAX_PROBLEMS], f"... and {len(problems) - MAX_PROBLEMS} more problems"]


def parse_header(header: bytes, data_size: int) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The checked entries (in the header's order) and metadata of a JSON header, for a data section of
    ``data_size`` bytes.

    Raises:
        SafetensorsError: Every problem of the header (the module's rules).
    """
    doc = _json_object(header)
    problems = []
    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        problems.append("__metadata__ is not a JSON object of strings")
    entries = []
    for key, info in doc.items():
        entry = _entry(key, info, data_size)
        if isinstance(entry, str):
            problems.append(entry)
        else:
            entries.append(entry)
    if not problems and (tiling := _tiling_problem(sorted(entries, key=by_offset), data_size)):
        problems.append(tiling)
    if problems:
        raise SafetensorsError(_capped(problems))
    return {e.key: e for e in entries}, dict(metadata)


def read_header(handle: BinaryIO, size: int) -> Header:
    """The checked header of a safetensors file open as ``handle`` (at its start; ``size`` bytes).

    Raises:
        SafetensorsError: The header breaks the module's rules (every problem listed).
        OSError: The file cannot be read.
    """
    length = header_length(handle.read(8), size)
    header = handle.read(length)
    if len(header) != length:
        raise SafetensorsError("the file changed while it was read")
    entries, metadata = parse_header(header, size - 8 - length)
    return Header(entries, metadata, 8 + length)


def read_header_file(path: Path) -> Header:
    """:func:`read_header` of the file at ``path`` (links followed); problems name the file.

    Raises:
        SafetensorsError: The header breaks the module's rules.
        OSError: The file cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            return read_header(handle, os.fstat(handle.fileno()).st_size)
        except SafetensorsError as exc:
            raise exc.named(path.name) from None

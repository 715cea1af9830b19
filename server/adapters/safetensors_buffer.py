"""A safetensors file read with one ``readinto`` into one buffer; its tensors are views of that buffer.

The cold path of an adapter (local disk → host RAM) is then one read, no per-tensor copies, and one
NaN/Inf pass over the whole data section when every tensor shares a dtype. The header is checked
before any view is made by the one header reader, :mod:`loraswap.safetensors_header` (the rules of the
``safetensors`` library itself, and no key listed twice); a malformed file raises
:class:`~loraswap.safetensors_header.SafetensorsError` with the reasons.
"""

from __future__ import annotations

import functools
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraswap.finite import all_finite
from loraswap.safetensors_header import SafetensorsError, TensorEntry, by_offset, header_length, parse_header

__all__ = ["SafetensorsError", "TensorFile", "read_tensor_file"]


@dataclass
class TensorFile:
    """A whole file in memory.

    Attributes:
        buffer: The file's bytes (``[file size]`` uint8); every tensor of ``tensors`` is a view of it.
        data: The data section (``buffer`` past the header).
        tensors: Name → tensor (views, in the file's dtypes).
        metadata: The header's ``__metadata__`` (strings).
        header: The header's JSON bytes (equal bytes and data size mean an equal layout).
        entries: Name → where the tensor lies in ``data``.
        views_only: Every tensor that holds data is a view of ``data`` (no offset was unaligned for its
            dtype); empty tensors are fresh ones.
    """

    buffer: torch.Tensor
    data: torch.Tensor
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    header: bytes = b""
    entries: dict[str, TensorEntry] | None = None
    views_only: bool = False

    def bits(self, key: str) -> np.ndarray:
        """A numpy view of tensor ``key``'s bytes in ``data`` as integers of its element size (numpy
        has no bfloat16), made without going through torch (cheaper than a torch view, then numpy).
        The tensor's own bits when :attr:`views_only`."""
        entry = self.entries[key]
        return np.ndarray(entry.shape, _INT_OF_SIZE[entry.itemsize], self._data_array, entry.begin)

    @functools.cached_property
    def _data_array(self) -> np.ndarray:
        return self.data.numpy()

    def uniform_dtype(self) -> torch.dtype | None:
        """The one dtype of every tensor, or None when they differ (or there are none)."""
        dtypes = {t.dtype for t in self.tensors.values()}
        return dtypes.pop() if len(dtypes) == 1 else None

    def all_finite(self) -> bool:
        """Whether no tensor holds NaN or Inf (:func:`loraswap.finite.all_finite`; one pass over the
        data when dtypes agree)."""
        dtype = self.uniform_dtype()  # the tensors tile the data section (checked): one view covers them
        if dtype is not None and dtype.is_floating_point and self.data.storage_offset() % dtype.itemsize == 0:
            return all_finite(self.data.view(dtype))
        return all(all_finite(t) for t in self.tensors.values())


_INT_OF_SIZE = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def read_tensor_file(path: Path, mapped: bool = False) -> TensorFile:
    """Read ``path`` whole and return views of its tensors.

    The header's layout is parsed and checked once per distinct header (adapters trained with one
    config share it byte for byte), so reading a file costs one read and the views.

    Args:
        path: The file.
        mapped: Map the file instead of reading it (see :func:`_mapped_buffer`): no copy, no fresh
            memory. Writes to the tensors stay private (copy-on-write) and never reach the file.

    Raises:
        SafetensorsError: malformed header or offsets (every problem, each naming the file).
        OSError: the file cannot be read.
    """
    path = Path(path)
    size = path.stat().st_size
    buffer = _mapped_buffer(path, size) if mapped and size > 0 else _read_buffer(path, size)
    try:
        header, start = _header_bytes(buffer)
        data = buffer[start:]
        entries, metadata = _layout(header, data.numel())
    except SafetensorsError as exc:
        raise exc.named(path.name) from None
    tensors, views_only = _views(entries, data)
    return TensorFile(buffer, data, tensors, dict(metadata), header, {e.key: e for e in entries}, views_only)


def _mapped_buffer(path: Path, size: int) -> torch.Tensor:
    """The file mapped private: its pages are the page cache's, mapped on first read (cheaper than
    getting fresh memory and reading into it). Writable, so a write only copies that page and never
    reaches the file. ``torch.from_file`` keeps no file descriptor open (Python's ``mmap`` keeps one
    per mapping: a host tier of thousands of adapters would run out). The mapping lives as long as any
    view; a file replaced by rename (as the registry's disk cache does) leaves it intact. A file
    system that cannot map files (some network and FUSE mounts) gets a plain read instead."""
    try:
        return torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    except RuntimeError:
        return _read_buffer(path, size)


def _read_buffer(path: Path, size: int) -> torch.Tensor:
    buffer = _fresh_buffer(size)
    with open(path, "rb", buffering=0) as handle:
        got = handle.readinto(memoryview(buffer.numpy()))
    if got != size:
        raise SafetensorsError(f"{path.name}: read {got} of {size} bytes")
    return buffer


def _fresh_buffer(size: int) -> torch.Tensor:
    """``size`` bytes of memory whose pages are already mapped.

    Letting the ``read`` syscall fault fresh pages in from the kernel one by one is the slowest way;
    touching them first from user space is faster, and an anonymous ``mmap`` with ``MAP_POPULATE``
    (one kernel pass, no faults) faster still. The tensor keeps the mapping alive; it is unmapped when
    the last view is gone.
    """
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate and size >= mmap.PAGESIZE:
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
        return torch.frombuffer(region, dtype=torch.uint8)
    buffer = torch.empty(size, dtype=torch.uint8)
    buffer.numpy()[:: mmap.PAGESIZE] = 0  # fault the pages in from user space first
    return buffer


def _header_bytes(buffer: torch.Tensor) -> tuple[bytes, int]:
    """The JSON header of a file in ``buffer``, and where its data section begins."""
    length = header_length(bytes(buffer[:8].numpy()), buffer.numel())
    return bytes(buffer[8 : 8 + length].numpy()), 8 + length


Layout = tuple[tuple[TensorEntry, ...], tuple[tuple[str, str], ...]]  # entries by offset, sorted metadata


@functools.lru_cache(maxsize=64)
def _layout(header: bytes, data_size: int) -> Layout:
    """The checked entries (sorted by offset) and metadata of a header
    (:func:`~loraswap.safetensors_header.parse_header`), for a data section of ``data_size`` bytes.
    Cached (``lru_cache`` is thread-safe, and load workers read concurrently): the result depends on
    nothing else (errors name no file; the caller adds it; refusals are not cached)."""
    entries, metadata = parse_header(header, data_size)
    return tuple(sorted(entries.values(), key=by_offset)), tuple(sorted(metadata.items()))


def _views(entries: tuple[TensorEntry, ...], data: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors, and whether every one is a view of ``data`` (none had to be copied)."""
    aligned = data.data_ptr() % 8 == 0
    typed: dict[torch.dtype, torch.Tensor] = {}
    views = {}
    views_only = True
    for entry in entries:
        dtype, shape, size = entry.torch_dtype, entry.shape, entry.itemsize
        if entry.begin == entry.end:  # no bytes to view (and the data section may have none at all)
            views[entry.key] = torch.empty(shape, dtype=dtype)
        elif aligned and entry.begin % size == 0:
            if dtype not in typed:
                typed[dtype] = data[: data.numel() // size * size].view(dtype)
            base = typed[dtype]
            offset = base.storage_offset() + entry.begin // size  # as_strided counts from the storage
            views[entry.key] = base.as_strided(shape, entry.strides, offset)
        else:  # an unaligned offset (safetensors itself pads the header to 8 bytes): copy this one
            views[entry.key] = data[entry.begin : entry.end].clone().view(dtype).view(shape)
            views_only = False
    return views, views_only

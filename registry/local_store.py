"""The local-directory backend (the default registry): one file per key under a root folder.

Atomicity rules:

* every write goes to a temporary file under ``<root>/.tmp/`` first, then is published with
  ``os.replace`` (put) or ``os.link`` (put-if-absent: the link fails if the key exists), so a reader
  never sees a half-written object and a killed writer leaves only a temp file;
* compare-and-swap and conditional delete hold an exclusive ``fcntl.flock`` on a per-key lock file under
  ``<root>/.locks/`` while they compare and publish (works across threads and processes on one host);
* an object's etag is the sha256 of its content (tag files carry a per-write nonce, so no ABA).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from loraswap.errors import ConflictError, NotFoundError
from loraswap.registry.store import ObjectInfo, ObjectStore, Progress, check_key

_CHUNK = 1 << 20


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class LocalStore(ObjectStore):
    """Objects as files under ``root`` (created if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.url = f"file://{self.root}"
        for folder in (self.root, self.root / ".tmp", self.root / ".locks"):
            folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_temp(self, data: bytes | Path, progress: Progress | None) -> Path:
        """Write ``data`` to a fresh temporary file (fsynced) and return its path."""
        temp = self.root / ".tmp" / uuid.uuid4().hex
        with open(temp, "xb") as out:
            if isinstance(data, bytes | bytearray):
                out.write(data)
                if progress:
                    progress(len(data))
            else:
                with open(data, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        if progress:
                            progress(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        return temp

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        lock_path = self.root / ".locks" / (key.replace("/", "%") + ".lock")
        with open(lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def read(self, key: str) -> tuple[bytes, str]:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"{key} not found in {self.url}") from None
        return data, _etag(data)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"{key} not found in {self.url}") from None

    def put(self, key: str, data: bytes | Path, progress: Progress | None = None) -> None:
        path = self._path(key)
        temp = self._write_temp(data, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, path)

    def put_if_absent(self, key: str, data: bytes | Path, progress: Progress | None = None) -> bool:
        path = self._path(key)
        if path.exists():
            return False
        temp = self._write_temp(data, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        finally:
            temp.unlink()
        return True

    def _current_etag(self, key: str) -> str | None:
        try:
            return self.read(key)[1]
        except NotFoundError:
            return None

    def compare_and_swap(self, key: str, data: bytes, expected: str | None) -> str:
        path = self._path(key)
        with self._locked(key):
            current = self._current_etag(key)
            if current != expected:
                raise ConflictError(f"{key} was changed by another writer; re-read and retry")
            temp = self._write_temp(data, None)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, path)
        return _etag(data)

    def delete(self, key: str, expected: str | None = None) -> None:
        path = self._path(key)
        if expected is None:
            path.unlink(missing_ok=True)
            return
        with self._locked(key):
            if self._current_etag(key) != expected:
                raise ConflictError(f"{key} was changed by another writer; not deleted")
            path.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        folder = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not folder.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix) and not filename.startswith("."):
                    info = self._info(key, path)
                    if info:
                        yield info

    def _info(self, key: str, path: Path) -> ObjectInfo | None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, stat.st_size, stat.st_mtime)

    def stat(self, key: str) -> ObjectInfo | None:
        return self._info(key, self._path(key))

    def touch(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._path(key))

    def remove_stale_temp(self, older_than: float) -> int:
        """Delete temporary files of killed writers older than ``older_than`` (epoch seconds)."""
        removed = 0
        for temp in (self.root / ".tmp").iterdir():
            with contextlib.suppress(FileNotFoundError):
                if temp.stat().st_mtime < older_than:
                    shutil.rmtree(temp) if temp.is_dir() else temp.unlink()
                    removed += 1
        return removed

"""The local-directory backend (the default registry): one file per key under a root folder.

Atomicity rules:

* every write goes to a temporary file under ``<root>/.tmp/`` first (its data fsynced), then is
  published with ``os.replace`` (put) or ``os.link`` (put-if-absent: the link fails if the key exists),
  so a reader never sees a half-written object and a killed writer leaves only a temp file. The writer
  holds an exclusive ``flock`` on its temp file until it is published, and
  :meth:`LocalStore.remove_stale_temp` (``gc``) skips a locked one, so ``gc`` (even ``--grace 0``) never
  removes a write in progress: only the leftovers of killed writers, whose locks the kernel dropped;
* durability: after an object is published or deleted, its folder is fsynced (and so is the parent of
  every folder created for it), so after a power cut an object whose write returned is there, and the
  order of writes survives: a push's blobs are durable before its manifest is published, its manifest
  before its tags;
* compare-and-swap, conditional delete, ``put``'s rename, ``touch`` and ``gc``'s
  :meth:`~LocalStore.delete_stale` hold an exclusive ``fcntl.flock`` on the key's lock file while they
  compare and publish (works across threads and processes on one host). The lock files are
  :data:`LOCK_STRIPES` stripes under ``<root>/.locks/`` chosen by a hash of the key, so their number is
  bounded whatever the number of keys ever written (two keys may share a stripe: they then wait for
  each other, nothing more; no code path holds two locks at once). ``gc`` re-checks a blob's version and
  age under that lock before deleting it, and ``touch`` changes both under the same lock, so a blob a
  push touches after ``gc`` listed it is kept;
* an object's etag is the sha256 of its content (tag files carry a per-write nonce, so no ABA).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from loraswap.adapter_format import open_adapter_file
from loraswap.errors import ConflictError, InvalidArgumentError, NotFoundError
from loraswap.registry.store import ObjectInfo, ObjectStore, Progress, StoreError, check_key
from loraswap.retry import RetryPolicy, retry

_CHUNK = 1 << 20
LOCK_STRIPES = 256
"""Lock files under ``<root>/.locks/``: a key's stripe is the first byte of the sha256 of its name."""


class _TempTaken(Exception):
    """A temporary file was removed by ``gc`` before its writer locked it: take another name."""


_TEMP_RETRY = RetryPolicy(attempts=3, retry_on=(_TempTaken,))
"""Fresh temporary names tried, at once, before a write gives up."""


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` durable (a rename, link or unlink in it)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system without directory fsync
            raise StoreError(f"cannot fsync {folder}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _version(stat: os.stat_result) -> str:
    return f"{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"


class LocalStore(ObjectStore):
    """Objects as files under ``root`` (created if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.url = f"file://{self.root}"
        try:
            for folder in (self.root, self.root / ".tmp", self.root / ".locks"):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidArgumentError(
                f"registry {self.url} cannot be used: {exc.strerror or exc} ({exc.filename or folder})"
            ) from None

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextlib.contextmanager
    def _temp_file(self, data: bytes | Path, progress: Progress | None) -> Iterator[Path]:
        """A fresh temporary file holding ``data`` (fsynced), locked against ``gc`` while in use; it is
        removed afterwards unless the caller renamed it away."""
        try:
            temp, out = retry(self._locked_temp, _TEMP_RETRY)
        except _TempTaken:
            raise StoreError(
                f"{self.url}: cannot create a temporary file (removed {_TEMP_RETRY.attempts} times by gc)"
            ) from None
        try:
            with out:
                self._fill(out, data, progress)
                yield temp
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def _locked_temp(self) -> tuple[Path, BinaryIO]:
        """A new temporary file under a fresh name, open and locked.

        Raises:
            _TempTaken: A ``gc`` removed it between its creation and the lock.
        """
        temp = self.root / ".tmp" / uuid.uuid4().hex
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        out = os.fdopen(fd, "wb")
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # gc removes a temp file only while it holds its lock: is the name still ours?
            still_ours = os.stat(temp).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            still_ours = False
        if not still_ours:
            out.close()
            raise _TempTaken(temp)
        return temp, out

    @staticmethod
    def _fill(out: BinaryIO, data: bytes | Path, progress: Progress | None) -> None:
        if isinstance(data, bytes | bytearray):
            out.write(data)
            if progress:
                progress(len(data))
        else:
            with open_adapter_file(data) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    if progress:
                        progress(len(chunk))
        out.flush()
        os.fsync(out.fileno())

    def _lock_path(self, key: str) -> Path:
        stripe = hashlib.sha256(key.encode()).digest()[0] % LOCK_STRIPES
        return self.root / ".locks" / f"{stripe:03d}.lock"

    def _make_dirs(self, folder: Path) -> None:
        """Create ``folder`` and its missing parents, fsyncing the folder each one is created in."""
        missing = []
        while not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for created in reversed(missing):
            with contextlib.suppress(FileExistsError):
                created.mkdir()
            _fsync_dir(created.parent)

    def _publish(self, temp: Path, path: Path, *, replace: bool) -> bool:
        """Rename (``replace``) or link ``temp`` to ``path``, then fsync its folder; return ``False`` if
        linking found ``path`` taken."""
        self._make_dirs(path.parent)
        if replace:
            os.replace(temp, path)
        else:
            try:
                os.link(temp, path)
            except FileExistsError:
                return False
        _fsync_dir(path.parent)
        return True

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        with open(self._lock_path(key), "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def read(self, key: str) -> tuple[bytes, str]:
        with self.open(key) as handle:
            try:
                data = handle.read()
            except OSError as exc:
                raise StoreError(f"{key} in {self.url} cannot be read: {exc.strerror or exc}") from None
        return data, _etag(data)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"{key} not found in {self.url}") from None
        except OSError as exc:  # a folder where an object belongs, permissions
            raise StoreError(f"{key} in {self.url} cannot be read: {exc.strerror or exc}") from None

    def put(self, key: str, data: bytes | Path, progress: Progress | None = None) -> None:
        path = self._path(key)
        with (
            self._temp_file(data, progress) as temp,
            self._locked(key),
        ):  # never between gc's check and delete
            self._publish(temp, path, replace=True)

    def put_if_absent(self, key: str, data: bytes | Path, progress: Progress | None = None) -> bool:
        path = self._path(key)
        if path.exists():
            return False
        with self._temp_file(data, progress) as temp:
            return self._publish(temp, path, replace=False)

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
            with self._temp_file(data, None) as temp:
                self._publish(temp, path, replace=True)
        return _etag(data)

    def delete(self, key: str, expected: str | None = None) -> None:
        path = self._path(key)
        if expected is None:
            self._unlink(path)
            return
        with self._locked(key):
            if self._current_etag(key) != expected:
                raise ConflictError(f"{key} was changed by another writer; not deleted")
            self._unlink(path)

    def delete_stale(self, seen: ObjectInfo, cutoff: float) -> bool:
        """Delete ``seen.key`` if, under its lock (which ``touch`` and ``put`` take too), it still has
        ``seen.version`` and a modification time before ``cutoff``."""
        path = self._path(seen.key)
        with self._locked(seen.key):
            current = self._info(seen.key, path)
            if current is None or current.version != seen.version or current.modified >= cutoff:
                return False
            self._unlink(path)
        return True

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
        return ObjectInfo(key, stat.st_size, stat.st_mtime, _version(stat))

    def stat(self, key: str) -> ObjectInfo | None:
        return self._info(key, self._path(key))

    def touch(self, key: str) -> None:
        path = self._path(key)
        with self._locked(key), contextlib.suppress(FileNotFoundError):
            os.utime(path)

    def remove_stale_temp(self, older_than: float) -> int:
        """Delete temporary files of killed writers older than ``older_than`` (epoch seconds).

        A temp file whose writer is alive is locked by it and skipped, whatever its age; one is removed
        only while this call holds its lock.
        """
        removed = 0
        for temp in (self.root / ".tmp").iterdir():
            with contextlib.suppress(FileNotFoundError):
                if temp.is_symlink() or temp.is_dir():
                    if temp.lstat().st_mtime < older_than:
                        shutil.rmtree(temp) if not temp.is_symlink() else temp.unlink()
                        removed += 1
                    continue
                removed += self._remove_if_unlocked(temp, older_than)
        return removed

    @staticmethod
    def _remove_if_unlocked(temp: Path, older_than: float) -> int:
        fd = os.open(temp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # its writer is alive
            if os.fstat(fd).st_mtime >= older_than or os.stat(temp).st_ino != os.fstat(fd).st_ino:
                return 0
            temp.unlink()
            return 1
        finally:
            os.close(fd)

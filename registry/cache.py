"""The pulling side's cache: ``paths.adapter_cache_dir()/<digest hex>/`` holds one verified adapter version,
``paths.model_cache_dir()/<digest hex>/`` one verified merged model (the same rules for both).

A cache folder is used only once every file was hashed against the manifest; a corrupted or partial
folder is fetched again. Downloads go to a temporary folder (each file fsynced) that is renamed into
place once verified; the version's manifest is kept beside it (``<digest hex>.manifest.json``, checked
against its digest when read), so the cache can be re-verified without the registry.

After a folder is verified, the size, mtime (ns) and inode of each file are recorded beside it
(``<digest hex>.verified.json``); while they are unchanged the folder is trusted without hashing again
(the check git's index makes), so a cold adapter load reads its file once. Any change to a file means
a full re-hash. What stat cannot see (damage that keeps size, mtime and inode) is caught by:

* ``rehash=True`` (``pull --rehash``): hash this version's files whatever the marker says;
* :func:`rehash_cache` (``verify --cache``, or a server on the operator's schedule): hash every cached
  version, refresh the markers of the intact ones and remove the damaged ones (their next pull fetches
  them again);
* :class:`CacheSession`: a process that serves from the cache holds one; when it ends without closing
  it (crash, kill, power loss), the next session to open drops every stat marker, so each cached
  version is hashed in full before its next use.

``loraswap registry verify`` checks the registry itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraswap import paths
from loraswap.adapter_format import file_kind, open_adapter_file
from loraswap.errors import IntegrityError, InvalidArgumentError
from loraswap.registry.layout import blob_key
from loraswap.registry.manifest import ADAPTER, MODEL, Manifest, stream_digest
from loraswap.registry.names import HEX_RE, digest_hex
from loraswap.registry.store import ObjectStore, Progress

CHUNK = 1 << 20
MARKER_SUFFIX = ".verified.json"
MANIFEST_SUFFIX = ".manifest.json"
SESSIONS = ".sessions"
SESSION_SUFFIX = ".session"


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a regular file, opened without following a symbolic link.

    Raises:
        InvalidArgumentError: ``path`` is a link, a pipe, a device or missing (see ``open_adapter_file``).
    """
    with open_adapter_file(path) as handle:
        return stream_digest(handle)


def _marker_path(folder: Path) -> Path:
    return folder.with_name(folder.name + MARKER_SUFFIX)


def _manifest_path(folder: Path) -> Path:
    return folder.with_name(folder.name + MANIFEST_SUFFIX)


def _file_stats(folder: Path, manifest: Manifest) -> dict[str, list[int]] | None:
    stats = {}
    for entry in manifest.files:
        try:
            st = (folder / entry.path).lstat()
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        stats[entry.path] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return stats


def _marker(manifest: Manifest, stats: dict[str, list[int]]) -> str:
    return json.dumps({"digest": manifest.digest, "files": stats}, sort_keys=True)


def _write_beside(target: Path, text: bytes) -> None:
    """Write ``text`` to ``target`` atomically (temp file in the same folder, then rename)."""
    temp = target.with_name(f".tmp-{uuid.uuid4().hex}{target.suffix}")
    temp.write_bytes(text)
    os.replace(temp, target)


def mark_verified(folder: Path, manifest: Manifest) -> None:
    """Record the stats of ``folder``'s files, just checked against ``manifest`` (atomic write), and
    keep the manifest beside the folder if it is not there yet."""
    stats = _file_stats(folder, manifest)
    if stats is None:
        return
    if not _manifest_path(folder).is_file():
        _write_beside(_manifest_path(folder), manifest.to_bytes())
    _write_beside(_marker_path(folder), _marker(manifest, stats).encode())


def _still_verified(folder: Path, manifest: Manifest) -> bool:
    stats = _file_stats(folder, manifest)
    try:
        return stats is not None and _marker_path(folder).read_text() == _marker(manifest, stats)
    except (OSError, UnicodeDecodeError):
        return False


def folder_problems(folder: Path, manifest: Manifest, rehash: bool = False) -> list[str]:
    """Files of ``folder`` that are missing or differ from ``manifest`` (hashed unless unchanged since
    they were last verified, or always with ``rehash``). A file that is not a regular file (a link put
    there) is a problem too: nothing is read through it."""
    if not rehash and _still_verified(folder, manifest):
        return []
    problems = []
    for entry in manifest.files:
        path = folder / entry.path
        try:
            st = path.lstat()
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{path} is {file_kind(st.st_mode)}, not a regular file")
            continue
        try:
            digest = file_digest(path) if st.st_size == entry.size else None
        except (InvalidArgumentError, OSError) as exc:
            problems.append(f"{path} cannot be read: {exc}")
            continue
        if digest != entry.digest:
            problems.append(f"{path} does not match {entry.digest}")
    if not problems:
        with contextlib.suppress(OSError):  # read-only cache: verify again next time
            mark_verified(folder, manifest)
    return problems


def download_blob(store: ObjectStore, digest: str, dest: Path, progress: Progress | None = None) -> None:
    """Copy blob ``digest`` to ``dest`` (a new file, fsynced), checking its hash; :class:`IntegrityError`
    on mismatch.

    The blob is hashed as it is written (one pass over the stream, reporting ``progress``), so this loop
    does what ``hashlib.file_digest`` cannot: copy and hash at once.
    """
    hasher = hashlib.sha256()
    with contextlib.closing(store.open(blob_key(digest))) as stream, open(dest, "xb") as out:
        while chunk := stream.read(CHUNK):
            hasher.update(chunk)
            out.write(chunk)
            if progress:
                progress(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    if "sha256:" + hasher.hexdigest() != digest:
        dest.unlink()
        raise IntegrityError(f"blob {digest} in {store.url} is corrupt; run `loraswap registry verify`")


def cache_root(kind: str) -> Path:
    """The cache folder of versions of ``kind`` (``adapter``: the adapter cache; ``model``: the model
    cache)."""
    return paths.model_cache_dir() if kind == MODEL else paths.adapter_cache_dir()


def cached_adapter_dir(digest: str) -> Path:
    """The cache folder of version ``digest`` (``sha256:<hex>``), whether it is there or not.

    Raises:
        InvalidArgumentError: ``digest`` is not ``sha256:<64 lower-case hex digits>``.
    """
    return paths.adapter_cache_dir() / digest_hex(digest)


def cached_version(
    store: ObjectStore, manifest: Manifest, progress: Progress | None = None, rehash: bool = False
) -> Path:
    """The verified cache folder of ``manifest``, downloading it if absent or corrupt (``rehash``: hash
    the cached files even when their stats say they are unchanged). An adapter goes to the adapter
    cache, a model to the model cache (:func:`cache_root`)."""
    root = cache_root(manifest.kind)
    final = root / manifest.hex
    if _is_real_dir(final) and not folder_problems(final, manifest, rehash):
        return final
    temp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        temp.mkdir(parents=True)
    except OSError as exc:
        raise InvalidArgumentError(
            f"{manifest.kind} cache {root} cannot be written: {exc.strerror or exc}"
        ) from None
    try:
        for entry in manifest.files:
            download_blob(store, entry.digest, temp / entry.path, progress)
        if os.path.lexists(final):
            if _is_real_dir(final) and not folder_problems(final, manifest, rehash):
                return final  # another puller put a good copy in place
            _remove(final)  # corrupt or partial entry
        try:
            temp.rename(final)
            mark_verified(final, manifest)  # each blob was hashed as it arrived
        except OSError:  # another puller put it in place first
            if folder_problems(final, manifest):
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final


def verified_cache_folder(digest: str, kind: str = ADAPTER) -> Path | None:
    """The cache folder of ``digest`` if it is intact by the manifest kept beside it (trusted by its stat
    marker, as :func:`cached_version` trusts it), with no registry I/O; None when absent or damaged."""
    manifest = recorded_manifest(digest, kind)
    if manifest is None:
        return None
    folder = cache_root(kind) / manifest.hex
    return folder if _is_real_dir(folder) and not folder_problems(folder, manifest) else None


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


def _remove(folder: Path) -> None:
    """Remove a cache entry (a folder, or whatever stands in its place) and its marker; the folder is
    renamed away first, so no reader sees it half deleted."""
    _marker_path(folder).unlink(missing_ok=True)
    if not _is_real_dir(folder):
        with contextlib.suppress(FileNotFoundError):
            folder.unlink()
        return
    doomed = folder.with_name(f".tmp-{uuid.uuid4().hex}")
    with contextlib.suppress(FileNotFoundError):
        folder.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def recorded_manifest(digest: str, kind: str = ADAPTER) -> Manifest | None:
    """The manifest kept beside the cache folder of ``digest`` (in the cache of ``kind``), if it is there,
    matches the digest and is of that kind."""
    path = _manifest_path(cache_root(kind) / digest_hex(digest))
    try:
        manifest = Manifest.from_bytes(path.read_bytes(), digest)
    except (OSError, IntegrityError):
        return None
    return manifest if manifest.kind == kind else None


@dataclass
class CacheCheck:
    """What :func:`rehash_cache` found.

    Attributes:
        intact: Digests of the cached versions hashed in full and found intact (markers refreshed).
        removed: Digests of damaged versions, removed from the cache (their next pull fetches them
            again). A server drops these from its host and device tiers as well.
        unverified: Digests with no manifest to check them against (none kept beside them, none given
            by ``lookup``): their stat markers are dropped, so their next pull hashes them.
        problems: One line per removed version, naming what was wrong.
    """

    intact: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def rehash_cache(lookup: Callable[[str], Manifest | None] | None = None) -> CacheCheck:
    """Hash every cached version (the adapter cache, then the model cache) in full against its manifest.

    Args:
        lookup: Where to find the manifest of a version that has none kept beside its folder (caches
            filled before manifests were kept there): ``digest -> Manifest | None``.

    Returns:
        What was intact, removed or could not be checked.
    """
    report = CacheCheck()
    for kind in (ADAPTER, MODEL):
        _rehash_root(kind, lookup, report)
    return report


def _rehash_root(kind: str, lookup: Callable[[str], Manifest | None] | None, report: CacheCheck) -> None:
    root = cache_root(kind)
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return
    for name in names:
        if not HEX_RE.fullmatch(name):
            continue
        digest, folder = "sha256:" + name, root / name
        manifest = recorded_manifest(digest, kind) or (lookup(digest) if lookup else None)
        if manifest is not None and manifest.kind != kind:
            manifest = None
        if manifest is None:
            _marker_path(folder).unlink(missing_ok=True)
            report.unverified.append(digest)
            continue
        problems = (
            folder_problems(folder, manifest, rehash=True)
            if _is_real_dir(folder)
            else [f"{folder} is not a folder"]
        )
        if problems:
            _remove(folder)
            report.removed.append(digest)
            what = "; ".join(problems)
            report.problems.append(f"cached version {digest} was damaged and is removed: {what}")
        else:
            report.intact.append(digest)


def drop_markers() -> int:
    """Delete every stat marker of the adapter and model caches, so that each version is hashed in full
    at its next use; return how many were deleted."""
    dropped = 0
    for root in (paths.adapter_cache_dir(), paths.model_cache_dir()):
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(root):
                if name.endswith(MARKER_SUFFIX) and HEX_RE.fullmatch(name.removesuffix(MARKER_SUFFIX)):
                    with contextlib.suppress(FileNotFoundError):
                        (root / name).unlink()
                        dropped += 1
    return dropped


class CacheSession:
    """One process's use of the adapter cache, so that the next process can tell it ended uncleanly.

    :meth:`open` registers the process: a file ``<cache>/.sessions/<id>.session`` on which it holds an
    exclusive ``flock`` until :meth:`close` removes it. The kernel drops the lock however the process
    ends, so a session file whose lock can be taken belongs to a process that ended without closing
    (a crash, a kill, a power loss), and what the cache's files hold may then differ from what their
    stats say. ``open`` then drops every stat marker (each cached version is hashed in full before its
    next use, by the pull that serves it) and removes those stale session files. Several processes may
    hold sessions on one cache at once.

    Attributes:
        unclean: Some earlier session of this cache ended without :meth:`close`.
        path: This session's file.
    """

    def __init__(self, path: Path, handle: int, unclean: bool) -> None:
        self.path = path
        self._fd: int | None = handle
        self.unclean = unclean

    @classmethod
    def open(cls) -> CacheSession:
        """Register this process as a user of the cache; see the class docstring.

        Raises:
            InvalidArgumentError: The cache folder cannot be written.
        """
        folder = paths.adapter_cache_dir() / SESSIONS
        try:
            folder.mkdir(parents=True, exist_ok=True)
            temp = folder / f".tmp-{uuid.uuid4().hex}"
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise InvalidArgumentError(
                f"adapter cache {folder.parent} cannot be written: {exc.strerror or exc}"
            ) from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = folder / f"{uuid.uuid4().hex}{SESSION_SUFFIX}"
        os.rename(temp, path)  # only a locked file ever carries the session suffix
        stale = [p for p in _stale_sessions(folder) if p != path]
        unclean = any(p.name.endswith(SESSION_SUFFIX) for p in stale)
        if unclean:
            drop_markers()
        for leftover in stale:  # after the markers are gone: a crash in between repeats the drop
            leftover.unlink(missing_ok=True)
        return cls(path, fd, unclean)

    def close(self) -> None:
        """End the session cleanly (idempotent)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> CacheSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _stale_sessions(folder: Path) -> list[Path]:
    """Session files in ``folder`` whose lock nobody holds, and temp files of sessions that died while
    opening (unlocked and an hour old: a session being opened right now holds its temp file briefly)."""
    stale = []
    for name in sorted(os.listdir(folder)):
        path = folder / name
        if not name.endswith(SESSION_SUFFIX) and not name.startswith(".tmp-"):
            continue
        try:
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                stale.append(path)  # a link put there: removed, never followed
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            young_temp = name.startswith(".tmp-") and os.fstat(fd).st_mtime > time.time() - 3600
        except BlockingIOError:
            continue  # a live session
        finally:
            os.close(fd)
        if not young_temp:
            stale.append(path)
    return stale

"""The pulling side's cache: ``paths.adapter_cache_dir()/<digest hex>/`` holds one verified version.

A cache folder is used only once every file was hashed against the manifest; a corrupted or partial
folder is fetched again. Downloads go to a temporary folder that is renamed into place once verified.
After a folder is verified, the size, mtime (ns) and inode of each file are recorded beside it
(``<digest hex>.verified.json``); while they are unchanged the folder is trusted without hashing again
(the check git's index makes), so a cold adapter load reads its file once. Any change to a file means
a full re-hash; ``loraswap registry verify`` checks the registry itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from loraswap import paths
from loraswap.errors import IntegrityError
from loraswap.registry.layout import blob_key
from loraswap.registry.manifest import Manifest
from loraswap.registry.names import digest_hex
from loraswap.registry.store import ObjectStore, Progress

CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file."""
    with open(path, "rb") as handle:
        return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()


MARKER_SUFFIX = ".verified.json"


def _marker_path(folder: Path) -> Path:
    return folder.with_name(folder.name + MARKER_SUFFIX)


def _file_stats(folder: Path, manifest: Manifest) -> dict[str, list[int]] | None:
    stats = {}
    for entry in manifest.files:
        try:
            st = (folder / entry.path).stat()
        except OSError:
            return None
        stats[entry.path] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return stats


def _marker(manifest: Manifest, stats: dict[str, list[int]]) -> str:
    return json.dumps({"digest": manifest.digest, "files": stats}, sort_keys=True)


def mark_verified(folder: Path, manifest: Manifest) -> None:
    """Record the stats of ``folder``'s files, just checked against ``manifest`` (atomic write)."""
    stats = _file_stats(folder, manifest)
    if stats is None:
        return
    temp = folder.with_name(f".tmp-{uuid.uuid4().hex}{MARKER_SUFFIX}")
    temp.write_text(_marker(manifest, stats))
    os.replace(temp, _marker_path(folder))


def _still_verified(folder: Path, manifest: Manifest) -> bool:
    stats = _file_stats(folder, manifest)
    try:
        return stats is not None and _marker_path(folder).read_text() == _marker(manifest, stats)
    except OSError:
        return False


def folder_problems(folder: Path, manifest: Manifest, rehash: bool = False) -> list[str]:
    """Files of ``folder`` that are missing or differ from ``manifest`` (hashed unless unchanged since
    they were last verified, or always with ``rehash``)."""
    if not rehash and _still_verified(folder, manifest):
        return []
    problems = []
    for entry in manifest.files:
        path = folder / entry.path
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != entry.size or file_digest(path) != entry.digest:
            problems.append(f"{path} does not match {entry.digest}")
    if not problems:
        with contextlib.suppress(OSError):  # read-only cache: verify again next time
            mark_verified(folder, manifest)
    return problems


def download_blob(store: ObjectStore, digest: str, dest: Path, progress: Progress | None = None) -> None:
    """Copy blob ``digest`` to ``dest``, checking its hash; :class:`IntegrityError` on mismatch.

    The blob is hashed as it is written (one pass over the stream, reporting ``progress``), so this loop
    does what ``hashlib.file_digest`` cannot: copy and hash at once.
    """
    hasher = hashlib.sha256()
    with contextlib.closing(store.open(blob_key(digest))) as stream, open(dest, "wb") as out:
        while chunk := stream.read(CHUNK):
            hasher.update(chunk)
            out.write(chunk)
            if progress:
                progress(len(chunk))
    if "sha256:" + hasher.hexdigest() != digest:
        dest.unlink()
        raise IntegrityError(f"blob {digest} in {store.url} is corrupt; run `loraswap registry verify`")


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
    the cached files even when their stats say they are unchanged)."""
    root = paths.adapter_cache_dir()
    final = root / manifest.hex
    if final.is_dir() and not folder_problems(final, manifest, rehash):
        return final
    temp = root / f".tmp-{uuid.uuid4().hex}"
    temp.mkdir(parents=True)
    try:
        for entry in manifest.files:
            download_blob(store, entry.digest, temp / entry.path, progress)
        if final.exists():
            if not folder_problems(final, manifest, rehash):  # another puller put a good copy in place
                return final
            shutil.rmtree(final, ignore_errors=True)  # corrupt or partial entry
        try:
            temp.rename(final)
            mark_verified(final, manifest)  # each blob was hashed as it arrived
        except OSError:  # another puller put it in place first
            if folder_problems(final, manifest):
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final

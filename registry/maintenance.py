"""Store-wide maintenance: garbage collection of unreferenced blobs, and full verification.

gc never removes a blob younger than the grace period: a push uploads its blobs before its manifest, so
an in-progress push's blobs are unreferenced for a while; a push that reuses an existing blob touches it.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field

from loraswap.errors import IntegrityError, NotFoundError
from loraswap.registry.layout import ADAPTERS, BLOBS, blob_key, manifest_key, split_adapter_key, tag_target
from loraswap.registry.manifest import Manifest
from loraswap.registry.store import ObjectStore

DEFAULT_GC_GRACE_SECONDS = 3600.0


@dataclass
class GcReport:
    """What ``gc`` did.

    Attributes:
        removed: Digests of the blobs deleted.
        freed_bytes: Their total size.
        kept_young: Unreferenced blobs kept because they are younger than the grace period.
        temp_removed: Temporary files of killed writers removed.
    """

    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_young: int = 0
    temp_removed: int = 0


def _manifest_keys(store: ObjectStore) -> list[tuple[str, str]]:
    """(name, hex) of every stored manifest."""
    found = []
    for info in store.list(ADAPTERS):
        parts = split_adapter_key(info.key)
        if parts and parts[1] == "manifests":
            found.append((parts[0], parts[2]))
    return found


def referenced_blobs(store: ObjectStore) -> set[str]:
    """Digests of every blob some manifest lists; :class:`IntegrityError` if a manifest is unreadable."""
    referenced: set[str] = set()
    for name, hex_digest in _manifest_keys(store):
        with contextlib.suppress(NotFoundError):  # removed meanwhile
            data = store.get(manifest_key(name, "sha256:" + hex_digest))
            manifest = Manifest.from_bytes(data, "sha256:" + hex_digest)
            referenced.update(entry.digest for entry in manifest.files)
    return referenced


def collect_garbage(store: ObjectStore, grace_seconds: float = DEFAULT_GC_GRACE_SECONDS) -> GcReport:
    """Delete blobs no manifest references and older than ``grace_seconds``."""
    report = GcReport()
    referenced = referenced_blobs(store)
    now = time.time()
    for info in list(store.list(BLOBS)):
        digest = "sha256:" + info.key.rsplit("/", 1)[-1]
        if digest in referenced:
            continue
        current = store.stat(info.key)  # re-read: a push may have touched it since the listing
        if current is None:
            continue
        if now - current.modified < grace_seconds:
            report.kept_young += 1
            continue
        store.delete(info.key)
        report.removed.append(digest)
        report.freed_bytes += current.size
    report.temp_removed = store.remove_stale_temp(now - grace_seconds)
    return report


def _blob_problems(store: ObjectStore) -> tuple[dict[str, int], list[str]]:
    """Re-hash every blob; return (digest → size of the good ones, problems).

    A good blob's size is the size the store lists: its content hashed to its name, so it is the content
    the manifests' sizes describe.
    """
    sizes: dict[str, int] = {}
    problems = []
    for info in store.list(BLOBS):
        expected = "sha256:" + info.key.rsplit("/", 1)[-1]
        with contextlib.closing(store.open(info.key)) as stream:
            actual = "sha256:" + hashlib.file_digest(stream, "sha256").hexdigest()
        if actual != expected:
            problems.append(f"blob {expected} is corrupt: its content hashes to {actual}")
        else:
            sizes[expected] = info.size
    return sizes, problems


def verify_store(store: ObjectStore) -> list[str]:
    """Every problem in the store: corrupt blobs and manifests, missing blobs, dangling tags."""
    sizes, problems = _blob_problems(store)
    corrupt = {p.split()[1] for p in problems}
    versions: set[tuple[str, str]] = set()
    for name, hex_digest in _manifest_keys(store):
        digest = "sha256:" + hex_digest
        try:
            manifest = Manifest.from_bytes(store.get(manifest_key(name, digest)), digest)
        except (IntegrityError, NotFoundError) as exc:
            problems.append(f"{name}@{digest}: {exc}")
            continue
        versions.add((name, digest))
        for entry in manifest.files:
            if entry.digest in corrupt:
                problems.append(f"{name}@{digest}: file {entry.path} is in corrupt blob {entry.digest}")
            elif sizes.get(entry.digest) is None and store.stat(blob_key(entry.digest)) is None:
                problems.append(f"{name}@{digest}: blob {entry.digest} of {entry.path} is missing")
            elif entry.digest in sizes and sizes[entry.digest] != entry.size:
                problems.append(f"{name}@{digest}: {entry.path} has the wrong size")
    for info in store.list(ADAPTERS):
        parts = split_adapter_key(info.key)
        if not parts or parts[1] != "tags":
            continue
        try:
            target = tag_target(store.get(info.key), info.key)
        except (IntegrityError, NotFoundError) as exc:
            problems.append(str(exc))
            continue
        if (parts[0], target) not in versions:
            problems.append(f"tag {parts[0]}:{parts[2]} points at missing or corrupt version {target}")
    return problems

"""Store-wide maintenance: garbage collection of unreferenced blobs, and full verification.

gc never removes a blob younger than the grace period: a push uploads its blobs before its manifest, so
an in-progress push's blobs are unreferenced for a while; a push that reuses an existing blob touches it.

gc's delete is conditional (:meth:`~loraswap.registry.store.ObjectStore.delete_stale`): a blob is
deleted only if it is still the object gc listed, neither rewritten nor touched since, so a push that
reuses a blob between gc's listing and its delete keeps it (locally the check and the delete hold the
lock ``touch`` takes; on S3 a HEAD must still show the listed ETag, which ``touch`` changes, and an old
modification time, and the delete carries ``If-Match`` with that ETag). A push checks its blobs again
after writing its manifest and uploads any that went, which covers a gc that deleted a blob before the
push touched it. What is left: with ``--grace 0`` a gc that lists a blob after a push touched it but
before that push's manifest exists may delete it after the push's last check; keep the grace above the
time a push takes.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass, field

from loraswap.errors import IntegrityError, InvalidArgumentError, LoraswapError, NotFoundError
from loraswap.registry.layout import ADAPTERS, BLOBS, blob_key, manifest_key, split_adapter_key, tag_target
from loraswap.registry.manifest import Manifest, stream_digest
from loraswap.registry.names import HEX_RE
from loraswap.registry.store import ObjectStore

DEFAULT_GC_GRACE_SECONDS = 3600.0
_DIGEST_IN_TEXT = re.compile(rb"sha256:([0-9a-f]{64})")


@dataclass
class GcReport:
    """What ``gc`` did.

    Attributes:
        removed: Digests of the blobs deleted.
        freed_bytes: Their total size.
        kept_young: Unreferenced blobs kept because they are younger than the grace period.
        temp_removed: Temporary files of killed writers removed.
        problems: Manifests that could not be read (one line each). A damaged manifest keeps every blob
            its bytes still name; one that cannot be read at all stops every blob deletion of this run.
    """

    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_young: int = 0
    temp_removed: int = 0
    problems: list[str] = field(default_factory=list)


def _manifest_keys(store: ObjectStore) -> list[tuple[str, str]]:
    """(name, hex) of every stored manifest (keys of another shape are left to ``verify``)."""
    found = []
    for info in store.list(ADAPTERS):
        parts = split_adapter_key(info.key)
        if parts and parts[1] == "manifests":
            found.append((parts[0], parts[2]))
    return found


def referenced_blobs(store: ObjectStore) -> tuple[set[str], list[str], bool]:
    """Digests of every blob some manifest lists, a problem line per unreadable manifest, and whether
    every manifest could be read at all (if not, which blobs are referenced is unknown)."""
    referenced: set[str] = set()
    problems: list[str] = []
    complete = True
    for name, hex_digest in _manifest_keys(store):
        digest = "sha256:" + hex_digest
        try:
            data = store.get(manifest_key(name, digest))
        except NotFoundError:  # removed meanwhile
            continue
        except LoraswapError as exc:
            problems.append(f"{name}@{digest}: {exc}; no blob is deleted while it cannot be read")
            complete = False
            continue
        try:
            manifest = Manifest.from_bytes(data, digest)
        except IntegrityError as exc:
            problems.append(f"{name}@{digest}: {exc}; the blobs its bytes still name are kept")
            referenced.update("sha256:" + hex_.decode() for hex_ in _DIGEST_IN_TEXT.findall(data))
            continue
        referenced.update(entry.digest for entry in manifest.files)
    return referenced, problems, complete


def collect_garbage(store: ObjectStore, grace_seconds: float = DEFAULT_GC_GRACE_SECONDS) -> GcReport:
    """Delete blobs no manifest references and older than ``grace_seconds``.

    Raises:
        InvalidArgumentError: ``grace_seconds`` is negative or not a finite number.
    """
    if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, int | float):
        raise InvalidArgumentError(f"gc grace must be a number of seconds, got {grace_seconds!r}")
    if not math.isfinite(grace_seconds) or grace_seconds < 0:
        raise InvalidArgumentError(f"gc grace must be a finite number of seconds >= 0, got {grace_seconds!r}")
    report = GcReport()
    referenced, report.problems, complete = referenced_blobs(store)
    cutoff = time.time() - grace_seconds
    for info in list(store.list(BLOBS)) if complete else []:
        hex_digest = info.key.rsplit("/", 1)[-1]
        digest = "sha256:" + hex_digest
        if digest in referenced or not HEX_RE.fullmatch(hex_digest):  # not a blob: left to verify
            continue
        if info.modified >= cutoff:
            report.kept_young += 1
        elif store.delete_stale(info, cutoff):
            report.removed.append(digest)
            report.freed_bytes += info.size
        elif store.stat(info.key) is not None:  # a push touched or rewrote it since the listing
            report.kept_young += 1
    report.temp_removed = store.remove_stale_temp(cutoff)
    return report


def _blob_problems(store: ObjectStore) -> tuple[dict[str, int], set[str], list[str]]:
    """Re-hash every blob; return (digest → size of the good ones, digests of the bad ones, problems).

    A good blob's size is the size the store lists: its content hashed to its name, so it is the content
    the manifests' sizes describe. A blob that cannot be read is a problem of its own; the others are
    still checked.
    """
    sizes: dict[str, int] = {}
    bad: set[str] = set()
    problems = []
    for info in store.list(BLOBS):
        hex_digest = info.key.rsplit("/", 1)[-1]
        expected = "sha256:" + hex_digest
        if "/" in info.key[len(BLOBS) :] or not HEX_RE.fullmatch(hex_digest):
            problems.append(f"{info.key!r} is not a blob (its name must be 64 lower-case hex digits)")
            continue
        try:
            with contextlib.closing(store.open(info.key)) as stream:
                actual = stream_digest(stream)
        except NotFoundError:  # removed meanwhile (gc)
            continue
        except LoraswapError as exc:
            problems.append(f"blob {expected} cannot be read: {exc}")
            bad.add(expected)
            continue
        if actual != expected:
            problems.append(f"blob {expected} is corrupt: its content hashes to {actual}")
            bad.add(expected)
        else:
            sizes[expected] = info.size
    return sizes, bad, problems


def verify_store(store: ObjectStore) -> list[str]:
    """Every problem in the store: corrupt or unreadable blobs and manifests, missing blobs, dangling
    tags, keys that fit no part of the layout, and a name holding both adapters and merged models. One
    bad entry never stops the check of the others."""
    sizes, corrupt, problems = _blob_problems(store)
    versions: set[tuple[str, str]] = set()
    kinds: dict[str, set[str]] = {}
    for name, hex_digest in _manifest_keys(store):
        digest = "sha256:" + hex_digest
        try:
            manifest = Manifest.from_bytes(store.get(manifest_key(name, digest)), digest)
        except LoraswapError as exc:
            problems.append(f"{name}@{digest}: {exc}")
            continue
        versions.add((name, digest))
        kinds.setdefault(name, set()).add(manifest.kind)
        for entry in manifest.files:
            if entry.digest in corrupt:
                problems.append(f"{name}@{digest}: file {entry.path} is in corrupt blob {entry.digest}")
            elif sizes.get(entry.digest) is None and store.stat(blob_key(entry.digest)) is None:
                problems.append(f"{name}@{digest}: blob {entry.digest} of {entry.path} is missing")
            elif entry.digest in sizes and sizes[entry.digest] != entry.size:
                problems.append(f"{name}@{digest}: {entry.path} has the wrong size")
    for name, found in sorted(kinds.items()):
        if len(found) > 1:
            problems.append(
                f"{name} holds both adapters and merged models (a name holds one kind; "
                "`loraswap registry rm` the versions of one kind)"
            )
    for info in store.list(ADAPTERS):
        parts = split_adapter_key(info.key)
        if not parts:
            problems.append(
                f"{info.key!r} is not a registry key (an invalid name or tag, or a manifest whose name "
                "is not a digest); every command ignores it"
            )
            continue
        if parts[1] != "tags":
            continue
        try:
            target = tag_target(store.get(info.key), info.key)
        except NotFoundError:  # removed meanwhile
            continue
        except LoraswapError as exc:
            problems.append(str(exc))
            continue
        if (parts[0], target) not in versions:
            problems.append(f"tag {parts[0]}:{parts[2]} points at missing or corrupt version {target}")
    return problems

"""The adapter registry: push, resolve, pull, list, tag, untag, rm, gc, verify over an :class:`ObjectStore`.

See :mod:`loraswap.registry.layout` for the keys and the write order that makes a push visible only once
complete, and :mod:`loraswap.registry.cache` for the pulling side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from loraswap import paths
from loraswap.errors import (
    AdapterValidationError,
    ConflictError,
    IntegrityError,
    InvalidArgumentError,
    LoraswapError,
    NotFoundError,
)
from loraswap.models import BaseModelRef, base_fingerprint
from loraswap.registry import layout
from loraswap.registry.cache import CacheCheck, cached_version, file_digest, rehash_cache
from loraswap.registry.maintenance import (
    DEFAULT_GC_GRACE_SECONDS,
    GcReport,
    collect_garbage,
    verify_store,
)
from loraswap.registry.manifest import FileEntry, Manifest
from loraswap.registry.names import LATEST, check_name, check_tag, name_problem, parse_ref, tag_problem
from loraswap.registry.pull_dest import check_dest, copy_to_dest
from loraswap.registry.store import ObjectStore, Progress, open_store
from loraswap.registry.validate import DEFAULT_MAX_BYTES, AdapterSummary, validate_adapter_dir

log = logging.getLogger(__name__)

REGISTRY_ENV = "LORASWAP_REGISTRY"
MAX_BYTES_ENV = "LORASWAP_MAX_ADAPTER_BYTES"

ProblemSink = Callable[[str], None]
"""Told one line per entry a listing skipped because it could not be read."""


def _log_problem(problem: str) -> None:
    log.warning("%s", problem)


def check_max_bytes(value: object, what: str = "max_bytes") -> int:
    """Return ``value`` if it is a positive integer; :class:`InvalidArgumentError` naming ``what`` if not."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgumentError(f"{what} must be a positive number of bytes, got {value!r}")
    return value


@dataclass(frozen=True)
class VersionEntry:
    """One row of ``list``: a version and the tags that point at it.

    Attributes:
        manifest: The version.
        tags: Its tags, sorted (``latest`` included when it points here).
    """

    manifest: Manifest
    tags: tuple[str, ...]


class Registry:
    """An adapter registry over one object store.

    Args:
        store: Where blobs, manifests and tags live.
        max_bytes: Largest adapter accepted by ``push`` (a positive integer; anything else raises
            :class:`InvalidArgumentError`).
        tag_retries: How often a tag move re-reads and retries after losing a compare-and-swap race
            (a tag move does not depend on the old value, so retrying is safe); then ConflictError.
        progress: Show tqdm progress bars on stderr for uploads and downloads.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        tag_retries: int = 5,
        progress: bool = False,
    ) -> None:
        self.store = store
        self.max_bytes = check_max_bytes(max_bytes)
        self.tag_retries = tag_retries
        self.progress = progress

    @property
    def url(self) -> str:
        return self.store.url

    @contextlib.contextmanager
    def _bar(self, total: int, what: str) -> Iterator[Progress | None]:
        if not self.progress:
            yield None
            return
        from tqdm import tqdm

        with tqdm(total=total, desc=what, unit="B", unit_scale=True, leave=False) as bar:
            yield bar.update

    # -- push ---------------------------------------------------------------------------------------

    def push(
        self,
        folder: Path,
        name: str,
        tags: Sequence[str] = (),
        base: BaseModelRef | None = None,
        description: str | None = None,
    ) -> Manifest:
        """Validate ``folder`` and store it as a version of ``name``; move ``latest`` and ``tags`` to it.

        Args:
            folder: A PEFT adapter folder (``save_pretrained`` output).
            name: Adapter name.
            tags: Extra tags to point at the version.
            base: The base the adapter is for: its modules are checked and its fingerprint recorded.
            description: Free text kept with the version.

        Returns:
            The version's manifest (the first push's annotations if this content was pushed before).

        Raises:
            AdapterValidationError: Listing every problem with the folder, name and tags.
            ConflictError: A tag kept changing under concurrent writers.
        """
        summary = self._validate(Path(folder), name, tags, base)
        with self._bar(summary.total_bytes, f"push {name}") as progress:
            files = tuple(self._upload(summary.folder / file, progress) for file in summary.files)
        manifest = _new_manifest(name, summary, files, base, description)
        key = layout.manifest_key(name, manifest.digest)
        if not self.store.put_if_absent(key, manifest.to_bytes()):
            manifest = self._manifest(name, manifest.digest)
        for entry in files:  # a concurrent gc may have taken a reused blob before the manifest existed
            if self.store.stat(layout.blob_key(entry.digest)) is None:
                self.store.put(layout.blob_key(entry.digest), summary.folder / entry.path)
        for tag in dict.fromkeys((LATEST, *tags)):
            self._move_tag(name, tag, manifest.digest)
        return manifest

    def _validate(
        self, folder: Path, name: str, tags: Sequence[str], base: BaseModelRef | None
    ) -> AdapterSummary:
        problems = [p for p in (name_problem(name), *(tag_problem(t) for t in tags)) if p]
        try:
            summary = validate_adapter_dir(folder, base, self.max_bytes)
        except AdapterValidationError as exc:
            raise _refusal(f"cannot push {folder}", problems + exc.problems) from None
        if problems:
            raise _refusal(f"cannot push {folder}", problems)
        return summary

    def _upload(self, path: Path, progress: Progress | None) -> FileEntry:
        """Store one file as a blob (blobs first: nothing refers to it yet)."""
        digest = file_digest(path)  # never through a link (nor is the upload itself)
        size = path.lstat().st_size
        key = layout.blob_key(digest)
        if not self.store.put_if_absent(key, path, progress):
            self.store.touch(key)  # reused: make it young again for gc's grace period
            if progress:
                progress(size)
        return FileEntry(path.name, digest, size)

    # -- tags ---------------------------------------------------------------------------------------

    def _read_tag(self, name: str, tag: str) -> tuple[str, str] | None:
        """(digest, etag) of a tag, or ``None``."""
        key = layout.tag_key(name, tag)
        try:
            data, etag = self.store.read(key)
        except NotFoundError:
            return None
        return layout.tag_target(data, key), etag

    def _move_tag(self, name: str, tag: str, digest: str) -> None:
        """Point ``name:tag`` at ``digest`` by compare-and-swap, re-reading after a lost race."""
        key = layout.tag_key(name, tag)
        for attempt in range(self.tag_retries + 1):
            current = self._read_tag(name, tag)
            if current is not None and current[0] == digest:
                return
            try:
                self.store.compare_and_swap(key, layout.tag_document(digest), current and current[1])
                return
            except ConflictError:
                if attempt == self.tag_retries:
                    raise

    def _tags_of(self, name: str, on_problem: ProblemSink = _log_problem) -> dict[str, list[str]]:
        """digest → tags of ``name`` (an unreadable tag is told to ``on_problem`` and skipped)."""
        found: dict[str, list[str]] = {}
        for info in self.store.list(layout.tags_prefix(name)):
            parts = layout.split_adapter_key(info.key)
            if not parts or parts[1] != "tags":
                continue
            try:
                target = self._read_tag(name, parts[2])
            except LoraswapError as exc:
                on_problem(f"{exc} (skipped; run `loraswap registry verify`)")
                continue
            if target:
                found.setdefault(target[0], []).append(parts[2])
        return found

    def tag(self, ref: str, tag: str) -> Manifest:
        """Point ``tag`` of the referenced adapter at the referenced version; return that version."""
        check_tag(tag)
        manifest = self.resolve(ref)
        self._move_tag(manifest.name, tag, manifest.digest)
        return manifest

    def untag(self, name: str, tag: str) -> None:
        """Remove ``name:tag`` (the version stays); NotFoundError if there is no such tag."""
        current = self._read_tag(check_name(name), check_tag(tag))
        if current is None:
            raise NotFoundError(f"tag {name}:{tag} not found in {self.url}")
        self.store.delete(layout.tag_key(name, tag), expected=current[1])

    # -- read ---------------------------------------------------------------------------------------

    def _manifest(self, name: str, digest: str) -> Manifest:
        try:
            data = self.store.get(layout.manifest_key(name, digest))
        except NotFoundError:
            raise NotFoundError(f"version {name}@{digest} not found in {self.url}") from None
        # the annotations are not hashed: the name is the one the version was found under
        return dataclasses.replace(Manifest.from_bytes(data, digest), name=name)

    def resolve(self, ref: str) -> Manifest:
        """The manifest ``ref`` (``name``, ``name:tag`` or ``name@sha256:<hex>``) names.

        Raises:
            NotFoundError: Unknown adapter, tag or version.
        """
        parsed = parse_ref(ref)
        if parsed.digest:
            return self._manifest(parsed.name, parsed.digest)
        target = self._read_tag(parsed.name, parsed.tag or LATEST)
        if target is None:
            if not any(True for _ in self.store.list(f"{layout.ADAPTERS}{parsed.name}/")):
                raise NotFoundError(f"adapter {parsed.name!r} not found in {self.url}")
            raise NotFoundError(f"tag {parsed} not found in {self.url}")
        return self._manifest(parsed.name, target[0])

    def pull(self, ref: str, dest: Path | None = None, rehash: bool = False, force: bool = False) -> Path:
        """Fetch a version into the verified local cache (reused when intact) and return its folder.

        Args:
            ref: Adapter reference.
            dest: Also copy the files there and return it instead of the cache folder. ``dest`` must be
                a new or empty folder (created with its parents if missing), never a symbolic link or a
                file; it is checked before anything is downloaded. See :mod:`loraswap.registry.pull_dest`.
            rehash: Hash a cached copy even when its files' stats are unchanged since it was verified
                (a reader that found the cached files unreadable asks for this before giving up).
            force: ``dest`` may hold other files: the adapter's file names in it are replaced by this
                version's files (each written to a temporary name, then renamed over the old one; a
                link there is replaced, never followed), an adapter file name this version lacks is
                removed, and every other entry is left alone.

        Raises:
            InvalidArgumentError: ``dest`` is refused (the reason is in the message).
        """
        manifest = self.resolve(ref)
        if dest is not None:
            check_dest(Path(dest), force)
        with self._bar(manifest.size, f"pull {manifest.name}") as progress:
            folder = cached_version(self.store, manifest, progress, rehash)
        if dest is None:
            return folder
        copy_to_dest(folder, manifest, Path(dest), force)
        return Path(dest)

    def names(self) -> list[str]:
        """Every adapter name with at least one version or tag."""
        found = {
            parts[0]
            for info in self.store.list(layout.ADAPTERS)
            if (parts := layout.split_adapter_key(info.key))
        }
        return sorted(found)

    def list(self, name: str | None = None, on_problem: ProblemSink = _log_problem) -> list[VersionEntry]:
        """Versions (with their tags) of ``name``, or of every adapter; oldest first per name.

        A manifest or tag that cannot be read is told to ``on_problem`` (default: logged as a warning)
        and skipped: one bad entry never hides the rest of the store.
        """
        entries = []
        for adapter in [check_name(name)] if name else self.names():
            tags = self._tags_of(adapter, on_problem)
            versions = []
            for info in self.store.list(layout.manifests_prefix(adapter)):
                parts = layout.split_adapter_key(info.key)
                if not parts or parts[1] != "manifests":
                    on_problem(f"{info.key!r} is not a manifest (skipped; run `loraswap registry verify`)")
                    continue
                digest = "sha256:" + parts[2]
                try:
                    manifest = self._manifest(adapter, digest)
                except NotFoundError:  # removed meanwhile
                    continue
                except LoraswapError as exc:
                    on_problem(f"{adapter}@{digest}: {exc} (skipped; run `loraswap registry verify`)")
                    continue
                versions.append(VersionEntry(manifest, tuple(sorted(tags.get(digest, [])))))
            entries += sorted(versions, key=lambda e: (e.manifest.created, e.manifest.digest))
        if name and not entries:
            raise NotFoundError(f"adapter {name!r} not found in {self.url}")
        return entries

    # -- delete and maintenance ---------------------------------------------------------------------

    def rm(self, ref: str, force: bool = False) -> Manifest:
        """Delete a version (its blobs go at the next ``gc``).

        Raises:
            ConflictError: The version is tagged and ``force`` is false (with force, its tags go too).
        """
        manifest = self.resolve(ref)
        tags = sorted(self._tags_of(manifest.name).get(manifest.digest, []))
        if tags and not force:
            raise ConflictError(
                f"{manifest.name}@{manifest.digest} is tagged {', '.join(tags)}; untag it or use --force"
            )
        for tag in tags:
            current = self._read_tag(manifest.name, tag)
            if current and current[0] == manifest.digest:
                self.store.delete(layout.tag_key(manifest.name, tag), expected=current[1])
        self.store.delete(layout.manifest_key(manifest.name, manifest.digest))
        return manifest

    def gc(self, grace_seconds: float = DEFAULT_GC_GRACE_SECONDS) -> GcReport:
        """Delete blobs no version uses, except those younger than ``grace_seconds`` (a finite number
        >= 0). Manifests that cannot be read are reported in :attr:`GcReport.problems`; the blobs they
        may use are kept."""
        return collect_garbage(self.store, grace_seconds)

    def verify(self) -> list[str]:
        """Re-hash everything; return every problem found (empty when the store is sound)."""
        return verify_store(self.store)

    def verify_cache(self) -> CacheCheck:
        """Re-hash every version in the local adapter cache (:func:`loraswap.registry.cache.rehash_cache`);
        a version with no manifest kept beside it is looked up in this registry."""
        return rehash_cache(self._find_manifest)

    def _find_manifest(self, digest: str) -> Manifest | None:
        """The manifest of version ``digest`` under any name of this registry, or ``None``."""
        for name in self.names():
            if self.store.stat(layout.manifest_key(name, digest)) is None:
                continue
            with contextlib.suppress(NotFoundError, IntegrityError):
                return self._manifest(name, digest)
        return None


def _refusal(what: str, problems: list[str]) -> AdapterValidationError:
    """The error of a refused push: one line when there is one problem, else one line per problem
    under ``what`` (``problems`` carries them either way)."""
    if len(problems) != 1:
        return AdapterValidationError(what, problems)
    error = AdapterValidationError(f"{what}: {problems[0]}")
    error.problems = list(problems)
    return error


def _new_manifest(
    name: str,
    summary: AdapterSummary,
    files: tuple[FileEntry, ...],
    base: BaseModelRef | None,
    description: str | None,
) -> Manifest:
    """The manifest of a validated folder whose files were stored as ``files``."""
    config = summary.config
    return Manifest.build(
        name=name,
        files=files,
        rank=config.r,
        alpha=config.lora_alpha,
        target_modules=config.target_modules,
        use_rslora=config.use_rslora,
        dtype=summary.dtype,
        base_model_id=base.model_id if base else config.base_model_name_or_path,
        base_fingerprint=base_fingerprint(base.path) if base else None,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        description=description,
        training=summary.training,
    )


def open_registry(url: str | os.PathLike[str] | None = None, **options: object) -> Registry:
    """Open a registry: ``url``, else ``$LORASWAP_REGISTRY``, else ``paths.default_registry_dir()``.

    Args:
        url: ``file:///path``, a plain path, or ``s3://bucket/prefix`` (see :func:`open_store`).
        **options: Passed to :class:`Registry` (``max_bytes``, ``tag_retries``, ``progress``); without
            ``max_bytes``, ``$LORASWAP_MAX_ADAPTER_BYTES`` sets it when present.

    Raises:
        InvalidArgumentError: ``max_bytes`` or ``$LORASWAP_MAX_ADAPTER_BYTES`` is not a positive integer.
    """
    target = url or os.environ.get(REGISTRY_ENV) or paths.default_registry_dir()
    if "max_bytes" not in options and os.environ.get(MAX_BYTES_ENV):
        options["max_bytes"] = _env_max_bytes(os.environ[MAX_BYTES_ENV])
    else:
        check_max_bytes(options.get("max_bytes", DEFAULT_MAX_BYTES))  # before the store is opened
    return Registry(open_store(target), **options)  # type: ignore[arg-type]


def _env_max_bytes(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise InvalidArgumentError(f"${MAX_BYTES_ENV}={text!r} is not a positive integer (a size in bytes)")
    return value

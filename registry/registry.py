"""The registry: push, resolve, pull, list, tag, untag, rm, gc, verify over an :class:`ObjectStore`.

It holds two kinds of version (:data:`~loraswap.registry.manifest.KINDS`): LoRA **adapters** and merged
**models** (standalone HF folders, ``loraswap merge`` output), with the same blobs, tags, verification
and gc. A name holds versions of one kind only (a push of the other kind to it is refused), so a tag
never moves from an adapter to a model. The adapter paths (:meth:`Registry.resolve`, used by the
server's adapter manager for every request) refuse a model reference, and the model paths
(:meth:`Registry.resolve_model`, :meth:`Registry.pull_model`) an adapter reference, with a
:class:`WrongKindError` naming the kind.

See :mod:`loraswap.registry.layout` for the keys and the write order that makes a push visible only once
complete, :mod:`loraswap.registry.consistency` for how ``push``, ``tag`` and ``rm`` racing on one version
never leave a tag naming a removed manifest, and :mod:`loraswap.registry.cache` for the pulling side.
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
from loraswap.registry.consistency import (
    drop_tag,
    move_tag,
    point_tags,
    read_tag,
    restore_version,
    upload_missing_blobs,
)
from loraswap.registry.location import default_local_registry
from loraswap.registry.maintenance import (
    DEFAULT_GC_GRACE_SECONDS,
    GcReport,
    collect_garbage,
    verify_store,
)
from loraswap.registry.manifest import ADAPTER, MODEL, FileEntry, Manifest
from loraswap.registry.names import LATEST, check_name, check_tag, name_problem, parse_ref, tag_problem
from loraswap.registry.pull_dest import check_dest, copy_to_dest
from loraswap.registry.store import ObjectStore, Progress, open_store
from loraswap.registry.validate import DEFAULT_MAX_BYTES, AdapterSummary, validate_adapter_dir
from loraswap.registry.validate_model import ModelSummary, validate_model_dir

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


class WrongKindError(InvalidArgumentError):
    """A reference to a version of the other kind: a merged model where an adapter is needed, or the
    reverse.

    Attributes:
        ref: The reference given.
        kind: The kind of the version it names (``adapter`` or ``model``).
        expected: The kind the caller needed.
    """

    def __init__(self, ref: str, kind: str, expected: str) -> None:
        self.ref, self.kind, self.expected = ref, kind, expected
        if kind == MODEL:
            message = (
                f"{ref} is a merged model, not an adapter; serve it with --route ADAPTER_REF={ref} "
                f"(or fetch it with `loraswap registry pull {ref}`)"
            )
        else:
            message = (
                f"{ref} is an adapter, not a merged model; serve it as an adapter, or merge it first "
                f"(`loraswap merge --base MODEL --adapter {ref} --output DIR --push NAME`)"
            )
        super().__init__(message)


def _kind_problem(name: str, existing: str, wanted: str) -> str:
    if existing == ADAPTER:
        return f"{name} holds adapters; a merged model needs a name of its own (e.g. {name}-merged)"
    return f"{name} holds merged models; an adapter needs a name of its own"


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
    """A registry of adapters and merged models over one object store.

    Args:
        store: Where blobs, manifests and tags live.
        max_bytes: Largest adapter accepted by ``push`` (a positive integer; anything else raises
            :class:`InvalidArgumentError`).
        tag_retries: How often a tag move re-reads and retries after losing a compare-and-swap race
            (a tag move does not depend on the old value, so retrying is safe), each retry after a short
            random wait (:func:`~loraswap.registry.consistency.tag_retry`); then ConflictError.
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
            ConflictError: A tag kept changing under concurrent writers, or concurrent ``rm`` calls kept
                removing the version (:mod:`~loraswap.registry.consistency`).
        """
        summary, prior = self._validate(Path(folder), name, tags, base)
        with self._bar(summary.total_bytes, f"push {name}") as progress:
            files = tuple(self._upload(summary.folder / file, progress) for file in summary.files)
        manifest = _new_manifest(name, summary, files, base, description)
        return self._publish(manifest, summary.folder, prior, (LATEST, *tags))

    def push_model(
        self, folder: Path, ref: str, description: str | None = None, *, tags: Sequence[str] = ()
    ) -> Manifest:
        """Validate a merged-model folder and store it as a version of ``ref``'s name; move ``latest``,
        ``ref``'s tag (if it names one) and ``tags`` to it.

        The folder is checked in full before anything is written
        (:func:`~loraswap.registry.validate_model.validate_model_dir`); every file is hashed and uploaded
        by chunks, never read whole. Push order and atomicity are those of :meth:`push`.

        Args:
            folder: A standalone HF model folder (``loraswap merge`` output).
            ref: ``NAME`` or ``NAME:TAG``.
            description: Free text kept with the version.
            tags: Extra tags to point at the version.

        Returns:
            The version's manifest (``kind == "model"``; the first push's annotations if this content
            was pushed before).

        Raises:
            InvalidArgumentError: Listing every problem with the folder, the reference and the tags
                (also when the name holds adapters).
            ConflictError: A tag kept changing under concurrent writers, or an adapter was pushed under
                the same new name at the same time.
        """
        name, tags, problems = _push_target(ref, tags)
        prior = None
        if not problems:
            prior = self._first_kind(name)
            if prior not in (None, MODEL):
                problems.append(_kind_problem(name, prior, MODEL))
        try:
            summary = validate_model_dir(Path(folder))
        except InvalidArgumentError as exc:
            raise _refusal(f"cannot push {folder}", problems + exc.problems, InvalidArgumentError) from None
        if problems:
            raise _refusal(f"cannot push {folder}", problems, InvalidArgumentError)
        with self._bar(summary.total_bytes, f"push {name}") as progress:
            files = tuple(self._upload(summary.folder / file, progress) for file in summary.files)
        manifest = _new_model_manifest(name, summary, files, description)
        return self._publish(manifest, summary.folder, prior, (LATEST, *tags))

    def _publish(self, manifest: Manifest, folder: Path, prior: str | None, tags: Sequence[str]) -> Manifest:
        """Write the manifest of uploaded files (put-if-absent), then move ``tags`` to it and check that
        it is still there (:func:`~loraswap.registry.consistency.point_tags`)."""
        created, manifest = self._store_manifest(manifest)
        if created and prior is None:
            self._claim_name(manifest)
        upload_missing_blobs(self.store, manifest, folder)
        point_tags(self.store, manifest, folder, tuple(dict.fromkeys(tags)), self.tag_retries)
        return manifest

    def _store_manifest(self, manifest: Manifest) -> tuple[bool, Manifest]:
        """Write ``manifest`` unless stored; return whether this call wrote it, and the stored version
        (which keeps the first push's annotations)."""
        key = layout.manifest_key(manifest.name, manifest.digest)
        for _ in range(self.tag_retries + 1):
            if self.store.put_if_absent(key, manifest.to_bytes()):
                return True, manifest
            with contextlib.suppress(NotFoundError):  # removed by a concurrent rm since: write it again
                return False, self._manifest(manifest.name, manifest.digest)
        raise ConflictError(f"cannot push {manifest.name}@{manifest.digest}: removed by concurrent rm calls")

    def _manifest_kinds(self, name: str, skip: str | None = None) -> Iterator[str]:
        """The kind of each readable version of ``name`` (but ``skip``), one manifest read each."""
        for info in self.store.list(layout.manifests_prefix(name)):
            parts = layout.split_adapter_key(info.key)
            if not parts or parts[1] != "manifests" or "sha256:" + parts[2] == skip:
                continue
            try:
                yield self._manifest(name, "sha256:" + parts[2]).kind
            except LoraswapError:
                continue

    def _first_kind(self, name: str) -> str | None:
        """The kind of ``name``'s versions (a name holds one kind), or ``None`` for a new name."""
        return next(self._manifest_kinds(name), None)

    def _claim_name(self, manifest: Manifest) -> None:
        """After the first manifest of a new name was written: if a version of the other kind appeared
        under the name meanwhile (two pushes racing), take this one back and raise ConflictError. Of two
        racing writers at least the later one to list sees the other's manifest, so both kinds never
        stay."""
        others = set(self._manifest_kinds(manifest.name, skip=manifest.digest)) - {manifest.kind}
        if others:
            self.store.delete(layout.manifest_key(manifest.name, manifest.digest))
            raise ConflictError(
                f"cannot push {manifest.name}: "
                f"{_kind_problem(manifest.name, others.pop(), manifest.kind)} (pushed meanwhile)"
            )

    def _validate(
        self, folder: Path, name: str, tags: Sequence[str], base: BaseModelRef | None
    ) -> tuple[AdapterSummary, str | None]:
        problems = [p for p in (name_problem(name), *(tag_problem(t) for t in tags)) if p]
        prior = None
        if not problems:
            prior = self._first_kind(name)
            if prior not in (None, ADAPTER):
                problems.append(_kind_problem(name, prior, ADAPTER))
        try:
            summary = validate_adapter_dir(folder, base, self.max_bytes)
        except AdapterValidationError as exc:
            raise _refusal(f"cannot push {folder}", problems + exc.problems) from None
        if problems:
            raise _refusal(f"cannot push {folder}", problems)
        return summary, prior

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
        return read_tag(self.store, name, tag)

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
        """Point ``tag`` of the referenced name (adapter or model) at the referenced version; return
        that version.

        Raises:
            NotFoundError: Unknown reference, or the version was removed (``rm``) while being tagged: the
                tag is taken back (:mod:`~loraswap.registry.consistency`).
        """
        check_tag(tag)
        manifest = self.resolve(ref, kind=None)
        written = move_tag(self.store, manifest.name, tag, manifest.digest, self.tag_retries)
        if self.store.stat(layout.manifest_key(manifest.name, manifest.digest)) is None:
            if written is not None:
                drop_tag(self.store, manifest.name, tag, manifest.digest, written)
            raise NotFoundError(f"version {manifest.name}@{manifest.digest} was removed while being tagged")
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

    def resolve(self, ref: str, kind: str | None = ADAPTER) -> Manifest:
        """The manifest ``ref`` (``name``, ``name:tag`` or ``name@sha256:<hex>``) names.

        This is the adapter path by default (the server's adapter manager resolves every request's
        adapter here): a merged model's reference is refused.

        Args:
            ref: The reference.
            kind: The kind of version wanted (``"adapter"``, ``"model"``), or ``None`` for either.

        Raises:
            NotFoundError: Unknown name, tag or version.
            WrongKindError: ``ref`` names a version of another kind than ``kind``.
        """
        parsed = parse_ref(ref)
        if parsed.digest:
            return _of_kind(self._manifest(parsed.name, parsed.digest), ref, kind)
        target = self._read_tag(parsed.name, parsed.tag or LATEST)
        if target is None:
            if not any(True for _ in self.store.list(f"{layout.ADAPTERS}{parsed.name}/")):
                what = "model" if kind == MODEL else "adapter"
                raise NotFoundError(f"{what} {parsed.name!r} not found in {self.url}")
            raise NotFoundError(f"tag {parsed} not found in {self.url}")
        return _of_kind(self._manifest(parsed.name, target[0]), ref, kind)

    def resolve_model(self, ref: str) -> Manifest:
        """The manifest of the merged model ``ref`` names.

        Raises:
            NotFoundError: Unknown name, tag or version.
            WrongKindError: ``ref`` names an adapter.
        """
        return self.resolve(ref, kind=MODEL)

    def pull_model(self, ref: str, dest: Path | None = None, rehash: bool = False) -> Path:
        """Fetch a merged model into the verified model cache (``paths.model_cache_dir()/<hex>/``,
        reused when intact) and return its folder, or copy it into ``dest`` (a new or empty folder)
        and return ``dest``. ``rehash`` as in :meth:`pull`.

        Raises:
            NotFoundError: Unknown name, tag or version.
            WrongKindError: ``ref`` names an adapter.
            InvalidArgumentError: ``dest`` is refused (the reason is in the message).
        """
        return self._pull(self.resolve_model(ref), dest, rehash, False)

    def pull(self, ref: str, dest: Path | None = None, rehash: bool = False, force: bool = False) -> Path:
        """Fetch a version (adapter or model) into the verified local cache (reused when intact) and
        return its folder: ``paths.adapter_cache_dir()/<hex>/`` for an adapter,
        ``paths.model_cache_dir()/<hex>/`` for a model.

        Args:
            ref: Reference of an adapter or a model.
            dest: Also copy the files there and return it instead of the cache folder. ``dest`` must be
                a new or empty folder (created with its parents if missing), never a symbolic link or a
                file; it is checked before anything is downloaded. See :mod:`loraswap.registry.pull_dest`.
            rehash: Hash a cached copy even when its files' stats are unchanged since it was verified
                (a reader that found the cached files unreadable asks for this before giving up).
            force: ``dest`` may hold other files: the adapter's file names in it are replaced by this
                version's files (each written to a temporary name, then renamed over the old one; a
                link there is replaced, never followed), an adapter file name this version lacks is
                removed, and every other entry is left alone (a model's file names are those a model
                folder may hold).

        Raises:
            InvalidArgumentError: ``dest`` is refused (the reason is in the message).
        """
        return self._pull(self.resolve(ref, kind=None), dest, rehash, force)

    def _pull(self, manifest: Manifest, dest: Path | None, rehash: bool, force: bool) -> Path:
        if dest is not None:
            check_dest(Path(dest), force, manifest.kind)
        with self._bar(manifest.size, f"pull {manifest.name}") as progress:
            folder = cached_version(self.store, manifest, progress, rehash)
        if dest is None:
            return folder
        copy_to_dest(folder, manifest, Path(dest), force)
        return Path(dest)

    def names(self) -> list[str]:
        """Every name (adapter or model) with at least one version or tag."""
        found = {
            parts[0]
            for info in self.store.list(layout.ADAPTERS)
            if (parts := layout.split_adapter_key(info.key))
        }
        return sorted(found)

    def list(self, name: str | None = None, on_problem: ProblemSink = _log_problem) -> list[VersionEntry]:
        """Versions (with their tags) of ``name``, or of every name; oldest first per name (each
        entry's ``manifest.kind`` says whether it is an adapter or a model).

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
            ConflictError: The version is tagged and ``force`` is false (with force, its tags go too),
                or a concurrent push or ``tag`` tagged it while it was being removed: it is then kept
                with that tag (:mod:`~loraswap.registry.consistency`).
        """
        manifest = self.resolve(ref, kind=None)
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
        again = sorted(self._tags_of(manifest.name).get(manifest.digest, []))
        if again:  # tagged by a concurrent push or tag after the tags above went: it stays
            missing = restore_version(self.store, manifest)
            gone = (
                f"; its blobs {', '.join(missing)} are gone (run `loraswap registry verify`)"
                if missing
                else ""
            )
            raise ConflictError(
                f"{manifest.name}@{manifest.digest} was tagged {', '.join(again)} by a concurrent push or "
                f"tag while being removed; it is kept{gone}"
            )
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
        """Re-hash every version in the local adapter and model caches
        (:func:`loraswap.registry.cache.rehash_cache`); a version with no manifest kept beside it is
        looked up in this registry."""
        return rehash_cache(self._find_manifest)

    def _find_manifest(self, digest: str) -> Manifest | None:
        """The manifest of version ``digest`` under any name of this registry, or ``None``."""
        for name in self.names():
            if self.store.stat(layout.manifest_key(name, digest)) is None:
                continue
            with contextlib.suppress(NotFoundError, IntegrityError):
                return self._manifest(name, digest)
        return None


def _refusal(
    what: str, problems: list[str], cls: type[InvalidArgumentError] = AdapterValidationError
) -> InvalidArgumentError:
    """The error of a refused push: one line when there is one problem, else one line per problem
    under ``what`` (``problems`` carries them either way)."""
    if len(problems) != 1:
        return cls(what, problems)
    error = cls(f"{what}: {problems[0]}")
    error.problems = list(problems)
    return error


def _of_kind(manifest: Manifest, ref: str, kind: str | None) -> Manifest:
    if kind is not None and manifest.kind != kind:
        raise WrongKindError(ref, manifest.kind, kind)
    return manifest


def _push_target(ref: str, tags: Sequence[str]) -> tuple[str, tuple[str, ...], list[str]]:
    """(name, tags, problems) of a push to ``NAME[:TAG]`` with extra ``tags``."""
    if not isinstance(ref, str) or "@" in ref:
        problem = f"push takes NAME or NAME:TAG, not {ref!r} (a version's digest comes from its files)"
        return "", (), [problem]
    name, sep, tag = ref.partition(":")
    wanted = (tag, *tags) if sep else tuple(tags)
    problems = [p for p in (name_problem(name), *(tag_problem(t) for t in wanted)) if p]
    return name, wanted, problems


def _new_model_manifest(
    name: str, summary: ModelSummary, files: tuple[FileEntry, ...], description: str | None
) -> Manifest:
    """The manifest of a validated model folder whose files were stored as ``files``."""
    lineage = summary.lineage
    return Manifest.build(
        name=name,
        files=files,
        rank=0,
        alpha=0.0,
        target_modules=(),
        use_rslora=False,
        dtype=summary.info.dtype,
        base_model_id=lineage.base_model_id if lineage else None,
        base_fingerprint=lineage.base_fingerprint if lineage else None,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        description=description,
        kind=MODEL,
        model=summary.info,
        lineage=lineage,
    )


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
    """Open a registry: ``url``, else ``$LORASWAP_REGISTRY``, else the local default
    (``paths.default_registry_dir()``, or a registry still at the old default: :mod:`.location`).

    Args:
        url: ``file:///path``, a plain path, or ``s3://bucket/prefix`` (see :func:`open_store`).
        **options: Passed to :class:`Registry` (``max_bytes``, ``tag_retries``, ``progress``); without
            ``max_bytes``, ``$LORASWAP_MAX_ADAPTER_BYTES`` sets it when present.

    Raises:
        InvalidArgumentError: ``max_bytes`` or ``$LORASWAP_MAX_ADAPTER_BYTES`` is not a positive integer.
    """
    target = url or os.environ.get(REGISTRY_ENV) or default_local_registry()
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

"""The adapters a merge reads: a registry reference pulled into the verified cache, or a local folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraswap.adapter_format import TRAINING_METADATA, read_json_object
from loraswap.errors import InvalidArgumentError, NotFoundError

if TYPE_CHECKING:
    from loraswap.registry import Registry


@dataclass(frozen=True)
class AdapterSource:
    """One adapter to merge, on local disk.

    Attributes:
        ref: The reference as given (a registry reference or a folder path).
        path: The local PEFT adapter folder (the registry's verified cache folder for a reference).
        name: The registry name, or the folder's name.
        digest: The registry version digest, or the folder's content digest
            (:func:`folder_digest`).
        from_registry: Whether ``ref`` was resolved through a registry.
        base_fingerprint: The base fingerprint recorded with the adapter (its registry manifest's, else
            the one in the trainer's ``training_metadata.json``), or ``None``.
    """

    ref: str
    path: Path
    name: str
    digest: str
    from_registry: bool
    base_fingerprint: str | None = None

    @classmethod
    def from_folder(cls, folder: Path, ref: str | None = None) -> AdapterSource:
        """A local adapter folder (validated when merged, not here).

        Raises:
            NotFoundError: ``folder`` is not a folder.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise NotFoundError(f"adapter folder {folder} does not exist")
        resolved = folder.resolve()
        return cls(
            ref=str(ref if ref is not None else folder),
            path=resolved,
            name=resolved.name,
            digest=folder_digest(resolved),
            from_registry=False,
            base_fingerprint=_trained_fingerprint(resolved),
        )

    @classmethod
    def from_registry(cls, registry: Registry, ref: str) -> AdapterSource:
        """Resolve ``ref`` once and pull exactly that version (a tag moved meanwhile does not change what
        is merged).

        Raises:
            NotFoundError: Unknown adapter, tag or version.
            InvalidArgumentError: ``ref`` is not a valid reference, or names a merged model
                (``WrongKindError``).
        """
        manifest = registry.resolve(ref)  # an adapter: a merged model's reference is refused
        folder = Path(registry.pull(f"{manifest.name}@{manifest.digest}"))
        fingerprint = manifest.base_fingerprint or _trained_fingerprint(folder)
        return cls(ref, folder, manifest.name, manifest.digest, True, fingerprint)


def resolve_adapter(ref: str | os.PathLike[str], registry: Registry | None = None) -> AdapterSource:
    """An adapter given on the command line: an existing folder is a local adapter; anything else is a
    registry reference (``name``, ``name:tag``, ``name@sha256:<hex>``) pulled from ``registry``
    (default: ``open_registry()``, opened only when needed).

    Raises:
        NotFoundError: A path that does not exist, or an unknown adapter, tag or version.
        InvalidArgumentError: Neither a folder nor a valid reference.
    """
    text = os.fspath(ref)
    path = Path(text).expanduser()
    if path.is_dir():
        return AdapterSource.from_folder(path, text)
    from loraswap.registry.names import parse_ref

    try:
        parse_ref(text)
    except InvalidArgumentError as exc:
        if os.sep in text or text.startswith("."):
            raise NotFoundError(f"adapter folder {text} does not exist") from None
        what = f"adapter {text!r} is neither a folder nor a registry reference"
        raise InvalidArgumentError(f"{what}: {exc}") from None
    if registry is None:
        from loraswap.registry import open_registry

        registry = open_registry()
    return AdapterSource.from_registry(registry, text)


def folder_digest(folder: Path) -> str:
    """The content digest of an adapter folder: ``sha256`` over the canonical JSON list of the files
    the registry would push (path, ``sha256`` of the bytes, size), the same file entries a registry
    manifest lists. An entry that is a link or not a regular file is refused as on push."""
    from loraswap.registry.cache import file_digest
    from loraswap.registry.manifest import canonical_json, sha256_digest
    from loraswap.registry.validate import ALLOWED_FILES

    entries = []
    for name in sorted(os.listdir(folder)):
        if name in ALLOWED_FILES:
            path = Path(folder) / name
            digest = file_digest(path)  # refuses a link, a pipe, a device
            entries.append({"path": name, "digest": digest, "size": os.lstat(path).st_size})
    return sha256_digest(canonical_json(entries))


def _trained_fingerprint(folder: Path) -> str | None:
    """The base fingerprint the trainer recorded in ``training_metadata.json``, if any."""
    if not (folder / TRAINING_METADATA).exists():
        return None
    doc, _ = read_json_object(folder / TRAINING_METADATA)
    value = (doc or {}).get("base_fingerprint")
    return value if isinstance(value, str) else None

"""The manifest of one adapter version, and how its digest is computed.

A stored manifest is a JSON document ``{"content": {...}, "annotations": {...}}``. The version digest is
``sha256`` over the canonical JSON (sorted keys, no spaces, UTF-8) of ``content`` only: the files
(path, blob digest, size), the LoRA summary, the base binding and the trainer's metadata. The
annotations (adapter name, creation time, description) are not hashed, so pushing the same files for
the same base twice gives the same digest, under any name; the first push's annotations are kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from loraswap.errors import IntegrityError
from loraswap.registry.names import DIGEST_RE
from loraswap.registry.validate import ALLOWED_FILES

SCHEMA_VERSION = 1
MEDIA_TYPE = "application/vnd.loraswap.adapter.manifest.v1+json"


def canonical_json(value: Any) -> bytes:
    """The one serialisation that is hashed: sorted keys, compact separators, UTF-8, strict JSON (a
    NaN or Infinity raises ``ValueError``: validation refuses them before a manifest is built)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One file of a version.

    Attributes:
        path: File name inside the adapter folder (one of the allowed names).
        digest: ``sha256:<hex>`` of its bytes (the blob's key).
        size: Size in bytes.
    """

    path: str
    digest: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """An immutable adapter version.

    Attributes:
        name: The adapter name it was resolved under.
        digest: ``sha256:<hex>`` of the canonical content (the version id).
        files: The files of the version, sorted by path.
        rank: Default LoRA rank ``r``.
        alpha: Default ``lora_alpha``.
        target_modules: Targeted module names (sorted).
        use_rslora: Rank-stabilised scaling.
        dtype: Tensor dtype(s).
        base_model_id: Base the adapter was pushed for (``--base``), else the config's
            ``base_model_name_or_path``.
        base_fingerprint: ``base_fingerprint`` of that base when ``--base`` was given, else ``None``.
        created: ISO-8601 UTC time of the first push.
        description: Free text given at push.
        training: The trainer's ``training_metadata.json`` (lineage, metrics), if any.
    """

    name: str
    digest: str
    files: tuple[FileEntry, ...]
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    dtype: str
    base_model_id: str | None
    base_fingerprint: str | None
    created: str
    description: str | None = None
    training: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def size(self) -> int:
        """Total bytes of the version's files."""
        return sum(entry.size for entry in self.files)

    @property
    def hex(self) -> str:
        """The digest without its ``sha256:`` prefix (cache folder and store key)."""
        return self.digest.split(":", 1)[1]

    def content(self) -> dict[str, Any]:
        """The part of the manifest the digest covers."""
        return content_of(
            self.files,
            {"rank": self.rank, "alpha": self.alpha, "target_modules": list(self.target_modules)},
            {"use_rslora": self.use_rslora, "dtype": self.dtype},
            {"model_id": self.base_model_id, "fingerprint": self.base_fingerprint},
            self.training,
        )

    def to_bytes(self) -> bytes:
        """The stored document."""
        annotations = {"name": self.name, "created": self.created, "description": self.description}
        return canonical_json({"content": self.content(), "annotations": annotations})

    def to_dict(self) -> dict[str, Any]:
        """A flat, JSON-ready view (``registry show --json``)."""
        return {
            "name": self.name,
            "digest": self.digest,
            "created": self.created,
            "description": self.description,
            "size": self.size,
            **{key: value for key, value in self.content().items() if key != "schema_version"},
        }

    @classmethod
    def build(cls, **fields: Any) -> Manifest:
        """A new manifest from its fields (all but ``digest``, which is computed)."""
        draft = cls(digest="", **fields)
        return dataclasses.replace(draft, digest=sha256_digest(canonical_json(draft.content())))

    @classmethod
    def from_bytes(cls, data: bytes, expected_digest: str | None = None) -> Manifest:
        """Parse a stored document; :class:`IntegrityError` if unreadable or not ``expected_digest``.

        Every field must have the type this module writes (a store is not trusted to hold only what
        loraswap wrote), and the fields must give back the stored content exactly: a manifest naming a
        path outside the adapter folder, a file twice, a non-finite alpha, a string where a number
        belongs or another schema is refused as corrupt.
        """
        what = f"manifest {expected_digest or ''}".rstrip()
        try:
            doc = json.loads(data, parse_constant=_refuse_constant)
            content, notes = doc["content"], doc["annotations"]
            adapter, base = content["adapter"], content["base"]
            manifest = cls(
                name=_typed(notes["name"], str),
                digest=sha256_digest(canonical_json(content)),
                files=tuple(_file_entry(f) for f in _typed(content["files"], list)),
                rank=_typed(adapter["rank"], int),
                alpha=float(_typed(adapter["alpha"], int | float)),
                target_modules=tuple(_typed(t, str) for t in _typed(adapter["target_modules"], list)),
                use_rslora=_typed(adapter["use_rslora"], bool),
                dtype=_typed(adapter["dtype"], str),
                base_model_id=_typed(base["model_id"], str | None),
                base_fingerprint=_typed(base["fingerprint"], str | None),
                created=_typed(notes["created"], str),
                description=_typed(notes.get("description"), str | None),
                training=_typed(content.get("training"), dict | None),
            )
        except (ValueError, KeyError, TypeError, RecursionError, OverflowError) as exc:
            raise IntegrityError(f"{what} is unreadable: {str(exc)[:200]}") from None
        paths = [entry.path for entry in manifest.files]
        for entry in manifest.files:  # a manifest never names a path outside the adapter folder
            if entry.path not in ALLOWED_FILES or not DIGEST_RE.fullmatch(entry.digest) or entry.size < 0:
                raise IntegrityError(f"manifest {manifest.digest} lists a bad file entry {entry}")
        if len(set(paths)) != len(paths):
            raise IntegrityError(f"manifest {manifest.digest} lists a file twice")
        if manifest.rank <= 0 or not math.isfinite(manifest.alpha) or manifest.alpha <= 0:
            raise IntegrityError(f"manifest {manifest.digest} has a bad rank or alpha")
        if canonical_json(manifest.content()) != canonical_json(content):  # e.g. another schema version
            raise IntegrityError(f"manifest {manifest.digest} holds content this version does not write")
        if expected_digest is not None and manifest.digest != expected_digest:
            raise IntegrityError(f"manifest {expected_digest} does not match its content ({manifest.digest})")
        return manifest


def _refuse_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _typed(value: Any, kind: Any) -> Any:
    """``value`` if it is of ``kind`` (a bool is not an int here), else ``TypeError``."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, int | float)):
        raise TypeError(f"{type(value).__name__} where {kind} belongs")
    return value


def _file_entry(doc: Any) -> FileEntry:
    entry = _typed(doc, dict)
    return FileEntry(_typed(entry["path"], str), _typed(entry["digest"], str), _typed(entry["size"], int))


def content_of(
    files: tuple[FileEntry, ...],
    lora: dict[str, Any],
    tensors: dict[str, Any],
    base: dict[str, Any],
    training: dict[str, Any] | None,
) -> dict[str, Any]:
    """Assemble the hashed content of a manifest (one place defines its shape)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "media_type": MEDIA_TYPE,
        "files": [{"path": f.path, "digest": f.digest, "size": f.size} for f in sorted(files, key=_path)],
        "adapter": {**lora, **tensors},
        "base": base,
        "training": training,
    }


def _path(entry: FileEntry) -> str:
    return entry.path

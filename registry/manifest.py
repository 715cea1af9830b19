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
from dataclasses import dataclass, field
from typing import Any

from loraswap.errors import IntegrityError
from loraswap.registry.names import DIGEST_RE
from loraswap.registry.validate import ALLOWED_FILES

SCHEMA_VERSION = 1
MEDIA_TYPE = "application/vnd.loraswap.adapter.manifest.v1+json"


def canonical_json(value: Any) -> bytes:
    """The one serialisation that is hashed: sorted keys, compact separators, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


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
        """Parse a stored document; :class:`IntegrityError` if unreadable or not ``expected_digest``."""
        try:
            doc = json.loads(data)
            content, notes = doc["content"], doc["annotations"]
            adapter, base = content["adapter"], content["base"]
            manifest = cls(
                name=notes["name"],
                digest=sha256_digest(canonical_json(content)),
                files=tuple(FileEntry(f["path"], f["digest"], int(f["size"])) for f in content["files"]),
                rank=int(adapter["rank"]),
                alpha=float(adapter["alpha"]),
                target_modules=tuple(adapter["target_modules"]),
                use_rslora=bool(adapter["use_rslora"]),
                dtype=str(adapter["dtype"]),
                base_model_id=base["model_id"],
                base_fingerprint=base["fingerprint"],
                created=notes["created"],
                description=notes.get("description"),
                training=content.get("training"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"manifest {expected_digest or ''} is unreadable: {exc!r}") from None
        for entry in manifest.files:  # a manifest never names a path outside the adapter folder
            if entry.path not in ALLOWED_FILES or not DIGEST_RE.match(entry.digest):
                raise IntegrityError(f"manifest {manifest.digest} lists a bad file entry {entry}")
        if expected_digest is not None and manifest.digest != expected_digest:
            raise IntegrityError(f"manifest {expected_digest} does not match its content ({manifest.digest})")
        return manifest


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

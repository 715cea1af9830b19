"""The manifest of one version (an adapter or a merged model), and how its digest is computed.

A stored manifest is a JSON document ``{"content": {...}, "annotations": {...}}``. The version digest is
``sha256`` over the canonical JSON (sorted keys, no spaces, UTF-8) of ``content`` only: the files
(path, blob digest, size), the LoRA summary, the base binding and the trainer's metadata. The
annotations (adapter name, creation time, description) are not hashed, so pushing the same files for
the same base twice gives the same digest, under any name; the first push's annotations are kept.

Two kinds of version share this format. An **adapter**'s content has no ``kind`` field (it is the
format adapters have always had, so every existing digest is unchanged); a **merged model**'s content
carries ``"kind": "model"``, its own media type, a ``model`` summary (architecture, dtype, parameter
count, sizes) instead of ``adapter``, the base binding, and its ``lineage`` (the merge record) instead
of ``training``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from loraswap.errors import IntegrityError
from loraswap.registry.names import DIGEST_RE
from loraswap.registry.validate import ALLOWED_FILES
from loraswap.registry.validate_model import Lineage, ModelInfo, is_model_file, parse_lineage

SCHEMA_VERSION = 1
MEDIA_TYPE = "application/vnd.loraswap.adapter.manifest.v1+json"
MODEL_MEDIA_TYPE = "application/vnd.loraswap.model.manifest.v1+json"
ADAPTER = "adapter"
MODEL = "model"
KINDS = (ADAPTER, MODEL)
"""The kinds of version a registry holds."""


def canonical_json(value: Any) -> bytes:
    """The one serialisation that is hashed: sorted keys, compact separators, UTF-8, strict JSON (a
    NaN or Infinity raises ``ValueError``: validation refuses them before a manifest is built)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def stream_digest(handle: BinaryIO) -> str:
    """``sha256:<hex>`` of everything ``handle`` reads from where it stands (the one file hash)."""
    return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()


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
    """An immutable version: an adapter, or a merged model (``kind``).

    Attributes:
        name: The name it was resolved under.
        digest: ``sha256:<hex>`` of the canonical content (the version id).
        files: The files of the version, sorted by path.
        rank: Default LoRA rank ``r`` (``0`` for a model).
        alpha: Default ``lora_alpha`` (``0.0`` for a model).
        target_modules: Targeted module names, sorted (empty for a model).
        use_rslora: Rank-stabilised scaling (``False`` for a model).
        dtype: Tensor dtype(s).
        base_model_id: Adapter: the base it was pushed for (``--base``), else the config's
            ``base_model_name_or_path``. Model: the base its lineage names (``None`` without one).
        base_fingerprint: Adapter: ``base_fingerprint`` of that base when ``--base`` was given, else
            ``None``. Model: the base fingerprint its lineage names.
        created: ISO-8601 UTC time of the first push.
        description: Free text given at push.
        training: The trainer's ``training_metadata.json`` (lineage, metrics), if any (adapters).
        kind: ``"adapter"`` or ``"model"`` (:data:`KINDS`).
        model: A model's architecture, dtype and size summary (``None`` for an adapter).
        lineage: A model's merge record (``loraswap-merge.json``), if it had one.
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
    kind: str = ADAPTER
    model: ModelInfo | None = None
    lineage: Lineage | None = field(default=None, compare=False)

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
        if self.kind == MODEL:
            if self.model is None:
                raise ValueError("a model manifest needs its model summary")
            return model_content_of(
                self.files,
                self.model,
                {"model_id": self.base_model_id, "fingerprint": self.base_fingerprint},
                self.lineage,
            )
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
            "kind": self.kind,
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
            if _typed(content, dict).get("kind") == MODEL:
                return _model_from_content(content, notes, what, expected_digest)
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
        _check_files(manifest, lambda path: path in ALLOWED_FILES)
        if manifest.rank <= 0 or not math.isfinite(manifest.alpha) or manifest.alpha <= 0:
            raise IntegrityError(f"manifest {manifest.digest} has a bad rank or alpha")
        return _checked(manifest, content, expected_digest)


def _check_files(manifest: Manifest, allowed: Any) -> None:
    """A manifest never names a path outside its folder's file names, nor a file twice."""
    paths = [entry.path for entry in manifest.files]
    for entry in manifest.files:
        if not allowed(entry.path) or not DIGEST_RE.fullmatch(entry.digest) or entry.size < 0:
            raise IntegrityError(f"manifest {manifest.digest} lists a bad file entry {entry}")
    if len(set(paths)) != len(paths):
        raise IntegrityError(f"manifest {manifest.digest} lists a file twice")


def _checked(manifest: Manifest, content: Any, expected_digest: str | None) -> Manifest:
    """``manifest`` if its fields give back ``content`` exactly and it has the expected digest."""
    if canonical_json(manifest.content()) != canonical_json(content):  # e.g. another schema version
        raise IntegrityError(f"manifest {manifest.digest} holds content this version does not write")
    if expected_digest is not None and manifest.digest != expected_digest:
        raise IntegrityError(f"manifest {expected_digest} does not match its content ({manifest.digest})")
    return manifest


def _optional_int(value: Any) -> int | None:
    return None if value is None else _typed(value, int)


def _model_from_content(
    content: dict[str, Any], notes: Any, what: str, expected_digest: str | None
) -> Manifest:
    """A model manifest from its stored content (the types checked as strictly as an adapter's)."""
    try:
        model, base = _typed(content["model"], dict), _typed(content["base"], dict)
        info = ModelInfo(
            architecture=_typed(model["architecture"], str | None),
            model_type=_typed(model["model_type"], str),
            dtype=_typed(model["dtype"], str),
            parameters=_typed(model["parameters"], int),
            hidden_size=_optional_int(model["hidden_size"]),
            num_hidden_layers=_optional_int(model["num_hidden_layers"]),
            vocab_size=_optional_int(model["vocab_size"]),
        )
        lineage = None
        if content["lineage"] is not None:
            lineage, problems = parse_lineage(content["lineage"], "lineage")
            if problems:
                raise ValueError("; ".join(problems))
        manifest = Manifest(
            name=_typed(notes["name"], str),
            digest=sha256_digest(canonical_json(content)),
            files=tuple(_file_entry(f) for f in _typed(content["files"], list)),
            rank=0,
            alpha=0.0,
            target_modules=(),
            use_rslora=False,
            dtype=info.dtype,
            base_model_id=_typed(base["model_id"], str | None),
            base_fingerprint=_typed(base["fingerprint"], str | None),
            created=_typed(notes["created"], str),
            description=_typed(notes.get("description"), str | None),
            kind=MODEL,
            model=info,
            lineage=lineage,
        )
    except (ValueError, KeyError, TypeError, RecursionError, OverflowError) as exc:
        raise IntegrityError(f"{what} is unreadable: {str(exc)[:200]}") from None
    _check_files(manifest, is_model_file)
    return _checked(manifest, content, expected_digest)


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


def model_content_of(
    files: tuple[FileEntry, ...], model: ModelInfo, base: dict[str, Any], lineage: Lineage | None
) -> dict[str, Any]:
    """The hashed content of a model manifest."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": MODEL,
        "media_type": MODEL_MEDIA_TYPE,
        "files": [{"path": f.path, "digest": f.digest, "size": f.size} for f in sorted(files, key=_path)],
        "model": model.to_dict(),
        "base": base,
        "lineage": lineage.to_dict() if lineage else None,
    }


def _path(entry: FileEntry) -> str:
    return entry.path

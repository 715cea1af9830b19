"""``loraswap-merge.json``: the record of exactly what a merged model folder was made from."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraswap.errors import InvalidArgumentError

RECORD_FILE = "loraswap-merge.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class MergedAdapter:
    """One adapter of a merge.

    Attributes:
        ref: The reference as given (registry reference or folder path).
        name: Registry name, or the folder's name.
        digest: Registry version digest, or the folder's content digest.
        source: ``"registry"`` or ``"folder"``.
        weight: Its weight in the combination.
        rank: Its default LoRA rank ``r``.
        alpha: Its default ``lora_alpha``.
        use_rslora: Rank-stabilised scaling.
    """

    ref: str
    name: str
    digest: str
    source: str
    weight: float
    rank: int
    alpha: float
    use_rslora: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "name": self.name,
            "digest": self.digest,
            "source": self.source,
            "weight": self.weight,
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
        }


@dataclass(frozen=True)
class MergeRecord:
    """What a merged model is: written as :data:`RECORD_FILE` in the model folder, last.

    Attributes:
        method: The combination method (``linear``, ``cat``, ``ties``...).
        parameters: The method's parameters it used (``density``, ``majority_sign``, ``svd_rank``,
            ``svd_clamp``, ``seed``); empty for ``linear`` and ``cat``.
        adapters: The adapters, in merge order.
        base_model_id: The base model's id.
        base_fingerprint: ``base_fingerprint`` of the base folder (the merged folder has the same one: same
            architecture and tensor layout).
        dtype: The merged weights' dtype (``bfloat16``, ``float16`` or ``float32``).
        merged_modules: How many linear weights were changed.
        loraswap_version: The loraswap version that merged.
        created: ISO-8601 UTC time the merge finished.
        schema_version: Version of this document's layout.
    """

    method: str
    parameters: dict[str, Any]
    adapters: tuple[MergedAdapter, ...]
    base_model_id: str
    base_fingerprint: str
    dtype: str
    merged_modules: int
    loraswap_version: str
    created: str
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def adapter_digests(self) -> tuple[str, ...]:
        return tuple(adapter.digest for adapter in self.adapters)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (strict JSON: every number is finite)."""
        return {
            "schema_version": self.schema_version,
            "method": self.method,
            "parameters": dict(self.parameters),
            "adapters": [adapter.to_dict() for adapter in self.adapters],
            "base_model_id": self.base_model_id,
            "base_fingerprint": self.base_fingerprint,
            "dtype": self.dtype,
            "merged_modules": self.merged_modules,
            "loraswap_version": self.loraswap_version,
            "created": self.created,
            **self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    def write(self, folder: Path) -> Path:
        """Write :data:`RECORD_FILE` into ``folder``; return its path."""
        path = Path(folder) / RECORD_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, doc: Any) -> MergeRecord:
        """Parse a record document; keys this version does not know are kept in ``extra``.

        Raises:
            InvalidArgumentError: A missing or mistyped field (every one found).
        """
        if not isinstance(doc, dict):
            raise InvalidArgumentError(f"{RECORD_FILE} must hold a JSON object")
        doc = dict(doc)
        problems: list[str] = []

        def take(key: str, kind: Any, where: dict[str, Any] = doc, prefix: str = "") -> Any:
            value = where.pop(key, None)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, int | float)):
                problems.append(f"{prefix}{key} is missing or not {getattr(kind, '__name__', kind)}")
                return None
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{prefix}{key} is not a finite number")
            return value

        schema = take("schema_version", int)
        method = take("method", str)
        parameters = take("parameters", dict)
        model_id = take("base_model_id", str)
        fingerprint = take("base_fingerprint", str)
        dtype = take("dtype", str)
        merged_modules = take("merged_modules", int)
        version = take("loraswap_version", str)
        created = take("created", str)
        adapters: list[MergedAdapter] = []
        for index, item in enumerate(take("adapters", list) or []):
            if not isinstance(item, dict):
                problems.append(f"adapters[{index}] is not an object")
                continue
            item = dict(item)
            prefix = f"adapters[{index}]."
            fields = (
                take("ref", str, item, prefix),
                take("name", str, item, prefix),
                take("digest", str, item, prefix),
                take("source", str, item, prefix),
                take("weight", int | float, item, prefix),
                take("rank", int, item, prefix),
                take("alpha", int | float, item, prefix),
                bool(item.pop("use_rslora", False)),
            )
            if None not in fields:
                ref, name, digest, source, weight, rank, alpha, rslora = fields
                entry = MergedAdapter(ref, name, digest, source, float(weight), rank, float(alpha), rslora)
                adapters.append(entry)
        if problems:
            raise InvalidArgumentError(f"{RECORD_FILE} is not a valid merge record", problems)
        return cls(
            method=method,
            parameters=parameters,
            adapters=tuple(adapters),
            base_model_id=model_id,
            base_fingerprint=fingerprint,
            dtype=dtype,
            merged_modules=merged_modules,
            loraswap_version=version,
            created=created,
            schema_version=schema,
            extra=doc,
        )

    @classmethod
    def from_file(cls, path: Path) -> MergeRecord:
        """Read a record: the file itself, or a merged model folder holding :data:`RECORD_FILE`.

        Raises:
            InvalidArgumentError: The file is missing, not JSON, or not a valid record.
        """
        from loraswap.adapter_format import read_json_object

        path = Path(path)
        if path.is_dir():
            path = path / RECORD_FILE
        doc, problems = read_json_object(path, strict=True)
        if doc is None:
            raise InvalidArgumentError(f"no merge record at {path}", problems)
        return cls.from_dict(doc)

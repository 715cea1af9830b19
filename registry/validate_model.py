"""Merged-model validation on push: a standalone HF folder (``loraswap merge`` output), every problem at once.

A model folder holds **only** these regular files (anything else, whatever its name, is refused: an
unknown file could be remote code a loader runs, a sub-folder or link could pull in files from
elsewhere):

* ``config.json`` (required; a JSON object with a string ``model_type``);
* the weights (required), either ``model.safetensors`` or ``model-0000N-of-0000M.safetensors`` shards
  with ``model.safetensors.index.json`` (the index must name exactly the shards present, each tensor in
  the shard that holds it; the shards must be ``1..M`` of one ``M``), never both;
* the tokenizer: ``tokenizer.json`` or ``tokenizer.model`` (one required), ``tokenizer_config.json``,
  ``special_tokens_map.json``, ``added_tokens.json``, ``vocab.json``, ``merges.txt``,
  ``chat_template.jinja``;
* ``generation_config.json``, ``README.md``, and ``loraswap-merge.json``, the record of what was merged
  (its lineage goes into the manifest: see :class:`Lineage`).

Pickle weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.pkl``) are refused with the way to save
safetensors instead. Every safetensors header is checked by the library's rules before anything else is
read (:mod:`loraswap.safetensors_header`); tensor values are not read (the merge
checks them for NaN/Inf before it writes), so validating a model costs a few header reads whatever its size.
The JSON files are read through no-follow handles, each at most 16 MiB.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraswap.adapter_format import file_kind, not_regular_problem, open_adapter_file, read_json_object
from loraswap.errors import InvalidArgumentError
from loraswap.registry.names import DIGEST_RE
from loraswap.registry.validate import README, read_safetensors_header
from loraswap.safetensors_header import MAX_PROBLEMS, TensorEntry, dtype_label

MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
MERGE_RECORD = "loraswap-merge.json"
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
"""A shard's name (full match), as ``save_pretrained`` writes it."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
JSON_FILES = (
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
"""Checked to be JSON objects (``config.json``, the index and the merge record are parsed further)."""
MODEL_FILES = frozenset(
    (
        MODEL_CONFIG,
        MODEL_WEIGHTS,
        MODEL_INDEX,
        MERGE_RECORD,
        *TOKENIZER_FILES,
        *JSON_FILES,
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        README,
    )
)
"""Every fixed file name a model folder may hold (plus the shards, :data:`SHARD_RE`)."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_HINT = (
    "is a pickle file, which the registry refuses (loading it runs code); save the model with "
    "`model.save_pretrained(folder, safe_serialization=True)` to get safetensors"
)
ARCH_INTS = ("hidden_size", "num_hidden_layers", "vocab_size")


def is_model_file(name: str) -> bool:
    """Whether ``name`` is a file name a model folder may hold (a fixed name or a shard's)."""
    return name in MODEL_FILES or SHARD_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class LineageAdapter:
    """One adapter merged into a model, as ``loraswap-merge.json`` records it.

    Attributes:
        digest: The adapter version's digest (``sha256:<hex>``).
        weight: Its weight in the combination.
        name: The adapter's name, if recorded.
        ref: The reference the merge was given (``name:tag``...), if recorded.
    """

    digest: str
    weight: float
    name: str | None = None
    ref: str | None = None


@dataclass(frozen=True)
class Lineage:
    """What a merged model was made from (``loraswap-merge.json``), kept in its manifest.

    Attributes:
        adapters: The adapters merged, in order, with their weights.
        method: The combination method (``linear``, ``cat``, ``ties``...).
        parameters: The method's parameters (``density``, ``majority_sign_method``...).
        base_model_id: The base the adapters were merged into.
        base_fingerprint: That base's fingerprint (``sha256:<hex>``).
        dtype: The dtype the model was saved in.
        loraswap_version: The loraswap that merged it.
        created: When the merge ran (as the record says).
    """

    adapters: tuple[LineageAdapter, ...]
    method: str
    parameters: dict[str, Any]
    base_model_id: str | None = None
    base_fingerprint: str | None = None
    dtype: str | None = None
    loraswap_version: str | None = None
    created: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The form stored in the manifest (every field, ``None`` included)."""
        return {
            "adapters": [
                {"digest": a.digest, "weight": a.weight, "name": a.name, "ref": a.ref} for a in self.adapters
            ],
            "method": self.method,
            "parameters": self.parameters,
            "base_model_id": self.base_model_id,
            "base_fingerprint": self.base_fingerprint,
            "dtype": self.dtype,
            "loraswap_version": self.loraswap_version,
            "created": self.created,
        }


@dataclass(frozen=True)
class ModelInfo:
    """The architecture, dtype and size summary of a model (from ``config.json`` and the weight headers).

    Attributes:
        architecture: ``architectures[0]`` of the config (``LlamaForCausalLM``...), if given.
        model_type: The config's ``model_type`` (``llama``...).
        dtype: Tensor dtype(s) of the weights (``bfloat16``...; comma-separated if mixed).
        parameters: Number of values in all weight tensors.
        hidden_size: The config's ``hidden_size`` (or its ``text_config``'s), if given.
        num_hidden_layers: Likewise ``num_hidden_layers``.
        vocab_size: Likewise ``vocab_size``.
    """

    architecture: str | None
    model_type: str
    dtype: str
    parameters: int
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    vocab_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The form stored in the manifest."""
        return {
            "architecture": self.architecture,
            "model_type": self.model_type,
            "dtype": self.dtype,
            "parameters": self.parameters,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
        }


@dataclass(frozen=True)
class ModelSummary:
    """What validation learnt about a valid model folder.

    Attributes:
        folder: The folder validated.
        files: Names of the files to push (sorted): every file of the folder.
        total_bytes: Their size.
        info: Architecture, dtype and size.
        lineage: The merge record, when ``loraswap-merge.json`` is there.
    """

    folder: Path
    files: tuple[str, ...]
    total_bytes: int
    info: ModelInfo
    lineage: Lineage | None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _optional(doc: dict[str, Any], key: str, kind: Any, problems: list[str], what: str) -> Any:
    value = doc.get(key)
    if value is not None and not isinstance(value, kind):
        problems.append(f"{what}: {key} must be {getattr(kind, '__name__', kind)} or null")
        return None
    return value


def parse_lineage(doc: Any, what: str = MERGE_RECORD) -> tuple[Lineage | None, list[str]]:
    """A merge record (or the lineage stored in a manifest) as a :class:`Lineage`, or its problems.

    Required: ``adapters`` (a non-empty list of objects with a ``sha256:<hex>`` ``digest`` and a finite
    number ``weight``; ``name`` and ``ref`` strings or absent) and ``method`` (a non-empty string).
    Optional: ``parameters`` (an object), ``base_fingerprint`` (a digest), ``base_model_id``, ``dtype``,
    ``loraswap_version``, ``created`` (strings). Other keys are left in the file and not stored.
    """
    if not isinstance(doc, dict):
        return None, [f"{what} must hold a JSON object"]
    problems: list[str] = []
    adapters: list[LineageAdapter] = []
    entries = doc.get("adapters")
    if not isinstance(entries, list) or not entries:
        problems.append(f"{what}: adapters must be a non-empty list")
        entries = []
    for index, entry in enumerate(entries):
        where = f"{what}: adapters[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} must be an object")
            continue
        digest, weight = entry.get("digest"), entry.get("weight")
        bad = len(problems)
        if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
            problems.append(f"{where}.digest must be sha256:<64 lower-case hex digits>")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            problems.append(f"{where}.weight must be a finite number")
        name = _optional(entry, "name", str, problems, where)
        ref = _optional(entry, "ref", str, problems, where)
        if len(problems) == bad:
            adapters.append(LineageAdapter(digest, float(weight), name, ref))
    method = doc.get("method")
    if not isinstance(method, str) or not method:
        problems.append(f"{what}: method must be a non-empty string")
    parameters = doc.get("parameters", {})
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        problems.append(f"{what}: parameters must be an object")
    fingerprint = _optional(doc, "base_fingerprint", str, problems, what)
    if fingerprint is not None and not DIGEST_RE.fullmatch(fingerprint):
        problems.append(f"{what}: base_fingerprint must be sha256:<64 lower-case hex digits>")
    strings = {key: _optional(doc, key, str, problems, what) for key in ("base_model_id", "dtype")}
    strings |= {key: _optional(doc, key, str, problems, what) for key in ("loraswap_version", "created")}
    if problems:
        return None, problems
    return Lineage(tuple(adapters), method, parameters, base_fingerprint=fingerprint, **strings), []


def _select_files(folder: Path) -> tuple[list[str], list[str]]:
    """(files to push, problems) of the folder's entries; only ``lstat`` is used here."""
    files: list[str] = []
    problems: list[str] = []
    for name in sorted(os.listdir(folder)):
        try:
            mode = os.lstat(folder / name).st_mode
        except FileNotFoundError:  # removed meanwhile
            continue
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            problems.append(not_regular_problem(name, mode).replace("an adapter folder", "a model folder"))
        elif name.lower().endswith(PICKLE_SUFFIXES):
            problems.append(f"{name} {PICKLE_HINT}")
        elif stat.S_ISDIR(mode):
            problems.append(f"{name} is {file_kind(mode)}: a model folder holds only files")
        elif is_model_file(name):
            files.append(name)
        else:
            problems.append(
                f"{name} is not a file of a model folder (allowed: {', '.join(sorted(MODEL_FILES))} and "
                "model-0000N-of-0000M.safetensors shards)"
            )
    return files, problems


def _read_header(path: Path) -> tuple[dict[str, TensorEntry], list[str]]:
    try:
        with open_adapter_file(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            header, problems = read_safetensors_header(handle, size, path.name)
    except InvalidArgumentError as exc:
        return {}, [str(exc)]
    except OSError as exc:
        return {}, [f"{path.name} cannot be read: {exc.strerror or exc}"]
    if not problems and not header.entries:
        problems.append(f"{path.name} holds no tensors")
    return header.entries, problems


def _index_problems(folder: Path, shards: list[str], headers: dict[str, dict[str, TensorEntry]]) -> list[str]:
    """The index must name exactly the shards present, ``1..M`` of one ``M``, each tensor where it is."""
    doc, problems = read_json_object(folder / MODEL_INDEX)
    if doc is None:
        return problems
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return [f"{MODEL_INDEX}: weight_map must be an object of tensor name -> shard file name"]
    if not weight_map:
        return [f"{MODEL_INDEX}: weight_map is empty"]
    named = set(weight_map.values())
    for shard in sorted(named):
        if not SHARD_RE.fullmatch(shard):
            problems.append(f"{MODEL_INDEX} names {shard[:80]!r}, which is not a shard name")
        elif shard not in shards:
            problems.append(f"{MODEL_INDEX} names shard {shard}, which is not in the folder")
    problems += [f"shard {s} is not named by {MODEL_INDEX}" for s in shards if s not in named]
    numbers = sorted((int(m[1]), int(m[2])) for s in shards if (m := SHARD_RE.fullmatch(s)))
    totals = {total for _, total in numbers}
    if len(totals) > 1 or (totals and [n for n, _ in numbers] != list(range(1, totals.pop() + 1))):
        problems.append("the shards are not model-00001-of-M ... model-M-of-M of one M")
    if problems:
        return problems
    for tensor, shard in sorted(weight_map.items()):
        if tensor not in headers.get(shard, {}):
            problems.append(f"{MODEL_INDEX} maps tensor {tensor[:80]!r} to {shard}, which does not hold it")
    for shard in shards:
        for tensor in sorted(headers.get(shard, {})):
            if weight_map.get(tensor) != shard:
                problems.append(f"tensor {tensor[:80]!r} of {shard} is not mapped to it by {MODEL_INDEX}")
    if len(problems) > MAX_PROBLEMS:
        extra = len(problems) - MAX_PROBLEMS
        problems = [*problems[:MAX_PROBLEMS], f"{MODEL_INDEX}: ... and {extra} more problems"]
    return problems


def _weight_problems(folder: Path, files: list[str]) -> tuple[dict[str, dict[str, TensorEntry]], list[str]]:
    """Headers of every weight file, and the problems of the weight layout."""
    shards = [name for name in files if SHARD_RE.fullmatch(name)]
    single, indexed = MODEL_WEIGHTS in files, MODEL_INDEX in files
    if single and (indexed or shards):
        return {}, [f"the folder holds both {MODEL_WEIGHTS} and sharded weights: keep one of the two"]
    if not single and not indexed:
        if shards:
            return {}, [f"shards {', '.join(shards)} come without {MODEL_INDEX}"]
        return {}, [f"no weights: {MODEL_WEIGHTS} (or shards with {MODEL_INDEX}) is missing"]
    headers: dict[str, dict[str, TensorEntry]] = {}
    problems: list[str] = []
    for name in [MODEL_WEIGHTS] if single else shards:
        headers[name], header_problems = _read_header(folder / name)
        problems += header_problems
    seen: dict[str, str] = {}
    for name, entries in headers.items():
        for tensor in entries:
            if tensor in seen:
                problems.append(f"tensor {tensor[:80]!r} is in both {seen[tensor]} and {name}")
            seen.setdefault(tensor, name)
    if indexed and not problems:
        problems += _index_problems(folder, shards, headers)
    return headers, problems


def _config_info(folder: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """``config.json``'s summary fields (``model_type``, ``architecture``, sizes), or its problems."""
    doc, problems = read_json_object(folder / MODEL_CONFIG)
    if doc is None:
        return None, problems
    model_type = doc.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        problems.append(f"{MODEL_CONFIG}: model_type must be a non-empty string")
    architectures = doc.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)
    ):
        problems.append(f"{MODEL_CONFIG}: architectures must be a list of strings")
        architectures = None
    text = doc.get("text_config") if isinstance(doc.get("text_config"), dict) else {}
    fields: dict[str, Any] = {"model_type": model_type, "architecture": (architectures or [None])[0]}
    for key in ARCH_INTS:
        value = doc.get(key, text.get(key))
        if value is not None and (not _is_count(value) or value == 0):
            problems.append(f"{MODEL_CONFIG}: {key} must be a positive integer")
            value = None
        fields[key] = value
    return (None if problems else fields), problems


def _dtype_of(headers: dict[str, dict[str, TensorEntry]]) -> str:
    names = {dtype_label(e.dtype) for entries in headers.values() for e in entries.values()}
    return ",".join(sorted(names))


def validate_model_dir(folder: Path) -> ModelSummary:
    """Check a merged-model folder before it is pushed (the module's rules).

    Args:
        folder: A standalone HF model folder (it may itself be reached through a symbolic link; its
            entries may not be links).

    Returns:
        The summary of a valid model.

    Raises:
        InvalidArgumentError: Listing every problem found (a missing folder, or a path that is not a
            folder, is one such problem).
    """
    folder = Path(folder)
    what = f"model folder {folder} is not valid"
    try:
        mode = os.stat(folder).st_mode
        if not stat.S_ISDIR(mode):
            raise InvalidArgumentError(what, [f"{folder} is {file_kind(mode)}, not a folder"])
        files, problems = _select_files(folder)
    except FileNotFoundError:
        raise InvalidArgumentError(what, [f"{folder} does not exist"]) from None
    except OSError as exc:
        raise InvalidArgumentError(what, [f"{folder} cannot be read: {exc.strerror or exc}"]) from None
    fields = None
    if MODEL_CONFIG in files:
        fields, config_problems = _config_info(folder)
        problems += config_problems
    elif not any(p.startswith(f"{MODEL_CONFIG} ") for p in problems):
        problems.append(f"{MODEL_CONFIG} is missing")
    if not any(name in files for name in TOKENIZER_FILES):
        problems.append(f"no tokenizer: {' or '.join(TOKENIZER_FILES)} is missing")
    for name in JSON_FILES:
        if name in files:
            problems += read_json_object(folder / name)[1]
    headers, weight_problems = _weight_problems(folder, files)
    problems += weight_problems
    lineage = None
    if MERGE_RECORD in files:
        record, record_problems = read_json_object(folder / MERGE_RECORD, strict=True)
        problems += record_problems
        if record is not None:
            lineage, lineage_problems = parse_lineage(record)
            problems += lineage_problems
    if problems or fields is None:
        raise InvalidArgumentError(what, problems)
    parameters = sum(math.prod(e.shape) for entries in headers.values() for e in entries.values())
    info = ModelInfo(dtype=_dtype_of(headers), parameters=parameters, **fields)
    total = sum(os.lstat(folder / name).st_size for name in files)
    return ModelSummary(folder, tuple(files), total, info, lineage)

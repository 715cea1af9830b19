"""Adapter validation on push: every problem of a folder, reported at once in one error.

Files: ``adapter_config.json`` and ``adapter_model.safetensors`` are required; ``README.md`` and
``training_metadata.json`` are pushed when present; any other regular file or sub-folder (optimizer
states, tokenizer files, checkpoints) is **ignored** (logged, and listed in
:attr:`AdapterSummary.ignored`). A pickle ``adapter_model.bin`` without a safetensors file is refused
with the way to convert it.

Refused, so that nothing outside the folder is ever read and nothing blocks: any entry that is a
symbolic link, named pipe, socket or device (whatever its name), and a folder under a pushed file's
name. The safetensors header is checked by the library's own rules before any tensor is read, and a
header that names a tensor twice is refused (:mod:`loraswap.safetensors_header`); also refused are: a
file with no tensors, tensors that are not F16/BF16/F32/F64 or hold NaN/Inf, and a supported target
module of the config with no tensors in the file.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from loraswap.adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLE_WEIGHTS,
    SUPPORTED_TARGETS,
    TRAINING_METADATA,
    LoraAdapterConfig,
    file_kind,
    matches_target,
    not_regular_problem,
    open_adapter_file,
    parse_lora_key,
    read_adapter_config,
    read_json_object,
)
from loraswap.errors import AdapterValidationError, InvalidArgumentError
from loraswap.models import BaseModelRef
from loraswap.models.fingerprint import weight_shapes
from loraswap.safetensors_header import (
    WEIGHT_FLOATS,
    Header,
    SafetensorsError,
    TensorEntry,
    dtype_label,
    read_header,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 * 1024**3
README = "README.md"
REQUIRED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
ALLOWED_FILES = frozenset((*REQUIRED_FILES, README, TRAINING_METADATA))
CONVERT_HINT = (
    f"{PICKLE_WEIGHTS} is a pickle file, which the registry refuses; convert it with "
    f"`sd = torch.load('{PICKLE_WEIGHTS}', weights_only=True); "
    f"safetensors.torch.save_file(sd, '{ADAPTER_WEIGHTS}')` (or save with safe_serialization=True)"
)
NO_HEADER = Header({}, {}, 0)


@dataclass(frozen=True)
class AdapterSummary:
    """What validation learnt about a valid adapter folder.

    Attributes:
        folder: The folder validated.
        config: Its parsed ``adapter_config.json``.
        files: Names of the files to push (sorted).
        ignored: Names of the entries that are not pushed.
        tensor_shapes: LoRA tensor name → shape.
        dtype: Tensor dtype (``float32``, ``bfloat16``…; comma-separated if mixed).
        total_bytes: Size of the files to push.
        training: The parsed ``training_metadata.json``, if present.
    """

    folder: Path
    config: LoraAdapterConfig
    files: tuple[str, ...]
    ignored: tuple[str, ...]
    tensor_shapes: dict[str, list[int]]
    dtype: str
    total_bytes: int
    training: dict[str, Any] | None


def _list_folder(folder: Path) -> tuple[list[str], list[str], set[str], list[str]] | str:
    """:func:`_select_files` of ``folder``, or why it is not a folder that can be read."""
    try:
        mode = os.stat(folder).st_mode
        if not stat.S_ISDIR(mode):
            return f"{folder} is {file_kind(mode)}, not a folder"
        return _select_files(folder)
    except FileNotFoundError:
        return f"{folder} does not exist"
    except OSError as exc:
        return f"{folder} cannot be read: {exc.strerror or exc}"


def _size(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:  # gone meanwhile: reading it reports the problem
        return 0


def _select_files(folder: Path) -> tuple[list[str], list[str], set[str], list[str]]:
    """Split the folder's entries into (files to push, ignored entries, refused entries, problems).

    Only ``lstat`` is used: no entry is opened or followed here.
    """
    files: list[str] = []
    ignored: list[str] = []
    refused: set[str] = set()
    problems: list[str] = []
    names = sorted(os.listdir(folder))
    for name in names:
        try:
            mode = os.lstat(folder / name).st_mode
        except FileNotFoundError:  # removed meanwhile
            continue
        if stat.S_ISREG(mode):
            (files if name in ALLOWED_FILES else ignored).append(name)
        elif stat.S_ISDIR(mode) and name not in ALLOWED_FILES:
            ignored.append(name)
        else:
            refused.add(name)
            problems.append(not_regular_problem(name, mode))
    if ADAPTER_WEIGHTS not in files and ADAPTER_WEIGHTS not in refused:
        problems.append(CONVERT_HINT if PICKLE_WEIGHTS in names else f"{ADAPTER_WEIGHTS} is missing")
    return files, ignored, refused, problems


def read_safetensors_header(
    handle: BinaryIO, size: int, file_name: str = ADAPTER_WEIGHTS
) -> tuple[Header, list[str]]:
    """:func:`loraswap.safetensors_header.read_header` of ``handle`` (``size`` bytes), its refusal as
    problem lines that name ``file_name``.

    Returns:
        The checked header (empty when there are problems) and the problems.
    """
    try:
        return read_header(handle, size), []
    except SafetensorsError as exc:
        bad = f"{file_name} is not a readable safetensors file"
        return NO_HEADER, [f"{bad}: {problem}" for problem in exc.problems]


def _read_tensors(path: Path, scan_values: bool) -> tuple[dict[str, list[int]], set[str], list[str]]:
    """Shapes and dtypes of every tensor; a bad header, non-float dtypes and NaN/Inf are problems.

    The file is read through one descriptor opened by :func:`open_adapter_file`; the values (when
    ``scan_values``) one tensor at a time, only once the header is known to be sound.
    """
    try:
        with open_adapter_file(path) as handle:
            header, problems = read_safetensors_header(handle, os.fstat(handle.fileno()).st_size)
            dtypes = {dtype_label(e.dtype) for e in header.entries.values()}
            problems += weight_dtype_problems({name: e.dtype for name, e in header.entries.items()})
            for name, entry in sorted(header.entries.items()) if scan_values else ():
                if entry.dtype in WEIGHT_FLOATS and not _finite(handle, header.data_start, entry):
                    problems.append(f"tensor {name} contains NaN or Inf values")
    except InvalidArgumentError as exc:
        return {}, set(), [str(exc)]
    except OSError as exc:
        return {}, set(), [f"{ADAPTER_WEIGHTS} cannot be read: {exc.strerror or exc}"]
    if not problems and not header.entries:
        problems.append(f"{ADAPTER_WEIGHTS} holds no tensors")
    return header.shapes(), dtypes, problems


def _finite(handle: BinaryIO, data_start: int, entry: TensorEntry) -> bool:
    """Whether a float tensor of a checked header holds no NaN/Inf (its bytes read here;
    :func:`loraswap.finite.all_finite`)."""
    import torch

    from loraswap.finite import all_finite

    if entry.end == entry.begin:
        return True
    handle.seek(data_start + entry.begin)
    data = bytearray(handle.read(entry.end - entry.begin))
    if len(data) != entry.end - entry.begin:
        raise InvalidArgumentError(f"{ADAPTER_WEIGHTS} changed while it was read")
    return all_finite(torch.frombuffer(data, dtype=entry.torch_dtype))


def weight_dtype_problems(dtypes: dict[str, str]) -> list[str]:
    """The tensors (name → safetensors dtype) whose dtype LoRA weights may not have
    (:data:`~loraswap.safetensors_header.WEIGHT_FLOATS` only)."""
    return [
        f"tensor {name} has dtype {dtype}; LoRA weights must be floats ({', '.join(WEIGHT_FLOATS)})"
        for name, dtype in sorted(dtypes.items())
        if dtype not in WEIGHT_FLOATS
    ]


def _read_training(folder: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """``training_metadata.json`` as strict JSON (it is stored in the manifest: no NaN/Infinity)."""
    return read_json_object(folder / TRAINING_METADATA, strict=True)


def _pairs(shapes: dict[str, list[int]]) -> tuple[dict[str, dict[str, list[int]]], list[str]]:
    """Group LoRA tensors by module: ``{module: {"A": shape, "B": shape}}``, plus stray-key problems."""
    pairs: dict[str, dict[str, list[int]]] = {}
    problems = []
    for name, shape in shapes.items():
        parsed = parse_lora_key(name)
        if parsed is None:
            problems.append(f"tensor {name} is not a LoRA weight (base_model.model.<module>.lora_A/B.weight)")
        elif len(shape) != 2:
            problems.append(f"tensor {name} has shape {shape}; LoRA weights are matrices")
        elif parsed[1] in pairs.get(parsed[0], {}):  # e.g. lora_A.weight and lora_A.other.weight
            problems.append(f"{parsed[0]}: more than one lora_{parsed[1]} tensor (tensor {name})")
        else:
            pairs.setdefault(parsed[0], {})[parsed[1]] = shape
    return pairs, problems


def lora_shape_problems(config: LoraAdapterConfig, tensor_shapes: dict[str, list[int]]) -> list[str]:
    """Problems between the config and the tensors: targets, ranks, A/B pairs, shapes."""
    problems = [
        f"target module {t!r} is not supported; supported: {', '.join(SUPPORTED_TARGETS)}"
        for t in config.target_modules
        if t.rsplit(".", 1)[-1] not in SUPPORTED_TARGETS
    ]
    pairs, stray = _pairs(tensor_shapes)
    problems += stray
    if not pairs and not stray:
        problems.append(f"{ADAPTER_WEIGHTS} holds no LoRA tensors")
    for module, pair in sorted(pairs.items()):
        if not config.targets(module):
            problems.append(f"{module}: module {module.rsplit('.', 1)[-1]!r} is not in target_modules")
        missing = [ab for ab in ("A", "B") if ab not in pair]
        if missing:
            problems.append(f"{module}: lora_{missing[0]} is missing (A/B pairs must be complete)")
            continue
        rank = config.rank_of(module)
        if pair["A"][0] != rank:
            problems.append(f"{module}: lora_A has shape {pair['A']}, expected [r={rank}, in_features]")
        if pair["B"][1] != rank:
            problems.append(f"{module}: lora_B has shape {pair['B']}, expected [out_features, r={rank}]")
    return problems


def _coverage_problems(config: LoraAdapterConfig, tensor_shapes: dict[str, list[int]]) -> list[str]:
    """A supported target module of the config that no tensor of the file belongs to (the file is
    incomplete or the config is not the one it was saved with)."""
    pairs, _ = _pairs(tensor_shapes)
    return [
        f"target module {target!r} has no tensors in {ADAPTER_WEIGHTS}"
        for target in config.target_modules
        if target.rsplit(".", 1)[-1] in SUPPORTED_TARGETS
        and not any(matches_target(m, target) for m in pairs)
    ]


def base_compat_problems(
    config: LoraAdapterConfig, tensor_shapes: dict[str, list[int]], base_shapes: dict[str, list[int]]
) -> list[str]:
    """Why an adapter cannot apply to a base, or ``[]``.

    Args:
        config: The adapter's parsed config.
        tensor_shapes: The adapter's tensor name → shape (PEFT keys).
        base_shapes: The base's weight name → shape (``weight_shapes(base.path)``).

    Returns:
        One line per problem: a targeted module missing from the base, or A/B dimensions that differ
        from the base weight's ``[out_features, in_features]``.
    """
    problems = []
    base_modules = {name.removesuffix(".weight") for name in base_shapes if name.endswith(".weight")}
    for target in config.target_modules:
        if not any(matches_target(m, target) for m in base_modules):
            problems.append(f"target module {target!r} does not exist in the base model")
    pairs, _ = _pairs(tensor_shapes)
    for module, pair in sorted(pairs.items()):
        base_shape = base_shapes.get(f"{module}.weight")
        if base_shape is None or len(base_shape) != 2:
            problems.append(f"{module}: no such linear layer in the base model")
            continue
        out_features, in_features = base_shape
        if "A" in pair and pair["A"][1] != in_features:
            problems.append(f"{module}: lora_A has in_features={pair['A'][1]}, the base has {in_features}")
        if "B" in pair and pair["B"][0] != out_features:
            problems.append(f"{module}: lora_B has out_features={pair['B'][0]}, the base has {out_features}")
    return problems


def validate_adapter_dir(
    folder: Path, base: BaseModelRef | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> AdapterSummary:
    """Check an adapter folder before it is pushed.

    Args:
        folder: A PEFT adapter folder (it may itself be reached through a symbolic link; its entries
            may not be links).
        base: When given, every targeted module must exist in it with matching dimensions.
        max_bytes: Largest total size of the files pushed.

    Returns:
        The summary of a valid adapter.

    Raises:
        AdapterValidationError: Listing every problem found (a missing folder, or a path that is not
            a folder, is one such problem).
    """
    folder = Path(folder)
    listing = _list_folder(folder)
    if isinstance(listing, str):
        raise AdapterValidationError(f"adapter folder {folder} is not valid", [listing])
    files, ignored, refused, problems = listing
    config = None
    if ADAPTER_CONFIG not in refused:
        config, config_problems = read_adapter_config(folder)
        problems += config_problems
    total = sum(_size(folder / name) for name in files)
    if total > max_bytes:
        problems.append(f"adapter is {total} bytes, over the {max_bytes}-byte limit")
    shapes: dict[str, list[int]] = {}
    dtypes: set[str] = set()
    if ADAPTER_WEIGHTS in files:
        shapes, dtypes, tensor_problems = _read_tensors(folder / ADAPTER_WEIGHTS, total <= max_bytes)
        problems += tensor_problems
    training = None
    if TRAINING_METADATA in files:
        training, training_problems = _read_training(folder)
        problems += training_problems
    if config is not None and shapes:
        problems += lora_shape_problems(config, shapes)
        problems += _coverage_problems(config, shapes)
        if base is not None:
            problems += base_compat_problems(config, shapes, weight_shapes(base.path))
    if problems or config is None:
        raise AdapterValidationError(f"adapter {folder} is not valid", problems)
    if ignored:
        log.warning("%s: not pushed (not part of an adapter): %s", folder, ", ".join(ignored))
    return AdapterSummary(
        folder, config, tuple(files), tuple(ignored), shapes, ",".join(sorted(dtypes)), total, training
    )

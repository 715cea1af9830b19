"""Adapter validation on push: every problem of a folder, reported at once in one error.

Files: ``adapter_config.json`` and ``adapter_model.safetensors`` are required; ``README.md`` and
``training_metadata.json`` are pushed when present; any other file (optimizer states, tokenizer files,
checkpoints, sub-folders) is **ignored** (logged, and listed in :attr:`AdapterSummary.ignored`). A pickle
``adapter_model.bin`` without a safetensors file is refused with the way to convert it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from loraswap.adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLE_WEIGHTS,
    SUPPORTED_TARGETS,
    TRAINING_METADATA,
    LoraAdapterConfig,
    matches_target,
    parse_lora_key,
    read_adapter_config,
)
from loraswap.errors import AdapterValidationError
from loraswap.models import BaseModelRef
from loraswap.models.fingerprint import weight_shapes

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


def _select_files(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """Split the folder's entries into (files to push, ignored entries, problems)."""
    names = sorted(entry.name for entry in folder.iterdir())
    files = [name for name in names if name in ALLOWED_FILES and (folder / name).is_file()]
    ignored = [name for name in names if name not in files]
    problems = []
    if ADAPTER_WEIGHTS not in files:
        problems.append(CONVERT_HINT if PICKLE_WEIGHTS in names else f"{ADAPTER_WEIGHTS} is missing")
    return files, ignored, problems


def _read_tensors(path: Path, scan_values: bool) -> tuple[dict[str, list[int]], set[str], list[str]]:
    """Shapes and dtypes of every tensor; NaN/Inf and non-float tensors are problems."""
    import torch

    shapes: dict[str, list[int]] = {}
    dtypes: set[str] = set()
    problems: list[str] = []
    try:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[name] = list(handle.get_slice(name).get_shape())
                if not scan_values:
                    continue
                tensor = handle.get_tensor(name)
                dtypes.add(str(tensor.dtype).removeprefix("torch."))
                if not tensor.is_floating_point():
                    problems.append(f"tensor {name} has dtype {tensor.dtype}; LoRA weights must be floats")
                elif not bool(torch.isfinite(tensor).all()):
                    problems.append(f"tensor {name} contains NaN or Inf values")
    except (SafetensorError, OSError) as exc:
        problems.append(f"{ADAPTER_WEIGHTS} is not a readable safetensors file: {exc}")
    return shapes, dtypes, problems


def _read_training(folder: Path) -> tuple[dict[str, Any] | None, list[str]]:
    path = folder / TRAINING_METADATA
    if not path.is_file():
        return None, []
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, [f"{TRAINING_METADATA} is not valid JSON: {exc}"]
    if not isinstance(doc, dict):
        return None, [f"{TRAINING_METADATA} must hold a JSON object"]
    return doc, []


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
        folder: A PEFT adapter folder.
        base: When given, every targeted module must exist in it with matching dimensions.
        max_bytes: Largest total size of the files pushed.

    Returns:
        The summary of a valid adapter.

    Raises:
        AdapterValidationError: Listing every problem found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterValidationError(f"adapter folder {folder} does not exist")
    files, ignored, problems = _select_files(folder)
    config, config_problems = read_adapter_config(folder)
    problems += config_problems
    total = sum((folder / name).stat().st_size for name in files)
    if total > max_bytes:
        problems.append(f"adapter is {total} bytes, over the {max_bytes}-byte limit")
    shapes: dict[str, list[int]] = {}
    dtypes: set[str] = set()
    if ADAPTER_WEIGHTS in files:
        shapes, dtypes, tensor_problems = _read_tensors(folder / ADAPTER_WEIGHTS, total <= max_bytes)
        problems += tensor_problems
    training, training_problems = _read_training(folder)
    problems += training_problems
    if config is not None and shapes:
        problems += lora_shape_problems(config, shapes)
        if base is not None:
            problems += base_compat_problems(config, shapes, weight_shapes(base.path))
    if problems or config is None:
        raise AdapterValidationError(f"adapter {folder} is not valid", problems)
    if ignored:
        log.warning("%s: not pushed (not part of an adapter): %s", folder, ", ".join(ignored))
    return AdapterSummary(
        folder, config, tuple(files), tuple(ignored), shapes, ",".join(sorted(dtypes)), total, training
    )

"""The merge itself: adapters folded into a base checkpoint's own weights, written as a standalone HF folder.

The base folder's safetensors are streamed one tensor at a time (``safe_open``; one output shard is held
at a time), every targeted linear weight becomes ``W + ΔW`` in fp32 (``ΔW`` from
:mod:`loraswap.merge.methods`), is checked finite (:func:`loraswap.finite.all_finite`; again after the
cast to the output dtype) before its shard is written, and the shards keep the base's layout (same file
names, an index when the base has one). config.json (its dtype updated), generation_config.json, the
tokenizer files and the chat template are copied, and :data:`~loraswap.merge.record.RECORD_FILE` is
written last.

Everything is written into a hidden temporary folder beside the output (``.<name>.merging-<pid>-<id>``)
that is renamed into place once complete: a failed merge removes it, a killed one leaves only that hidden
folder (removed by the next merge into the same output once its process is gone), never a folder at the
output path. With ``force`` an existing output is replaced only after the new folder is complete.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraswap import __version__
from loraswap.adapter_format import ADAPTER_WEIGHTS, LoraAdapterConfig, parse_lora_key
from loraswap.errors import AdapterValidationError, IncompatibleAdapterError, InvalidArgumentError
from loraswap.merge.methods import LoraFactors, MergeParams, check_params, module_delta
from loraswap.merge.record import MergedAdapter, MergeRecord
from loraswap.merge.sources import AdapterSource
from loraswap.models import BaseModelRef, base_fingerprint, resolve_base
from loraswap.models.weight_files import INDEX_FILE, weight_files
from loraswap.safetensors_header import read_header_file

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}
"""Accepted ``dtype`` spellings → the torch dtype name written."""
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
"""The base's files copied beside the merged weights (those present): the generation config, the
tokenizer and the chat template; the files a registry model folder may hold."""
CHAT_TEMPLATE_JSON = "chat_template.json"
TEMP_MARK = ".merging-"
MAX_LISTED = 20
"""Most modules named in one refusal line."""


@dataclass(frozen=True)
class _Adapter:
    """A validated adapter: its source, config and tensor shapes."""

    source: AdapterSource
    config: LoraAdapterConfig
    shapes: dict[str, list[int]]

    def pairs(self) -> dict[str, tuple[str, str]]:
        """Module → (lora_A key, lora_B key), as the file spells them."""
        keys: dict[str, dict[str, str]] = {}
        for key in self.shapes:
            module, ab = parse_lora_key(key)  # type: ignore[misc]  # validation refused other keys
            keys.setdefault(module, {})[ab] = key
        return {module: (pair["A"], pair["B"]) for module, pair in keys.items()}

    def max_rank(self) -> int:
        """PEFT's rank of the adapter for sizing a combination: ``r`` or the largest pattern rank."""
        return max([self.config.r, *self.config.rank_pattern.values()])


def merge_adapters(
    base_dir: Path | BaseModelRef,
    adapters: list[AdapterSource],
    output: Path,
    *,
    method: str = "linear",
    weights: list[float] | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    seed: int = 0,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = False,
) -> MergeRecord:
    """Merge ``adapters`` into the base's weights and write a standalone HF model folder at ``output``.

    Everything is checked before any weight is read: the parameters (see
    :func:`loraswap.merge.methods.check_params`), the output, each adapter's validity, each adapter's fit
    to the base (every reason, for every adapter) and the method's requirements (equal ranks, same
    targets). It holds no global state and may run in a background thread.

    Args:
        base_dir: An unquantized local HF folder (or its :class:`BaseModelRef`); its safetensors are
            the weights merged into.
        adapters: The adapters, in order (see :func:`loraswap.merge.sources.resolve_adapter`).
        output: The folder to create; it must not exist or be empty unless ``force``.
        method: A method of :data:`loraswap.merge.methods.METHODS`; one adapter merges with ``linear``
            (or ``cat``, the same result).
        weights: One weight per adapter; default 1.0 each.
        density: Fraction of entries kept by the pruning methods (``ties*``, ``dare_*``,
            ``magnitude_prune*``), in (0, 1].
        majority_sign: ``total`` or ``frequency``: the TIES methods' sign election.
        svd_rank: Rank of the SVD methods' delta (default: the largest adapter rank).
        svd_clamp: Quantile in (0, 1] the SVD methods clamp the factors to (default: no clamping).
        seed: Seed of DARE's random masks.
        dtype: ``bf16``, ``fp16`` or ``fp32`` (or the torch names); default the base's dtype (fp32 for a
            base in another float type).
        force: Replace an existing non-empty ``output`` (only once the new folder is complete).
        progress: Show a tqdm progress bar on stderr.

    Returns:
        The record written to ``output/loraswap-merge.json``.

    Raises:
        InvalidArgumentError: Bad parameters, a refused output, a quantized base, or merged weights
            that are not finite (nothing is left behind).
        AdapterValidationError: An adapter folder that is not a valid LoRA adapter.
        IncompatibleAdapterError: Adapters made for another base (every reason listed).
    """
    import torch

    params = check_params(
        method,
        len(adapters),
        weights,
        density=density,
        majority_sign=majority_sign,
        svd_rank=svd_rank,
        svd_clamp=svd_clamp,
        seed=seed,
    )
    base = base_dir if isinstance(base_dir, BaseModelRef) else resolve_base(Path(base_dir))
    config = base.config
    if config.get("quantization_config"):
        kind = config["quantization_config"].get("quant_method", "quantized")
        raise InvalidArgumentError(
            f"base {base.path} is a {kind} checkpoint: merging needs the unquantized weights "
            "(merge into the original checkpoint, quantize the merged model afterwards)"
        )
    output = Path(output).expanduser().absolute()
    _check_output(output, force, [base.path, *(a.path for a in adapters)])
    out_dtype = _output_dtype(dtype, base)
    shards = _shards(base.path)
    from loraswap.models.fingerprint import weight_shapes

    base_shapes = weight_shapes(base.path)
    fingerprint = base_fingerprint(base.path)
    checked = _validate(adapters, base, base_shapes, fingerprint)
    plan = _plan(checked, params)
    rank = params.svd_rank or max(a.max_rank() for a in checked)
    _remove_stale(output)
    created = [p for p in (output.parent, *output.parent.parents) if not p.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.parent / f".{output.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        temp.mkdir()
        with torch.no_grad():
            total = _write_weights(base.path, shards, temp, checked, plan, params, rank, out_dtype, progress)
        _copy_side_files(base.path, temp)
        _write_config(base.path, temp, out_dtype, output.name)
        record = MergeRecord(
            method=params.method.name,
            parameters=params.to_dict() | ({"svd_rank": rank} if params.method.uses_svd else {}),
            adapters=tuple(
                MergedAdapter(
                    ref=a.source.ref,
                    name=a.source.name,
                    digest=a.source.digest,
                    source="registry" if a.source.from_registry else "folder",
                    weight=w,
                    rank=a.config.r,
                    alpha=a.config.lora_alpha,
                    use_rslora=a.config.use_rslora,
                )
                for a, w in zip(checked, params.weights, strict=True)
            ),
            base_model_id=base.model_id,
            base_fingerprint=fingerprint,
            dtype=out_dtype,
            merged_modules=total,
            loraswap_version=__version__,
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        _fsync(record.write(temp))
        _fsync(temp)
        _publish(temp, output, force)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        for folder in created:  # the output's parents this merge made, deepest first, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    log.info("merged %d adapter(s) into %s (%s, %s)", len(adapters), output, params.method.name, out_dtype)
    return record


# -- checks ---------------------------------------------------------------------------------------------


def _check_output(output: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse an output that is a file or link, a non-empty folder without ``force``, or an input."""
    try:
        mode = os.lstat(output).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if stat.S_ISLNK(mode):
            raise InvalidArgumentError(f"output {output} is a symbolic link: give the folder itself")
        if not stat.S_ISDIR(mode):
            raise InvalidArgumentError(f"output {output} exists and is not a folder")
        if any(os.scandir(output)) and not force:
            raise InvalidArgumentError(f"output {output} is not empty (use --force to replace it)")
    resolved = output.resolve()
    for path in inputs:
        path = Path(path).resolve()
        if resolved == path or path.is_relative_to(resolved):
            raise InvalidArgumentError(f"output {output} would replace the input {path}")


def _output_dtype(dtype: str | None, base: BaseModelRef) -> str:
    if dtype is not None:
        if dtype not in DTYPES:
            raise InvalidArgumentError(f"dtype must be bf16, fp16 or fp32, got {dtype!r}")
        return DTYPES[dtype]
    config = base.config
    named = config.get("dtype") or config.get("torch_dtype")
    if isinstance(named, str) and named in DTYPES:
        return DTYPES[named]
    entries = read_header_file(base.path / _shards(base.path)[0]).entries
    if not entries:
        return "float32"
    kind = entries[min(entries)].torch_name  # the first tensor by name
    return kind if kind in ("bfloat16", "float16") else "float32"


def _shards(folder: Path) -> list[str]:
    """The base's weight files (:func:`~loraswap.models.weight_files.weight_files`), by name."""
    files = [str(path.relative_to(folder)) for path in weight_files(folder)]
    if not files:
        raise InvalidArgumentError(f"base {folder} has no *.safetensors weights (the only format merged)")
    return files


def _validate(
    adapters: list[AdapterSource], base: BaseModelRef, base_shapes: dict[str, list[int]], fingerprint: str
) -> list[_Adapter]:
    """Each adapter validated (:func:`~loraswap.registry.validate.validate_adapter_dir`: the shared parser
    also refuses DoRA and ``fan_in_fan_out`` configs, which no Llama-family linear layer uses), then
    checked against the base (its recorded fingerprint, :func:`base_compat_problems`); every problem of
    every adapter reported."""
    from loraswap.registry.validate import base_compat_problems, validate_adapter_dir

    invalid: list[str] = []
    checked: list[_Adapter] = []
    for source in adapters:
        try:
            summary = validate_adapter_dir(source.path)
        except AdapterValidationError as exc:
            lines = exc.problems or [str(exc)]
            invalid += [f"adapter {source.ref!r}: {p}" for p in lines]
            continue
        checked.append(_Adapter(source, summary.config, summary.tensor_shapes))
    if invalid:
        raise AdapterValidationError("cannot merge: not valid LoRA adapters", invalid)
    incompatible: list[str] = []
    for adapter in checked:
        ref = adapter.source.ref
        recorded = adapter.source.base_fingerprint
        if recorded and recorded != fingerprint:
            incompatible.append(f"adapter {ref!r}: it was made for base {recorded}, not {fingerprint}")
        problems = base_compat_problems(adapter.config, adapter.shapes, base_shapes)
        incompatible += [f"adapter {ref!r}: {p}" for p in problems]
    if incompatible:
        raise IncompatibleAdapterError(f"cannot merge into base {base.model_id} ({base.path})", incompatible)
    return checked


def _listed(modules: list[str]) -> str:
    shown = ", ".join(modules[:MAX_LISTED])
    return shown + (f" and {len(modules) - MAX_LISTED} more" if len(modules) > MAX_LISTED else "")


def _plan(checked: list[_Adapter], params: MergeParams) -> dict[str, list[tuple[str, str, float] | None]]:
    """Base weight name → per adapter (lora_A key, lora_B key, scaling) or ``None``; the method's
    requirements (same targets, equal ranks) checked on the way."""
    spec = params.method
    pairs = [adapter.pairs() for adapter in checked]
    problems: list[str] = []
    first = checked[0].source.ref
    if spec.needs_same_targets:
        for adapter, modules in zip(checked[1:], pairs[1:], strict=True):
            missing = sorted(set(pairs[0]) - set(modules))
            extra = sorted(set(modules) - set(pairs[0]))
            ref = adapter.source.ref
            if missing:
                problems.append(f"adapter {ref!r} lacks {_listed(missing)} (adapter {first!r} targets them)")
            if extra:
                problems.append(f"adapter {ref!r} targets {_listed(extra)} (adapter {first!r} does not)")
    if spec.needs_equal_ranks:
        for adapter, modules in zip(checked[1:], pairs[1:], strict=True):
            differ: dict[tuple[int, int], list[str]] = {}
            for module, (a_key, _) in sorted(modules.items()):
                if module in pairs[0]:
                    mine, theirs = adapter.shapes[a_key][0], checked[0].shapes[pairs[0][module][0]][0]
                    if mine != theirs:
                        differ.setdefault((mine, theirs), []).append(module)
            for (mine, theirs), modules_ in sorted(differ.items()):
                problems.append(
                    f"adapter {adapter.source.ref!r} has rank {mine} where adapter {first!r} has rank "
                    f"{theirs} ({_listed(modules_)})"
                )
    if problems:
        why = "combines the A and B matrices entry by entry and needs the same targets and ranks"
        raise InvalidArgumentError(
            f"method {spec.name!r} {why} in every adapter; 'cat' (exact) or an *_svd method combines any",
            problems,
        )
    plan: dict[str, list[tuple[str, str, float] | None]] = {}
    for index, (adapter, modules) in enumerate(zip(checked, pairs, strict=True)):
        for module, (a_key, b_key) in modules.items():
            entry = plan.setdefault(f"{module}.weight", [None] * len(checked))
            entry[index] = (a_key, b_key, adapter.config.scaling_of(module))
    return plan


# -- writing --------------------------------------------------------------------------------------------


def _write_weights(
    base_dir: Path,
    shards: list[str],
    temp: Path,
    checked: list[_Adapter],
    plan: dict[str, list[tuple[str, str, float] | None]],
    params: MergeParams,
    rank: int,
    out_dtype: str,
    progress: bool,
) -> int:
    """Stream every base shard into ``temp``; return how many weights were merged."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    target = getattr(torch, out_dtype)
    with contextlib.ExitStack() as stack:
        files = [str(a.source.path / ADAPTER_WEIGHTS) for a in checked]
        handles = [stack.enter_context(safe_open(file, framework="pt")) for file in files]
        sources = [stack.enter_context(safe_open(str(base_dir / shard), framework="pt")) for shard in shards]
        names = [list(handle.keys()) for handle in sources]
        total = sum(len(n) for n in names)
        bar = stack.enter_context(tqdm(total=total, desc="merge", unit="tensor", disable=not progress))
        done = merged = 0
        index: dict[str, str] = {}
        sizes = 0
        for shard, handle, shard_names in zip(shards, sources, names, strict=True):
            tensors: dict[str, torch.Tensor] = {}
            for name in shard_names:
                tensor = handle.get_tensor(name)
                entries = plan.get(name)
                if entries is not None:
                    tensor = _merged(name, tensor, entries, handles, params, rank, target)
                    merged += 1
                elif tensor.is_floating_point() and tensor.dtype != target:
                    tensor = _cast(name, tensor, target)
                tensors[name] = tensor.contiguous()
                index[name] = shard
                sizes += tensor.numel() * tensor.element_size()
                done += 1
                bar.update(1)
                log.info("tensor %d/%d %s (%s)", done, total, name, "merged" if entries else "copied")
            path = temp / shard
            save_file(tensors, str(path), metadata={"format": "pt"})
            _fsync(path)
            del tensors
    if (base_dir / INDEX_FILE).is_file():
        doc = {"metadata": {"total_size": sizes}, "weight_map": dict(sorted(index.items()))}
        (temp / INDEX_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        _fsync(temp / INDEX_FILE)
    return merged


def _merged(
    name: str,
    weight: torch.Tensor,
    entries: list[tuple[str, str, float] | None],
    handles: list[Any],
    params: MergeParams,
    rank: int,
    target: torch.dtype,
) -> torch.Tensor:
    """``W + ΔW`` in fp32, checked finite, cast to ``target`` and checked again."""
    import torch

    from loraswap.finite import all_finite

    if not weight.is_floating_point():
        raise InvalidArgumentError(
            f"base weight {name} is {weight.dtype}, not a float: merging needs the unquantized checkpoint"
        )
    factors = [
        None
        if entry is None
        else LoraFactors(
            handles[i].get_tensor(entry[0]).to(torch.float32),
            handles[i].get_tensor(entry[1]).to(torch.float32),
            entry[2],
        )
        for i, entry in enumerate(entries)
    ]
    result = weight.to(torch.float32) + module_delta(name.removesuffix(".weight"), factors, params, rank)
    if not all_finite(result):
        raise InvalidArgumentError(
            f"merging produced NaN or Inf in {name}: the adapters' weights are too large for this "
            "combination; nothing was written"
        )
    return _cast(name, result, target)


def _cast(name: str, tensor: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    from loraswap.finite import all_finite

    if tensor.dtype == target:
        return tensor
    cast = tensor.to(target)
    if not all_finite(cast) and all_finite(tensor):
        raise InvalidArgumentError(
            f"{name} does not fit {str(target).removeprefix('torch.')} (values beyond its range); "
            "choose a wider --dtype; nothing was written"
        )
    return cast


def _copy_side_files(base_dir: Path, temp: Path) -> None:
    """Copy the base's :data:`SIDE_FILES` that are regular files (reached through links: an HF cache
    snapshot links its files). An older folder's ``chat_template.json`` becomes ``chat_template.jinja``
    (what transformers writes now, and what a registry model folder holds)."""
    for name in SIDE_FILES:
        source = base_dir / name
        try:
            regular = stat.S_ISREG(os.stat(source).st_mode)
        except FileNotFoundError:
            continue
        if not regular:
            log.warning("%s: not copied into the merged model (not a regular file)", source)
            continue
        shutil.copyfile(source, temp / name)
        _fsync(temp / name)
    legacy = base_dir / CHAT_TEMPLATE_JSON
    if not (temp / "chat_template.jinja").exists() and legacy.is_file():
        template = json.loads(legacy.read_text()).get("chat_template")
        if isinstance(template, str):
            (temp / "chat_template.jinja").write_text(template)
            _fsync(temp / "chat_template.jinja")
        else:
            log.warning("%s: not copied (not a single chat template)", legacy)


def _write_config(base_dir: Path, temp: Path, out_dtype: str, model_id: str) -> None:
    """config.json with the output dtype and the merged model's own name."""
    config = json.loads((base_dir / "config.json").read_text())
    config["dtype"] = out_dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = out_dtype
    config["_name_or_path"] = model_id
    path = temp / "config.json"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(temp: Path, output: Path, force: bool) -> None:
    """Rename the complete ``temp`` to ``output``; an old non-empty ``output`` (``force``) is moved aside
    first and removed after."""
    old = None
    if output.is_dir() and any(os.scandir(output)):
        if not force:
            raise InvalidArgumentError(f"output {output} is not empty (use --force to replace it)")
        old = output.parent / f".{output.name}.replaced-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        os.rename(output, old)
    os.rename(temp, output)  # replaces an empty folder
    _fsync(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale(output: Path) -> None:
    """Remove the temporary folders of earlier merges into ``output`` whose process is gone (killed)."""
    parent = output.parent
    if not parent.is_dir():
        return
    for marker in (TEMP_MARK, ".replaced-"):
        prefix = f".{output.name}{marker}"
        for entry in os.scandir(parent):
            if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
                continue
            pid_text = entry.name[len(prefix) :].split("-", 1)[0]
            if pid_text.isdigit() and not _alive(int(pid_text)):
                log.info("removing %s, left by a merge that did not finish", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""The one definition of a LoRA adapter on disk, shared by registry, engine, trainer and merge.

An adapter folder is what PEFT's ``save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys look like
``base_model.model.<module path>.lora_A.weight`` (``[r, in_features]``) and ``...lora_B.weight``
(``[out_features, r]``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from loraswap.errors import InvalidArgumentError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
TRAINING_METADATA = "training_metadata.json"

# Linear projections of a Llama-family decoder layer that loraswap can serve.
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Full-matched (``re.fullmatch``): a key ending in a newline is not a LoRA key.
_KEY_RE = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight")
_KEY_PREFIX = "base_model.model."

JSON_LIMIT = 16 << 20
"""Largest ``adapter_config.json`` / ``training_metadata.json`` read (both are a few KiB)."""


def is_lora_weight(name: str) -> bool:
    """True for the tensor names that make up a LoRA adapter (A and B matrices of a linear layer)."""
    return _KEY_RE.fullmatch(name) is not None


@functools.lru_cache(maxsize=1 << 16)  # the same few hundred keys recur in every adapter of a base
def parse_lora_key(name: str) -> tuple[str, str] | None:
    """Split ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` into
    (``model.layers.0.self_attn.q_proj``, ``"A"``); ``None`` for a key that is not a LoRA weight."""
    match = _KEY_RE.fullmatch(name)
    return (match["module"], match["ab"]) if match else None


def lora_key(module: str, ab: str) -> str:
    """The PEFT file key of one LoRA matrix of ``module`` (inverse of :func:`parse_lora_key`)."""
    return f"{_KEY_PREFIX}{module}.lora_{ab}.weight"


def matches_target(module: str, target: str) -> bool:
    """PEFT's rule for one entry of a list ``target_modules``: ``module`` (a dotted module path) is the
    entry or ends with ``.<entry>``. PEFT's other form, a single string full-matched as a regex, is refused
    by :func:`parse_adapter_config`, so every config loraswap accepts is matched by this rule."""
    return module == target or module.endswith("." + target)


@functools.lru_cache(maxsize=1024)
def pattern_regex(key: str) -> re.Pattern[str]:
    """The regex a ``rank_pattern``/``alpha_pattern`` key stands for (PEFT's rule: the key matches a
    module path that ends in it), used with ``fullmatch``. Raises ``re.error`` for a bad key."""
    return re.compile(rf"(?:.*\.)?(?:{key})")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: the first key that matches ``module`` gives its value."""
    for key, value in patterns.items():
        if pattern_regex(key).fullmatch(module):
            return value
    return default


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, for messages (``"a symbolic link"``, ``"a named pipe"``, ...)."""
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
        (stat.S_ISREG, "a regular file"),
    )
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def not_regular_problem(name: str, mode: int) -> str:
    """The refusal of an adapter folder entry that is not a regular file (see :func:`open_adapter_file`)."""
    why = "nothing outside the folder is read" if stat.S_ISLNK(mode) else "it is not read"
    return f"{name} is {file_kind(mode)}, not a regular file ({why}): an adapter folder holds regular files"


def open_adapter_file(path: Path) -> BinaryIO:
    """Open one file of an adapter folder for reading, only if it is a regular file.

    A symbolic link is never followed (the file must be the folder's own, so nothing outside the folder
    is read through it) and a named pipe, socket or device is never read (no blocking, no side effects):
    the entry is checked with ``lstat`` before it is opened, and opened with ``O_NOFOLLOW`` and
    ``O_NONBLOCK`` then checked again, so an entry swapped in between is refused as well.

    Raises:
        InvalidArgumentError: The entry is missing, not a regular file, or cannot be read (the reason).
    """
    path = Path(path)
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        raise InvalidArgumentError(f"{path.name} is missing") from None
    except OSError as exc:
        raise InvalidArgumentError(f"{path.name} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(before.st_mode):
        raise InvalidArgumentError(not_regular_problem(path.name, before.st_mode))
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise InvalidArgumentError(f"{path.name} cannot be read: {exc.strerror or exc}") from None
    try:
        after = os.fstat(fd)
        if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise InvalidArgumentError(f"{path.name} was replaced while it was being opened")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _refuse_constant(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a finite number")
    return value


def read_json_object(path: Path, strict: bool = False) -> tuple[dict[str, Any] | None, list[str]]:
    """Read a small JSON object file of an adapter folder (through :func:`open_adapter_file`).

    Args:
        path: The file.
        strict: Refuse ``NaN``/``Infinity`` and numbers too large for a float (strict JSON), as a
            document stored in a manifest must be.

    Returns:
        The object (or ``None``) and the problems: missing, not a regular file, over
        :data:`JSON_LIMIT`, not JSON, not an object.
    """
    name = Path(path).name
    try:
        with open_adapter_file(path) as handle:  # read(n) allocates n bytes first: ask for what is there
            data = handle.read(min(os.fstat(handle.fileno()).st_size, JSON_LIMIT) + 1)
    except InvalidArgumentError as exc:
        return None, [str(exc)]
    except OSError as exc:
        return None, [f"{name} cannot be read: {exc.strerror or exc}"]
    if len(data) > JSON_LIMIT:
        return None, [f"{name} is over {JSON_LIMIT} bytes"]
    options: dict[str, Any] = {}
    if strict:
        options = {"parse_constant": _refuse_constant, "parse_float": _finite_float}
    try:
        doc = json.loads(data, **options)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int/float limits
        return None, [f"{name} is not valid JSON: {exc}"]
    if not isinstance(doc, dict):
        return None, [f"{name} must hold a JSON object"]
    return doc, []


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_positive_number(value: Any) -> bool:
    """A JSON number (not a bool) that is finite and > 0 as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number) and number > 0


def _pattern_problems(doc: dict[str, Any], field_name: str, valid: Any, wanted: str) -> list[str]:
    """Problems of ``rank_pattern``/``alpha_pattern``: absent, null or an object of regex → value."""
    patterns = doc.get(field_name)
    if patterns is None:
        return []
    if not isinstance(patterns, dict):
        return [f"{field_name} must be an object of module pattern -> {wanted}, got {_short(patterns)}"]
    problems = []
    for key, value in patterns.items():
        try:
            pattern_regex(key)
        except (re.error, RecursionError, OverflowError) as exc:
            problems.append(f"{field_name} key {_short(key)} is not a valid regular expression: {exc}")
        if not valid(value):
            problems.append(f"{field_name}[{_short(key)}] must be {wanted}, got {_short(value)}")
    return problems


def _short(value: Any) -> str:
    """``repr`` of a config value cut to a readable length (a hostile config may hold anything)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class LoraAdapterConfig:
    """A parsed PEFT LoRA ``adapter_config.json``.

    Attributes:
        r: Default rank.
        lora_alpha: Default alpha; a module's scaling is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        target_modules: Module-name suffixes the adapter targets (as listed in the config).
        use_rslora: Rank-stabilized scaling.
        rank_pattern: Per-module rank overrides (PEFT regex keys).
        alpha_pattern: Per-module alpha overrides (PEFT regex keys).
        base_model_name_or_path: The base named at training time (informational).
        raw: The whole JSON document as read.
    """

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def targets(self, module: str) -> bool:
        """Whether the adapter targets ``module`` (a dotted module path), by :func:`matches_target`."""
        return any(matches_target(module, target) for target in self.target_modules)

    def rank_of(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def scaling_of(self, module: str) -> float:
        """The factor PEFT multiplies ``B @ A @ x`` by for ``module``."""
        rank = self.rank_of(module)
        alpha = float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def parse_adapter_config(doc: dict[str, Any]) -> tuple[LoraAdapterConfig | None, list[str]]:
    """Parse a PEFT adapter config; return it (or ``None``) and every problem found.

    Types are checked as PEFT writes them: ``r`` and ``rank_pattern`` values positive integers,
    ``lora_alpha`` and ``alpha_pattern`` values positive finite numbers (no NaN, no Infinity), flags
    JSON booleans (the string ``"false"`` is refused, not taken as true), pattern keys valid regular
    expressions, ``base_model_name_or_path`` a string or null.
    """
    if not isinstance(doc, dict):
        return None, [f"{ADAPTER_CONFIG} must hold a JSON object"]
    problems: list[str] = []
    if str(doc.get("peft_type", "")).upper() != "LORA":
        problems.append(f"peft_type is {_short(doc.get('peft_type'))}; only LORA adapters are supported")
    r = doc.get("r")
    if not _is_positive_int(r):
        problems.append(f"r must be a positive integer, got {_short(r)}")
    alpha = doc.get("lora_alpha")
    if not _is_positive_number(alpha):
        problems.append(f"lora_alpha must be a positive finite number, got {_short(alpha)}")
    targets = doc.get("target_modules")
    if isinstance(targets, str):
        problems.append(f"target_modules is a regex ({_short(targets)}); list the module names explicitly")
    elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        problems.append(f"target_modules must be a non-empty list of module names, got {_short(targets)}")
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(doc.get(flag, False), bool):
            problems.append(f"{flag} must be true or false, got {_short(doc.get(flag))}")
    for flag in ("use_dora", "fan_in_fan_out"):
        if doc.get(flag, False) is True:
            problems.append(f"{flag}=True is not supported")
    if doc.get("bias", "none") != "none":
        problems.append(f"bias={_short(doc.get('bias'))} is not supported (only 'none')")
    if doc.get("modules_to_save"):
        problems.append(f"modules_to_save={_short(doc.get('modules_to_save'))} is not supported")
    problems += _pattern_problems(doc, "rank_pattern", _is_positive_int, "a positive integer")
    problems += _pattern_problems(doc, "alpha_pattern", _is_positive_number, "a positive finite number")
    base = doc.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        problems.append(f"base_model_name_or_path must be a string or null, got {_short(base)}")
    if problems:
        return None, problems
    config = LoraAdapterConfig(
        r=r,
        lora_alpha=float(alpha),
        target_modules=tuple(sorted(targets)),
        use_rslora=doc.get("use_rslora", False),
        rank_pattern=dict(doc.get("rank_pattern") or {}),
        alpha_pattern={key: float(value) for key, value in (doc.get("alpha_pattern") or {}).items()},
        base_model_name_or_path=base,
        raw=doc,
    )
    return config, []


def read_adapter_config(folder: Path) -> tuple[LoraAdapterConfig | None, list[str]]:
    """Read and parse ``folder/adapter_config.json``; problems include a missing or malformed file, and
    one that is not a regular file (a symbolic link is never followed: see :func:`open_adapter_file`)."""
    doc, problems = read_json_object(Path(folder) / ADAPTER_CONFIG)
    if doc is None:
        return None, problems
    return parse_adapter_config(doc)

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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
TRAINING_METADATA = "training_metadata.json"

# Linear projections of a Llama-family decoder layer that loraswap can serve.
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_KEY_PREFIX = "base_model.model."


def is_lora_weight(name: str) -> bool:
    """True for the tensor names that make up a LoRA adapter (A and B matrices of a linear layer)."""
    return _KEY_RE.match(name) is not None


@functools.lru_cache(maxsize=1 << 16)  # the same few hundred keys recur in every adapter of a base
def parse_lora_key(name: str) -> tuple[str, str] | None:
    """Split ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` into
    (``model.layers.0.self_attn.q_proj``, ``"A"``); ``None`` for a key that is not a LoRA weight."""
    match = _KEY_RE.match(name)
    return (match["module"], match["ab"]) if match else None


def lora_key(module: str, ab: str) -> str:
    """The PEFT file key of one LoRA matrix of ``module`` (inverse of :func:`parse_lora_key`)."""
    return f"{_KEY_PREFIX}{module}.lora_{ab}.weight"


def matches_target(module: str, target: str) -> bool:
    """PEFT's rule for one entry of a list ``target_modules``: ``module`` (a dotted module path) is the
    entry or ends with ``.<entry>``. PEFT's other form, a single string full-matched as a regex, is refused
    by :func:`parse_adapter_config`, so every config loraswap accepts is matched by this rule."""
    return module == target or module.endswith("." + target)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches a module path ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


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
    """Parse a PEFT adapter config; return it (or ``None``) and every problem found."""
    problems: list[str] = []
    if str(doc.get("peft_type", "")).upper() != "LORA":
        problems.append(f"peft_type is {doc.get('peft_type')!r}; only LORA adapters are supported")
    r = doc.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        problems.append(f"r must be a positive integer, got {r!r}")
    alpha = doc.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        problems.append(f"lora_alpha must be a positive number, got {alpha!r}")
    targets = doc.get("target_modules")
    if isinstance(targets, str):
        problems.append(f"target_modules is a regex ({targets!r}); list the module names explicitly")
    elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        problems.append(f"target_modules must be a non-empty list of module names, got {targets!r}")
    for flag, wanted in (("use_dora", False), ("fan_in_fan_out", False)):
        if bool(doc.get(flag, False)) != wanted:
            problems.append(f"{flag}={doc.get(flag)!r} is not supported")
    if doc.get("bias", "none") != "none":
        problems.append(f"bias={doc.get('bias')!r} is not supported (only 'none')")
    if doc.get("modules_to_save"):
        problems.append(f"modules_to_save={doc.get('modules_to_save')!r} is not supported")
    if problems:
        return None, problems
    config = LoraAdapterConfig(
        r=int(r),
        lora_alpha=float(alpha),
        target_modules=tuple(sorted(targets)),
        use_rslora=bool(doc.get("use_rslora", False)),
        rank_pattern=dict(doc.get("rank_pattern") or {}),
        alpha_pattern=dict(doc.get("alpha_pattern") or {}),
        base_model_name_or_path=doc.get("base_model_name_or_path"),
        raw=doc,
    )
    return config, []


def read_adapter_config(folder: Path) -> tuple[LoraAdapterConfig | None, list[str]]:
    """Read and parse ``folder/adapter_config.json``; problems include a missing or malformed file."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        return None, [f"{ADAPTER_CONFIG} is missing"]
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, [f"{ADAPTER_CONFIG} is not valid JSON: {exc}"]
    if not isinstance(doc, dict):
        return None, [f"{ADAPTER_CONFIG} must hold a JSON object"]
    return parse_adapter_config(doc)

"""Reading an adapter folder into host tensors shaped for the slot buffers, checked against the base."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from loraswap.adapter_format import ADAPTER_WEIGHTS, parse_lora_key, read_adapter_config
from loraswap.errors import AdapterValidationError, IncompatibleAdapterError
from loraswap.registry.validate import base_compat_problems, lora_shape_problems


@dataclass
class HostAdapter:
    """An adapter in host RAM, ready to be copied into a device slot.

    Attributes:
        name: Adapter name (for listings).
        digest: Version digest (the cache key).
        rank: Largest rank over its modules.
        modules: Module path → (``a: [r, in]``, ``bt: [r, out]`` with scaling folded in).
        file_bytes: Size of ``adapter_model.safetensors`` on disk.
    """

    name: str
    digest: str
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    file_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values()
        )


@dataclass(frozen=True)
class BaseShape:
    """What the engine's base offers: targetable modules with (in, out) features, and limits."""

    modules: dict[str, tuple[int, int]]
    max_rank: int
    fingerprint: str

    def weight_shapes(self) -> dict[str, list[int]]:
        """The targetable modules as base weight shapes (``name.weight`` → ``[out, in]``)."""
        return {f"{m}.weight": [out_f, in_f] for m, (in_f, out_f) in self.modules.items()}


def _pair_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"A": tensor, "B": tensor}}`` of tensors already checked by ``lora_shape_problems``."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, ab = parse_lora_key(key)
        pairs.setdefault(module, {})[ab] = tensor
    return pairs


def non_finite_modules(pairs: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Modules whose A or B holds NaN/Inf: one max-abs pass over everything (NaN propagates through
    ``amax``), per-module only when that finds something."""
    tensors = [t.reshape(-1) for ab in pairs.values() for t in ab.values()]
    if not tensors or math.isfinite(float(torch.cat(tensors).abs().amax())):
        return []
    return [
        m for m, ab in sorted(pairs.items()) if not all(bool(torch.isfinite(t).all()) for t in ab.values())
    ]


def read_host_adapter(
    folder: Path, name: str, digest: str, base: BaseShape, dtype: torch.dtype, fingerprint: str | None = None
) -> HostAdapter:
    """Load and check ``folder``; every incompatibility is reported at once.

    Raises:
        AdapterValidationError: the folder is not a readable LoRA adapter.
        IncompatibleAdapterError: a valid adapter that does not fit the loaded base or server limits.
    """
    config, problems = read_adapter_config(folder)
    weights = Path(folder) / ADAPTER_WEIGHTS
    if not weights.is_file():
        problems.append(f"{ADAPTER_WEIGHTS} is missing")
    if problems or config is None:
        raise AdapterValidationError(f"adapter {name!r} is not a valid LoRA adapter", problems)
    tensors = load_file(str(weights))
    shapes = {key: list(t.shape) for key, t in tensors.items()}
    problems = lora_shape_problems(config, shapes)
    if problems:
        raise AdapterValidationError(f"adapter {name!r} has malformed weights", problems)
    pairs = _pair_tensors(tensors)
    problems = base_compat_problems(config, shapes, base.weight_shapes())
    problems += [f"{module}: weights contain NaN or Inf" for module in non_finite_modules(pairs)]
    if fingerprint and fingerprint != base.fingerprint:
        problems.append(f"it was made for base {fingerprint}, the server runs {base.fingerprint}")
    modules = {}
    for module, ab in sorted(pairs.items()):
        rank = config.rank_of(module)
        if rank > base.max_rank:
            problems.append(f"{module}: rank {rank} is over the server's max rank {base.max_rank}")
        elif module in base.modules:
            scaled_b = ab["B"] * config.scaling_of(module)  # in the file's dtype: one rounding
            modules[module] = (ab["A"].to(dtype), scaled_b.to(dtype).T)  # B^T as a view: no extra copy
    if problems:
        raise IncompatibleAdapterError(f"adapter {name!r} cannot run on this server", problems)
    rank = max(a.shape[0] for a, _ in modules.values())
    return HostAdapter(name, digest, rank, modules, weights.stat().st_size)

"""Reading an adapter folder into host tensors shaped for the slot buffers, checked against the base."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from loraswap.adapter_format import ADAPTER_WEIGHTS, parse_lora_key, read_adapter_config
from loraswap.errors import AdapterValidationError, IncompatibleAdapterError


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


def _pair_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            problems.append(f"tensor {key!r} is not a LoRA A/B weight")
            continue
        pairs.setdefault(parsed[0], {})[parsed[1]] = tensor
    problems += [
        f"{module}: lora_{'B' if 'A' in ab else 'A'} is missing"
        for module, ab in pairs.items()
        if len(ab) != 2
    ]
    return pairs, problems


def _module_problems(module: str, a: torch.Tensor, b: torch.Tensor, rank: int, base: BaseShape) -> list[str]:
    if module not in base.modules:
        return [f"{module}: no such LoRA-targetable linear in the base"]
    in_f, out_f = base.modules[module]
    problems = []
    if tuple(a.shape) != (rank, in_f):
        problems.append(f"{module}: lora_A is {list(a.shape)}, the base needs [{rank}, {in_f}]")
    if tuple(b.shape) != (out_f, rank):
        problems.append(f"{module}: lora_B is {list(b.shape)}, the base needs [{out_f}, {rank}]")
    if rank > base.max_rank:
        problems.append(f"{module}: rank {rank} is over the server's max rank {base.max_rank}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        problems.append(f"{module}: weights contain NaN or Inf")
    return problems


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
    pairs, problems = _pair_tensors(load_file(str(weights)))
    if problems:
        raise AdapterValidationError(f"adapter {name!r} has malformed weights", problems)
    if fingerprint and fingerprint != base.fingerprint:
        problems.append(f"it was made for base {fingerprint}, the server runs {base.fingerprint}")
    modules = {}
    for module, ab in sorted(pairs.items()):
        rank = config.rank_of(module)
        found = _module_problems(module, ab["A"], ab["B"], rank, base)
        problems += found
        if not found:
            scale = config.scaling_of(module)
            a = ab["A"].to(torch.float32)
            bt = (ab["B"].to(torch.float32) * scale).T
            modules[module] = (a.to(dtype).contiguous(), bt.to(dtype).contiguous())
    if problems:
        raise IncompatibleAdapterError(f"adapter {name!r} cannot run on this server", problems)
    rank = max(a.shape[0] for a, _ in modules.values())
    return HostAdapter(name, digest, rank, modules, weights.stat().st_size)

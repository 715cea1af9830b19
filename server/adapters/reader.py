"""Reading an adapter folder into host tensors shaped for the slot buffers, checked against the base."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loraswap.adapter_format import ADAPTER_WEIGHTS, LoraAdapterConfig, parse_lora_key, read_adapter_config
from loraswap.errors import AdapterValidationError, IncompatibleAdapterError
from loraswap.finite import all_finite
from loraswap.registry.validate import base_compat_problems, lora_shape_problems, weight_dtype_problems
from loraswap.safetensors_header import SafetensorsError
from loraswap.server.adapters.lru import LRU
from loraswap.server.adapters.safetensors_buffer import TensorFile, read_tensor_file
from loraswap.server.lora.bits import tensor_bits


@dataclass
class HostAdapter:
    """An adapter in host RAM, ready to be copied into a device slot.

    Attributes:
        name: Adapter name (for listings).
        digest: Version digest (the cache key).
        rank: Largest rank over its modules.
        modules: Module path → (``a: [r, in]``, ``bt: [r, out]``) in the slot dtype. When the file's
            dtype is the slot dtype these are views of the file's bytes, read once into memory of the
            host tier's own (never a mapping of the cache file, whose damage in place must not reach a
            served adapter) and ``bt`` is unscaled; otherwise
            converted copies packed into one buffer, with the LoRA scaling folded into ``bt``.
        file_bytes: Size of ``adapter_model.safetensors`` on disk.
        scales: Module path → LoRA scaling the slot fill applies to its copy of ``bt`` (absent: 1).
        bits: The same matrices as numpy views of their bits (integers of the element size), when
            they are CPU tensors: slot fills on CPU copy these (see :func:`fill_slot_bits`). Made on
            first use unless the reader provides them.
    """

    name: str
    digest: str
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    file_bytes: int = 0
    scales: dict[str, float] = field(default_factory=dict)
    bits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def cpu_bits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """:attr:`bits`, made from :attr:`modules` the first time (CPU tensors only)."""
        if self.bits is None:
            self.bits = {m: (tensor_bits(a), tensor_bits(bt)) for m, (a, bt) in self.modules.items()}
        return self.bits

    @functools.cached_property
    def nbytes(self) -> int:
        """Host memory held: every distinct storage behind the tensors (a shared read buffer counts once;
        computed once, as the host cache sums it on every insertion)."""
        storages = {}
        for a, bt in self.modules.values():
            for t in (a, bt):
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


@dataclass(frozen=True)
class BaseShape:
    """What the engine's base offers: targetable modules with (in, out) features, and limits."""

    modules: dict[str, tuple[int, int]]
    max_rank: int
    fingerprint: str

    def weight_shapes(self) -> dict[str, list[int]]:
        """The targetable modules as base weight shapes (``name.weight`` → ``[out, in]``)."""
        return {f"{m}.weight": [out_f, in_f] for m, (in_f, out_f) in self.modules.items()}


@dataclass(frozen=True)
class _Plan:
    """What checking one header layout and config against the base found (data-independent).

    Attributes:
        invalid: Shape problems: the adapter is malformed.
        incompatible: Problems against the base or the server's limits.
        modules: ``(module, A key, B key, scaling)`` for every module the base can serve, sorted.
        rank: Largest rank over ``modules``.
    """

    invalid: tuple[str, ...]
    incompatible: tuple[str, ...]
    modules: tuple[tuple[str, str, str, float], ...]
    rank: int


MAX_PLANS = 64  # distinct (header layout, config) pairs remembered; adapters of one recipe share one


class AdapterReader:
    """Reads adapter folders into :class:`HostAdapter`\\ s for one base and slot dtype.

    The checks that depend only on the header layout and the config (shapes, pairs, targets, ranks,
    the base's dimensions) are made once per distinct ``(header bytes, config)`` and remembered:
    adapters trained with one recipe share them byte for byte, and on an all-projection adapter they
    cost more than the read itself. What depends on the data (NaN/Inf) is checked on every read.

    Thread-safe: load workers share one reader; its own lock guards the remembered plans.
    """

    def __init__(self, base: BaseShape, dtype: torch.dtype, max_plans: int = MAX_PLANS) -> None:
        self.base = base
        self.dtype = dtype
        self._plans: LRU[tuple, _Plan] = LRU(max_plans)
        self._lock = threading.Lock()

    def read(self, folder: Path, name: str, digest: str, fingerprint: str | None = None) -> HostAdapter:
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
        try:
            # read, never mapped: a mapping of the cache file would show damage done to it in place (an
            # editor, a disk fault) in a served adapter, and a truncation would kill the server (SIGBUS)
            loaded = read_tensor_file(weights)
        except SafetensorsError as exc:
            raise AdapterValidationError(
                f"adapter {name!r} has an unreadable weights file", [str(exc)]
            ) from None
        plan = self._plan(loaded, config)
        if plan.invalid:
            raise AdapterValidationError(f"adapter {name!r} has malformed weights", list(plan.invalid))
        if not loaded.all_finite():  # push refuses these: the file is damaged, not merely unsuited
            problems = [f"{module}: weights contain NaN or Inf" for module in _non_finite(loaded)]
            raise AdapterValidationError(f"adapter {name!r} has NaN or Inf weights", problems)
        problems = list(plan.incompatible)
        if fingerprint and fingerprint != self.base.fingerprint:
            problems.append(f"it was made for base {fingerprint}, the server runs {self.base.fingerprint}")
        if problems:
            raise IncompatibleAdapterError(f"adapter {name!r} cannot run on this server", problems)
        modules, scales, bits = _host_modules(loaded, plan, self.dtype)
        return HostAdapter(name, digest, plan.rank, modules, loaded.buffer.numel(), scales, bits)

    def _plan(self, loaded: TensorFile, config: LoraAdapterConfig) -> _Plan:
        key = (loaded.header, loaded.data.numel(), _config_key(config))
        with self._lock:
            plan = self._plans.get(key)
        if plan is None:  # checked outside the lock: two workers may both check a new layout once
            plan = _check(loaded, config, self.base)
            with self._lock:
                self._plans.put(key, plan)
        return plan


def _config_key(config: LoraAdapterConfig) -> tuple:
    """The config fields the checks and scalings depend on."""
    return (
        config.r,
        config.lora_alpha,
        config.target_modules,
        config.use_rslora,
        tuple(sorted(config.rank_pattern.items())),
        tuple(sorted(config.alpha_pattern.items())),
    )


def _check(loaded: TensorFile, config: LoraAdapterConfig, base: BaseShape) -> _Plan:
    shapes = {key: list(t.shape) for key, t in loaded.tensors.items()}
    invalid = weight_dtype_problems({key: e.dtype for key, e in loaded.entries.items()})
    invalid += lora_shape_problems(config, shapes)
    if invalid:
        return _Plan(tuple(invalid), (), (), 0)
    incompatible = base_compat_problems(config, shapes, base.weight_shapes())
    keys: dict[str, dict[str, str]] = {}  # module -> {"A": key, "B": key} (keys as the file spells them)
    for key in shapes:
        module, ab = parse_lora_key(key)
        keys.setdefault(module, {})[ab] = key
    modules = []
    for module, pair in sorted(keys.items()):
        rank = config.rank_of(module)
        if rank > base.max_rank:
            incompatible.append(f"{module}: rank {rank} is over the server's max rank {base.max_rank}")
        elif module in base.modules:
            modules.append((module, pair["A"], pair["B"], config.scaling_of(module)))
    rank = max((shapes[a][0] for _, a, _, _ in modules), default=0)
    return _Plan((), tuple(incompatible), tuple(modules), rank)


def _non_finite(loaded: TensorFile) -> list[str]:
    """Modules whose A or B holds NaN/Inf."""
    bad = {parse_lora_key(k)[0] for k, t in loaded.tensors.items() if not all_finite(t)}
    return sorted(bad)


def _host_modules(loaded: TensorFile, plan: _Plan, dtype: torch.dtype) -> tuple[dict, dict, dict | None]:
    """``module → (a, bt)`` in the slot dtype, the scalings still to apply to ``bt`` at fill time,
    and the matrices as numpy bit views when they are views of the file (its dtype is the slot dtype).

    Either way every matrix is a view of one host storage (the file's bytes as read, or one packed
    buffer of converted copies), so a fill into accelerator slots moves it in one transfer. Views of
    the file's bytes stay unscaled; the slot fill scales its copy. B^T stays a transposed view: writing
    it back row-contiguous would cost more on the load path than it saves per activation.
    """
    tensors = loaded.tensors
    if not (loaded.views_only and loaded.uniform_dtype() == dtype):
        return _converted(tensors, plan, dtype), {}, None
    modules = {m: (tensors[a], tensors[b].T) for m, a, b, _ in plan.modules}
    scales = {m: s for m, _, _, s in plan.modules if s != 1.0}
    bits = {m: (loaded.bits(a), loaded.bits(b).T) for m, a, b, _ in plan.modules}
    return modules, scales, bits


def _converted(tensors: dict[str, torch.Tensor], plan: _Plan, dtype: torch.dtype) -> dict:
    """Copies in ``dtype`` packed into one buffer, B scaled before the cast (one rounding)."""
    keys = [k for _, a, b, _ in plan.modules for k in (a, b)]
    packed = torch.empty(sum(tensors[k].numel() for k in keys), dtype=dtype)
    modules, offset = {}, 0
    for module, a, b, scale in plan.modules:
        views = []
        for key, factor in ((a, 1.0), (b, scale)):
            source = tensors[key]
            view = packed[offset : offset + source.numel()].view(source.shape)
            view.copy_(source * factor if factor != 1.0 else source)
            views.append(view)
            offset += source.numel()
        modules[module] = (views[0], views[1].T)
    return modules

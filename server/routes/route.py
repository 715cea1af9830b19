"""One route: a merged model (a folder or a registry model reference) served by an engine of its own.

A route answers for one adapter version when its model was merged from exactly that registry adapter
(its ``loraswap-merge.json`` names one adapter, from the registry): requests whose reference resolves to
that digest go to the route. A model merged from several adapters (or from folders) answers for the
route's reference as written, by name.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraswap.device import pick_device
from loraswap.errors import InvalidArgumentError, NotFoundError, OverloadedError
from loraswap.merge.record import RECORD_FILE, MergeRecord
from loraswap.models.fingerprint import weight_shapes
from loraswap.registry.manifest import sha256_digest
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.api import TokenEvent
from loraswap.server.engine.base_loader import WEIGHT_ONLY_QUANTIZATIONS, compute_dtype
from loraswap.server.engine.kv_cache import head_dim, kv_cache_bytes
from loraswap.server.engine.packed import packing_supported
from loraswap.server.engine.request import RequestHandle

BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp16w": 2.0, "int8": 1.0, "nf4": 0.5}
"""Bytes a linear weight takes once loaded, per quantization (bitsandbytes' block scales excluded)."""


@dataclass(frozen=True)
class RouteSpec:
    """``REF=MODEL`` of ``serve --route`` (and YAML ``routes:``).

    Attributes:
        ref: The adapter reference requests name (``name``, ``name:tag``, ``name@sha256:...``).
        model: The merged model: a local folder, or a registry model reference.
    """

    ref: str
    model: str

    @classmethod
    def parse(cls, text: str) -> RouteSpec:
        ref, sep, model = text.partition("=")
        if not sep or not ref.strip() or not model.strip():
            raise InvalidArgumentError(
                f"a route is REF=MODEL (an adapter reference = a merged model), got {text!r}"
            )
        return cls(ref.strip(), model.strip())

    def __str__(self) -> str:
        return f"{self.ref}={self.model}"


@dataclass(frozen=True)
class RouteMemory:
    """What a route holds (or will hold) in memory, in bytes.

    Attributes:
        weights: The model's parameters and buffers in their serving dtype.
        kv_cache: Its engine's KV cache.
    """

    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def estimate_memory(folder: Path, config: EngineConfig, quantization: str) -> RouteMemory:
    """The memory a route over ``folder`` will take, from the safetensors headers and config.json alone
    (nothing is loaded): linear weights at ``quantization``'s width, other tensors at the compute
    dtype's, plus the KV cache of ``config``. With ``pack_weights`` on a CPU engine, a tied ``lm_head``
    counts twice (its packed copy beside the embedding's plain weight, ``engine/packed.py``); under
    fp16w ``lm_head`` is an fp16 linear layer too, a tied one an fp16 copy beside the embedding."""
    device = pick_device(config.device)
    dtype = compute_dtype(quantization, device)
    compute = float(dtype.itemsize)
    weights = 0.0
    shapes = weight_shapes(folder)
    embedding = shapes.get("model.embed_tokens.weight")
    weight_only = quantization in WEIGHT_ONLY_QUANTIZATIONS  # every linear layer, lm_head included
    packs = config.pack_weights and packing_supported(dtype, device) and not weight_only
    if "lm_head.weight" not in shapes and embedding is not None and (packs or weight_only):
        weights += math.prod(embedding) * (BYTES_PER_WEIGHT[quantization] if weight_only else compute)
    for name, shape in shapes.items():
        head = weight_only and name == "lm_head.weight"
        linear = (name.endswith("proj.weight") or head) and len(shape) == 2
        weights += math.prod(shape) * (BYTES_PER_WEIGHT[quantization] if linear else compute)
    model = json.loads((folder / "config.json").read_text())
    weights += 2 * (head_dim(model) // 2) * 4  # the rotary inverse frequencies (and their original): fp32
    return RouteMemory(int(weights), kv_cache_bytes(model, config.max_batch_size, config.max_seq_len, dtype))


class RoutedHandle(RequestHandle):
    """A route engine's handle whose result names the adapter version the route answers for (the
    merged model's engine sees a base-model request and would report no adapter)."""

    def __init__(self, handle: RequestHandle, digest: str) -> None:
        super().__init__(handle.state)
        self.digest = digest

    def _take(self, item: TokenEvent | BaseException) -> TokenEvent:
        if isinstance(item, TokenEvent) and item.result is not None:
            result = dataclasses.replace(item.result, adapter_digest=self.digest)
            item = dataclasses.replace(item, result=result)
        return super()._take(item)


class Route:
    """A merged model serving the requests for one adapter reference, in its own started engine.

    Args:
        spec: The reference it answers for and the model as given.
        folder: The model's local folder (pulled from the registry when ``spec.model`` is a reference).
        record: The folder's merge record (None for a model without one: answered by name).
        engine: Its engine (``adapter_slots == 0``: no LoRA layers, no per-token adapter work).
        model_digest: The registry version digest of the model, when it came from the registry.
        promoted: Made by ``PromoteAdapter`` (its folder is the server's own and goes with it).
    """

    def __init__(
        self,
        spec: RouteSpec,
        folder: Path,
        record: MergeRecord | None,
        engine: Engine,
        model_digest: str | None = None,
        promoted: bool = False,
    ) -> None:
        self.spec, self.folder, self.record, self.engine = spec, folder, record, engine
        self.model_digest, self.promoted = model_digest, promoted
        self.memory = RouteMemory(_module_bytes(engine.loaded.model), engine.kv.nbytes)
        adapters = record.adapters if record is not None else ()
        single = len(adapters) == 1 and adapters[0].source == "registry"
        self.adapter_digest: str | None = adapters[0].digest if single else None
        """The adapter version this route answers for; None: it answers for ``spec.ref`` by name."""
        record_file = folder / RECORD_FILE
        self.answer_digest = (
            self.adapter_digest
            or model_digest
            or (sha256_digest(record_file.read_bytes()) if record_file.is_file() else "")
        )
        """What results say they were answered with (``adapter_digest``)."""
        self.follows_tag = model_digest is not None and "@" not in spec.model
        """The model is a registry tag: a newer merged model under it replaces this one
        (:meth:`~loraswap.server.routes.router.Router.follow`)."""
        self.checked_at = time.monotonic()
        self.following = False

    def submit(self, request: Any) -> RoutedHandle:
        """Run ``request`` (which names this route's adapter) on the merged model."""
        handle = self.engine.submit(dataclasses.replace(request, adapter=""))
        return RoutedHandle(handle, self.answer_digest)

    def stop(self, drain_timeout: float) -> None:
        """Finish what runs (up to ``drain_timeout`` s), then free the model and its KV cache."""
        self.engine.stop(drain_timeout=drain_timeout)
        release_engine(self.engine)

    def status(self, state: str) -> RouteStatus:
        return RouteStatus(
            adapter=self.spec.ref,
            model=self.spec.model,
            adapter_digest=self.adapter_digest or "",
            model_digest=self.model_digest or "",
            method=self.record.method if self.record else "",
            state=state,
            weights_bytes=self.memory.weights,
            kv_cache_bytes=self.memory.kv_cache,
            promoted=self.promoted,
        )


@dataclass(frozen=True)
class RouteStatus:
    """A route as the admin API and the model list show it.

    Attributes:
        adapter: The adapter reference it answers for.
        model: The merged model as given (folder or registry model reference).
        adapter_digest: The version it answers for; empty when it answers for ``adapter`` by name.
        model_digest: The model's registry version, when it came from the registry.
        method: The merge method of its record (empty without one).
        state: ``serving``, or ``stale`` when ``adapter`` now resolves to another version.
        weights_bytes: Its model's parameters and buffers.
        kv_cache_bytes: Its engine's KV cache.
        promoted: Made by a promotion.
    """

    adapter: str
    model: str
    adapter_digest: str
    model_digest: str
    method: str
    state: str
    weights_bytes: int
    kv_cache_bytes: int
    promoted: bool


def _module_bytes(model: Any) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def release_engine(engine: Engine) -> None:
    """Drop what a stopped engine holds on the device (model, KV cache), so its memory comes back."""
    from loraswap.device import empty_device_cache

    engine.kv.k.clear()
    engine.kv.v.clear()
    engine.loaded = None  # type: ignore[assignment]
    engine.forward = None  # type: ignore[assignment]
    gc.collect()
    empty_device_cache(engine.device)


def route_engine_config(
    base: EngineConfig, folder: Path, max_batch_size: int | None, quantization: str, device: str
) -> EngineConfig:
    """The engine of a route over ``folder``: the shared engine's settings (at the precision and on the
    device it resolved to), no adapter slots; on CPU its step thread runs serially beside the shared
    engine's (``EngineConfig.step_threads``)."""
    threads = 1 if torch.device(device).type == "cpu" else base.step_threads
    return dataclasses.replace(
        base, base=str(folder), adapter_slots=0, max_batch_size=max_batch_size or base.max_batch_size,
        quantization=quantization, device=device, step_threads=threads,
    )  # fmt: skip


def check_budget(spec: RouteSpec, need: RouteMemory, used: int, budget: int) -> None:
    """Refuse a route that does not fit what is left of ``budget``, with the numbers."""
    if used + need.total > budget:
        raise OverloadedError(
            f"route {spec} does not fit in memory: it needs {_gib(need.total)} (weights {_gib(need.weights)}"
            f" + KV cache {_gib(need.kv_cache)}), and {_gib(max(budget - used, 0))} of the route budget "
            f"{_gib(budget)} is left (routes already hold {_gib(used)}); raise --route-memory-bytes, lower "
            "--route-max-batch-size, or drop a route"
        )


def model_folder(model: str, registry: Any) -> tuple[Path, str | None]:
    """The local folder of ``model`` (a folder, or a registry model reference pulled into the cache)
    and its registry digest (None for a folder)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if path.exists() or "/" in model:  # registry names have no "/": this was meant as a folder
        raise NotFoundError(f"merged model folder {model} does not exist (or is not a folder)")
    try:
        manifest = registry.resolve_model(model)
    except NotFoundError as exc:
        raise NotFoundError(f"merged model {model!r} is neither a folder nor in the registry: {exc}") from exc
    return registry.pull_model(f"{manifest.name}@{manifest.digest}"), manifest.digest


def read_record(folder: Path) -> MergeRecord | None:
    return MergeRecord.from_file(folder) if (folder / RECORD_FILE).is_file() else None

"""The adapter cache tiers: registry → local disk → host RAM → device slot.

Loads run on worker threads, so adapters needed by queued requests arrive while the current step runs;
concurrent requests for one adapter share one load. Tags resolve to digests, trusted for a short TTL.
Device-slot changes happen only on the engine thread (or under the engine's step lock).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from loraswap import paths
from loraswap.errors import AdapterValidationError, LoraswapError, NotFoundError
from loraswap.server.adapters.host_cache import HostCache
from loraswap.server.adapters.reader import AdapterReader, BaseShape, HostAdapter
from loraswap.server.adapters.slots import SlotTable
from loraswap.server.engine.api import AdapterStatus, EngineObserver, Tier
from loraswap.server.lora.layer import BatchedLoraLinear, fill_slot, fill_slot_bits

log = logging.getLogger(__name__)


@dataclass
class _Usage:
    name: str
    hits: int = 0
    last_used: float = 0.0


MAX_TRACKED = 10_000  # adapters remembered (listings, hit counts) besides those in the device/host tiers


class AdapterManager:
    """Owns the host cache, the device slot table and the loads between tiers."""

    def __init__(
        self,
        registry_factory: Callable[[], object],
        base: BaseShape,
        layers: dict[str, BatchedLoraLinear],
        num_slots: int,
        host_budget: int,
        dtype: torch.dtype,
        tag_ttl_s: float,
        workers: int,
        observer: EngineObserver,
    ) -> None:
        self._registry_factory = registry_factory
        self._registry = None
        self.base = base
        self.layers = layers
        self.dtype = dtype
        self.slots = SlotTable(num_slots)
        self.ranks: dict[int, int] = {}  # slot -> rank (read by the forward pass)
        self.host = HostCache(host_budget)
        self.tag_ttl_s = tag_ttl_s
        self.observer = observer
        self._lock = threading.Lock()
        self._loads: dict[str, Future[HostAdapter]] = {}
        self._resolved: dict[str, tuple[float, str, str, str | None]] = {}
        self._usage: OrderedDict[str, _Usage] = OrderedDict()  # least recently touched first
        self.max_tracked = MAX_TRACKED
        self.reader = AdapterReader(base, dtype)
        # On CPU, slot fills copy numpy views of the bits (host tensors are in the slot dtype already)
        self._cpu_slots = all(
            layer.a.device.type == "cpu" and layer.a.dtype == dtype for layer in layers.values()
        )
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-load")

    @property
    def registry(self):
        if self._registry is None:
            self._registry = self._registry_factory()
        return self._registry

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- resolving and loading (any thread) ------------------------------------------------------

    def resolve(self, ref: str) -> tuple[str, str, str | None]:
        """``ref`` → (name, digest, base fingerprint); tags are re-resolved after ``tag_ttl_s``."""
        cached = self._resolved.get(ref)
        if cached and ("@" in ref or time.monotonic() - cached[0] < self.tag_ttl_s):
            return cached[1], cached[2], cached[3]
        manifest = self.registry.resolve(ref)
        entry = (
            time.monotonic(),
            manifest.name,
            manifest.digest,
            getattr(manifest, "base_fingerprint", None),
        )
        self._resolved[ref] = entry
        return entry[1], entry[2], entry[3]

    def request(self, ref: str) -> Future[HostAdapter]:
        """A future for the host copy of ``ref``, starting (or joining) its load."""
        future: Future[HostAdapter] = Future()
        self._pool.submit(self._resolve_then_load, ref, future)
        return future

    def _resolve_then_load(self, ref: str, outer: Future[HostAdapter]) -> None:
        try:
            name, digest, fingerprint = self.resolve(ref)
            inner, start = self._host_future(name, digest, fingerprint)
            inner.add_done_callback(lambda f: _chain(f, outer))
            if start:  # this worker loads it (a second hand-off to the pool cost ~0.2 ms per load)
                self._load(name, digest, fingerprint, inner)
        except LoraswapError as exc:
            self.observer.on_load_failure(type(exc).__name__)
            outer.set_exception(exc)

    def _host_future(
        self, name: str, digest: str, fingerprint: str | None
    ) -> tuple[Future[HostAdapter], bool]:
        """The future for ``digest``'s host copy: done on a host hit, shared with a load in flight, or
        new; True when it is new and the caller must run :meth:`_load` for it."""
        with self._lock:
            self._track(name, digest)
            hit = self.slots.slot_of(digest) is not None
            self.observer.on_cache_lookup("device", hit)
            adapter = self.host.get(digest)
            if not hit:
                self.observer.on_cache_lookup("host", adapter is not None)
            if adapter is not None:
                done: Future[HostAdapter] = Future()
                done.set_result(adapter)
                return done, False
            if digest in self._loads:
                return self._loads[digest], False
            future: Future[HostAdapter] = Future()
            self._loads[digest] = future
        return future, True

    def _read(self, name: str, digest: str, fingerprint: str | None) -> HostAdapter:
        """Pull ``name@digest`` to the disk cache and read it. A cached copy trusted by its file stats
        that turns out invalid is hashed again (and fetched again if corrupt) before the error stands."""
        ref = f"{name}@{digest}"
        folder = self.registry.pull(ref)
        try:
            return self.reader.read(folder, name, digest, fingerprint)
        except AdapterValidationError:
            folder = self.registry.pull(ref, rehash=True)
            return self.reader.read(folder, name, digest, fingerprint)

    def _load(self, name: str, digest: str, fingerprint: str | None, future: Future[HostAdapter]) -> None:
        started = time.perf_counter()
        try:
            on_disk = (paths.adapter_cache_dir() / digest.split(":")[-1]).is_dir()
            self.observer.on_cache_lookup("disk", on_disk)
            adapter = self._read(name, digest, fingerprint)
            with self._lock:
                evicted = self.host.put(adapter, keep=set(self.slots.keys()))
            for _ in evicted:
                self.observer.on_eviction("host", "capacity")
            self.observer.on_adapter_load("disk" if on_disk else "registry", time.perf_counter() - started)
            future.set_result(adapter)
        except LoraswapError as exc:
            self.observer.on_load_failure(type(exc).__name__)
            future.set_exception(exc)
        except Exception as exc:  # an unexpected failure must still reach the waiting requests
            log.exception("loading adapter %s@%s failed", name, digest)
            self.observer.on_load_failure("internal")
            future.set_exception(exc)
        finally:
            with self._lock:
                self._loads.pop(digest, None)

    # -- device slots (engine thread / step lock) ------------------------------------------------

    def activate(self, adapter: HostAdapter) -> int | None:
        """Put ``adapter`` in a device slot (copying if needed); None when every slot is busy."""
        if not self.slots.can_place(adapter.digest):
            return None
        slot, evicted, copy = self.slots.place(adapter.digest)
        if evicted is not None:
            self.observer.on_eviction("device", "capacity")
        if copy:
            self._copy_into(slot, adapter)
        return slot

    def _copy_into(self, slot: int, adapter: HostAdapter) -> None:
        matrices = adapter.cpu_bits() if self._cpu_slots else adapter.modules
        parts = [
            (layer, *matrices.get(m, (None, None)), adapter.scales.get(m, 1.0))
            for m, layer in self.layers.items()
        ]
        (fill_slot_bits if self._cpu_slots else fill_slot)(slot, parts)
        self.ranks[slot] = adapter.rank
        with self._lock:  # keep the host copy warm while it is on the device
            self.host.put(adapter, keep=set(self.slots.keys()))

    def remember(self, name: str, digest: str) -> None:
        """Track ``digest`` for listings (an adapter pulled to disk without being loaded)."""
        with self._lock:
            self._track(name, digest)

    def _track(self, name: str, digest: str) -> None:
        """Remember ``digest`` (caller holds the lock); past ``max_tracked`` entries, forget the least
        recently touched ones that are in no memory tier and not loading, so the table stays bounded."""
        self._usage.setdefault(digest, _Usage(name))
        self._usage.move_to_end(digest)
        while len(self._usage) > self.max_tracked:
            victim = next((d for d in self._usage if d != digest and not self._held(d)), None)
            if victim is None:
                break
            del self._usage[victim]

    def _held(self, digest: str) -> bool:
        return digest in self.slots or self.host.peek(digest) is not None or digest in self._loads

    def note_use(self, digest: str) -> None:
        usage = self._usage.get(digest)
        if usage is not None:
            usage.hits += 1
            usage.last_used = time.time()

    def unload(self, digest: str) -> bool:
        """Drop ``digest`` from the device (if idle) and host tiers; True if anything was dropped."""
        slot = self.slots.remove(digest)
        if slot is not None:
            self.ranks.pop(slot, None)
            fill_slot(slot, [(layer, None, None, 1.0) for layer in self.layers.values()])
            self.observer.on_eviction("device", "unload")
        with self._lock:
            dropped = self.host.remove(digest) is not None
        if dropped:
            self.observer.on_eviction("host", "unload")
        return slot is not None or dropped

    def set_pinned(self, digest: str, pinned: bool) -> None:
        if pinned:
            self.slots.pin(digest)
            self.host.pinned.add(digest)
        else:
            self.slots.unpin(digest)
            self.host.pinned.discard(digest)

    def status(self, digest: str) -> AdapterStatus:
        usage = self._usage.get(digest)
        if usage is None:
            raise NotFoundError(f"adapter {digest} is not known to this server")
        tiers: list[Tier] = []
        if digest in self.slots:
            tiers.append("device")
        host = self.host.peek(digest)
        if host is not None:
            tiers.append("host")
        if (paths.adapter_cache_dir() / digest.split(":")[-1]).is_dir():
            tiers.append("disk")
        return AdapterStatus(
            name=usage.name,
            digest=digest,
            tiers=tuple(tiers),
            pinned=self.slots.is_pinned(digest),
            size_bytes=host.nbytes if host else 0,
            rank=host.rank if host else 0,
            hits=usage.hits,
            last_used=usage.last_used,
        )

    def statuses(self) -> list[AdapterStatus]:
        return [self.status(digest) for digest in list(self._usage)]


def _chain(source: Future, target: Future) -> None:
    if source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())

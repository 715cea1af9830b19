"""The adapter cache tiers: registry → local disk → host RAM → device slot.

Loads run on worker threads, so adapters needed by queued requests arrive while the current step runs;
concurrent requests for one adapter share one load. Tags resolve to digests, trusted for a short TTL.

Who may touch what:

* The manager's ``_lock`` guards all the bookkeeping: the slot table (residency, in-use counts, pins),
  the host cache (entries and pins), the usage table, the loads in flight and the resolved references.
  Every read and write of them, from any thread, holds it. It is held only for bookkeeping: no file or
  registry I/O, no tensor copy and no observer call runs under it.
* Only the engine thread, or a thread holding the engine's step lock, changes the slot table
  (:meth:`activate`, :meth:`acquire`, :meth:`release`, :meth:`unload`, :meth:`set_pinned`), and only it
  writes the layers' slot tensors and :attr:`ranks` (which the forward pass, on that thread, reads). It
  decides a slot change under ``_lock`` and copies the tensors after releasing it, so load workers
  never wait for a copy.
* Load workers and listings read the slot table (under ``_lock``) and never change it; workers change
  the host cache, the usage table and the loads in flight (under ``_lock``).
* Lock order: the step lock, then ``_lock``; never the step lock while holding ``_lock``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from loraswap.device import serial_torch_thread
from loraswap.errors import AdapterValidationError, LoraswapError, NotFoundError
from loraswap.registry.cache import CacheSession, cached_adapter_dir
from loraswap.server.adapters.host_cache import HostCache
from loraswap.server.adapters.lru import LRU
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


@dataclass(frozen=True)
class _Resolution:
    at: float  # time.monotonic() of the registry's answer
    name: str
    digest: str
    fingerprint: str | None


MAX_TRACKED = 10_000  # adapters remembered (listings, hit counts); those in a memory tier or loading stay
MAX_RESOLVED = 10_000  # reference strings whose resolution is remembered


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
        self.layers = layers
        self.slots = SlotTable(num_slots)
        self.ranks: dict[int, int] = {}  # slot -> rank (engine thread only: the forward pass reads it)
        self.host = HostCache(host_budget)
        self.tag_ttl_s = tag_ttl_s
        self.observer = observer
        self._lock = threading.Lock()
        self._loads: dict[str, Future[HostAdapter]] = {}
        self._resolved: LRU[str, _Resolution] = LRU(MAX_RESOLVED)
        self._usage: LRU[str, _Usage] = LRU(MAX_TRACKED)
        self.reader = AdapterReader(base, dtype)
        # On CPU, slot fills copy numpy views of the bits (host tensors are in the slot dtype already)
        self._cpu_slots = all(
            layer.a.device.type == "cpu" and layer.a.dtype == dtype for layer in layers.values()
        )
        self._pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="adapter-load", initializer=serial_torch_thread
        )  # only the step thread runs torch ops in parallel (loraswap/device.py)
        # Held while the process uses the disk tier: after a process that ended without closing it,
        # every cached version is hashed in full before its next use (registry/README.md, "Pull cache").
        self._cache_session = CacheSession.open()
        if self._cache_session.unclean:
            log.warning("the adapter cache was not closed cleanly: cached adapters are re-hashed before use")

    @property
    def registry(self):
        if self._registry is None:
            self._registry = self._registry_factory()
        return self._registry

    @property
    def max_tracked(self) -> int:
        """Adapters remembered for listings and hit counts; past it the least recently touched one in no
        memory tier and not loading is forgotten (those in a tier or loading are always remembered)."""
        return self._usage.capacity

    @max_tracked.setter
    def max_tracked(self, value: int) -> None:
        with self._lock:
            self._usage.capacity = value

    @property
    def max_resolved(self) -> int:
        """Reference strings whose resolution is remembered (least recently asked for first out)."""
        return self._resolved.capacity

    @max_resolved.setter
    def max_resolved(self, value: int) -> None:
        with self._lock:
            self._resolved.capacity = value

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._cache_session.close()

    # -- resolving and loading (any thread) ------------------------------------------------------

    def resolve(self, ref: str) -> tuple[str, str, str | None]:
        """``ref`` → (name, digest, base fingerprint); tags are re-resolved after ``tag_ttl_s``."""
        with self._lock:
            cached = self._resolved.get(ref)
        if cached and ("@" in ref or time.monotonic() - cached.at < self.tag_ttl_s):
            return cached.name, cached.digest, cached.fingerprint
        manifest = self.registry.resolve(ref)
        fingerprint = getattr(manifest, "base_fingerprint", None)
        with self._lock:
            resolution = _Resolution(time.monotonic(), manifest.name, manifest.digest, fingerprint)
            self._resolved.put(ref, resolution)
        return manifest.name, manifest.digest, fingerprint

    def request(self, ref: str) -> Future[HostAdapter]:
        """A future for the host copy of ``ref``, starting (or joining) its load."""
        future: Future[HostAdapter] = Future()
        self._pool.submit(self._resolve_then_load, ref, future)
        return future

    def _resolve_then_load(self, ref: str, outer: Future[HostAdapter]) -> None:
        try:
            name, digest, fingerprint = self.resolve(ref)
            inner, start = self._host_future(name, digest)
            inner.add_done_callback(lambda f: _chain(f, outer))
            if start:  # this worker loads it (handing the load to another worker would only add latency)
                self._load(name, digest, fingerprint, inner)
        except LoraswapError as exc:
            self.observer.on_load_failure(type(exc).__name__)
            outer.set_exception(exc)

    def _host_future(self, name: str, digest: str) -> tuple[Future[HostAdapter], bool]:
        """The future for ``digest``'s host copy: done on a host hit, shared with a load in flight, or
        new; True when it is new and the caller must run :meth:`_load` for it."""
        start = False
        with self._lock:
            self._track(name, digest)
            on_device = digest in self.slots
            adapter = self.host.get(digest)
            future = self._loads.get(digest) if adapter is None else None
            if adapter is None and future is None:
                future = self._loads[digest] = Future()
                start = True
        self.observer.on_cache_lookup("device", on_device)
        if not on_device:
            self.observer.on_cache_lookup("host", adapter is not None)
        if adapter is not None:
            future = Future()
            future.set_result(adapter)
        return future, start

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
            on_disk = cached_adapter_dir(digest).is_dir()
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

    def slot_snapshot(self) -> tuple[list[tuple[str, int, bool]], int]:
        """The slot table now: ``(digest, requests using it, pinned)`` of each resident adapter, least
        recently used first, and the number of empty slots."""
        with self._lock:
            return self.slots.residents(), self.slots.free_slots

    def activate(self, adapter: HostAdapter, victim: str | None = None) -> int | None:
        """Put ``adapter`` in a device slot (copying if needed); None when every slot is busy.

        Args:
            adapter: The host copy to make resident.
            victim: The idle resident adapter to evict when no slot is free (default: the least
                recently used idle one); None is returned when it is not resident, in use or pinned.
        """
        host_evicted: list[str] = []
        with self._lock:
            if not self.slots.can_place(adapter.digest, victim):
                return None
            slot, evicted, copy = self.slots.place(adapter.digest, victim)
            self._track(adapter.name, adapter.digest)  # it may have been forgotten while in no tier
            if copy:  # keep the host copy warm while it is on the device
                host_evicted = self.host.put(adapter, keep=set(self.slots.keys()))
        if evicted is not None:
            self.observer.on_eviction("device", "capacity")
        for _ in host_evicted:
            self.observer.on_eviction("host", "capacity")
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

    def acquire(self, digest: str) -> None:
        """A request starts using the resident ``digest`` (its slot is not evicted until
        :meth:`release`); counts as a use for listings."""
        with self._lock:
            self.slots.acquire(digest)
            usage = self._usage.get(digest)
            if usage is not None:
                usage.hits += 1
                usage.last_used = time.time()

    def release(self, digest: str) -> None:
        """A request using ``digest`` ended."""
        with self._lock:
            self.slots.release(digest)

    def unload(self, digest: str, keep_host: bool = False) -> bool:
        """Drop ``digest`` from the device (if idle) and host tiers (``keep_host``: the device tier only);
        True if anything was dropped."""
        with self._lock:
            slot = self.slots.remove(digest)
            dropped = not keep_host and self.host.remove(digest) is not None
        if slot is not None:
            self.ranks.pop(slot, None)
            fill_slot(slot, [(layer, None, None, 1.0) for layer in self.layers.values()])
            self.observer.on_eviction("device", "unload")
        if dropped:
            self.observer.on_eviction("host", "unload")
        return slot is not None or dropped

    def set_pinned(self, digest: str, pinned: bool) -> None:
        """Pin ``digest`` to the device and host tiers, or unpin it.

        Raises:
            OverloadedError: the pin would leave no unpinned device slot for other adapters' traffic.
        """
        with self._lock:
            if pinned:
                self.slots.pin(digest)
                self.host.pinned.add(digest)
            else:
                self.slots.unpin(digest)
                self.host.pinned.discard(digest)

    # -- tracking and listings (any thread) ------------------------------------------------------

    def remember(self, name: str, digest: str) -> None:
        """Track ``digest`` for listings (an adapter pulled to disk without being loaded)."""
        with self._lock:
            self._track(name, digest)

    def _track(self, name: str, digest: str) -> None:
        """Remember ``digest`` as the most recently touched (caller holds the lock); past
        :attr:`max_tracked` entries, forget the least recently touched ones that are in no memory tier
        and not loading, so the table stays bounded."""
        usage = self._usage.peek(digest)
        self._usage.put(digest, usage if usage is not None else _Usage(name), protect=self._held)

    def _held(self, digest: str) -> bool:
        return digest in self.slots or digest in self.host or digest in self._loads

    def status(self, digest: str) -> AdapterStatus:
        """Where ``digest`` lives now.

        Raises:
            NotFoundError: ``digest`` is not tracked (never asked for, or forgotten in no tier).
        """
        with self._lock:
            status = self._memory_status(digest)
        if status is None:
            raise NotFoundError(f"adapter {digest} is not known to this server")
        return _with_disk_tier(status)

    def statuses(self) -> list[AdapterStatus]:
        """Every tracked adapter, least recently touched first: one consistent snapshot of the memory
        tiers (the disk tier is looked at after it)."""
        with self._lock:
            tracked = self._usage.keys()
            found = [self._memory_status(digest) for digest in tracked]
        return [_with_disk_tier(status) for status in found]

    def _memory_status(self, digest: str) -> AdapterStatus | None:
        """``digest``'s status but for the disk tier (caller holds the lock); None when not tracked."""
        usage = self._usage.peek(digest)
        if usage is None:
            return None
        host = self.host.peek(digest)
        tiers: list[Tier] = []
        if digest in self.slots:
            tiers.append("device")
        if host is not None:
            tiers.append("host")
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


def _with_disk_tier(status: AdapterStatus) -> AdapterStatus:
    if not cached_adapter_dir(status.digest).is_dir():
        return status
    return dataclasses.replace(status, tiers=(*status.tiers, "disk"))


def _chain(source: Future, target: Future) -> None:
    if source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())

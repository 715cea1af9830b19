"""The adapter cache tiers: registry → local disk → host RAM → device slot.

Loads run on worker threads, so adapters needed by queued requests arrive while the current step runs;
concurrent requests for one adapter share one load. References resolve to digests through
:class:`~loraswap.server.adapters.resolver.Resolver` (tags trusted for a short TTL, the last known version
served while the registry is unreachable). A reference it answers without I/O joins its host copy on the
caller's thread; registry look-ups run in a resolve lane and pulls and reads in a load lane, so a cold
multi-GB pull never delays a hot adapter. Every failure on the way, expected or not, fails the futures
of the requests waiting for that adapter: none waits forever.

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
from loraswap.errors import AdapterValidationError, DrainingError, LoraswapError, NotFoundError
from loraswap.registry.cache import (
    CacheSession,
    cached_adapter_dir,
    recorded_manifest,
    verified_cache_folder,
)
from loraswap.server.adapters.host_cache import HostCache
from loraswap.server.adapters.lru import LRU
from loraswap.server.adapters.reader import AdapterReader, BaseShape, HostAdapter
from loraswap.server.adapters.resolver import Resolution, Resolver
from loraswap.server.adapters.slots import SlotTable
from loraswap.server.engine.api import AdapterStatus, EngineObserver, Tier
from loraswap.server.lora.layer import BatchedLoraLinear, fill_slot, fill_slot_bits

log = logging.getLogger(__name__)


@dataclass
class _Usage:
    name: str
    hits: int = 0
    last_used: float = 0.0


MAX_TRACKED = 10_000  # adapters remembered (listings, hit counts); those in a memory tier or loading stay
RESOLVE_WORKERS = 8  # resolve-lane threads: look-ups of references never answered wait out a silent
# registry's timeouts, and must not hold up the re-resolution of tags already served


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
        stale_grace_s: float = 0.0,
        refresh_wait_s: float = 1.0,
    ) -> None:
        self._registry_factory = registry_factory
        self._registry = None
        self.layers = layers
        self.slots = SlotTable(num_slots)
        self.ranks: dict[int, int] = {}  # slot -> rank (engine thread only: the forward pass reads it)
        self.host = HostCache(host_budget)
        self.observer = observer
        self.resolver = Resolver(
            lambda: self.registry, tag_ttl_s, stale_grace_s, observer.on_stale_resolution,
            local=self._local_resolution, refresh_wait_s=refresh_wait_s,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._loads: dict[str, Future[HostAdapter]] = {}
        self._usage: LRU[str, _Usage] = LRU(MAX_TRACKED)
        self.reader = AdapterReader(base, dtype)
        # On CPU, slot fills copy numpy views of the bits (host tensors are in the slot dtype already)
        self._cpu_slots = all(
            layer.a.device.type == "cpu" and layer.a.dtype == dtype for layer in layers.values()
        )
        # Two lanes: registry look-ups (small, quick) never wait behind pulls and reads (maybe GBs)
        self._resolve_pool = ThreadPoolExecutor(RESOLVE_WORKERS, thread_name_prefix="adapter-resolve")
        self._load_pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="adapter-load", initializer=serial_torch_thread
        )  # only the step thread runs torch ops in parallel (loraswap/device.py)
        # Held while the process uses the disk tier: after a process that ended without closing it,
        # every cached version is hashed in full before its next use (registry/README.md, "Pull cache").
        self._cache_session = CacheSession.open()
        if self._cache_session.unclean:
            log.warning("the adapter cache was not closed cleanly: cached adapters are re-hashed before use")

    @property
    def registry(self):
        """The registry, opened on first use (and again after an attempt that failed)."""
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
        return self.resolver.capacity

    @max_resolved.setter
    def max_resolved(self, value: int) -> None:
        self.resolver.capacity = value

    def close(self) -> None:
        self.resolver.close()
        for pool in (self._resolve_pool, self._load_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        self._cache_session.close()

    # -- resolving and loading (any thread) ------------------------------------------------------

    def resolve(self, ref: str) -> tuple[str, str, str | None]:
        """``ref`` → (name, digest, base fingerprint), as :class:`Resolver` answers (blocking on a miss)."""
        found = self.resolver.resolve(ref)
        return found.name, found.digest, found.fingerprint

    def request(self, ref: str) -> Future[HostAdapter]:
        """A future for the host copy of ``ref``, starting (or joining) its load; it always completes,
        with the adapter or with the error that stopped it.

        A reference resolved without I/O (a digest seen before, a fresh tag) joins its host copy here,
        on the caller's thread: a resident adapter's future is done on return. Otherwise the resolve
        lane asks the registry; a load that must fetch or read files runs in the load lane, so a slow
        pull delays only the requests waiting for that adapter.
        """
        future: Future[HostAdapter] = Future()
        known = self.resolver.cached(ref)
        if known is not None:
            self._join(known, future)
        else:
            self._run(self._resolve_pool, future, self._resolve_then_join, ref, future)
        return future

    def _run(self, pool: ThreadPoolExecutor, future: Future, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn(*args)`` on ``pool``; ``future`` fails if the pool takes no more work (closed)."""
        try:
            pool.submit(fn, *args)
        except RuntimeError:
            _fail(future, DrainingError("the server is stopping: adapters are no longer loaded"))

    def _resolve_then_join(self, ref: str, outer: Future[HostAdapter]) -> None:
        try:
            self._join(self.resolver.resolve(ref), outer)
        except BaseException as exc:  # every failure must reach the waiting requests, whatever it is
            self._failed(exc, f"resolving adapter {ref}")
            _fail(outer, exc)

    def _join(self, found: Resolution, outer: Future[HostAdapter]) -> None:
        """Chain ``outer`` to ``found``'s host copy, starting its load in the load lane if none runs."""
        inner, start = self._host_future(found.name, found.digest)
        inner.add_done_callback(lambda f: _chain(f, outer))
        if start:
            self._run(self._load_pool, inner, self._load, found.name, found.digest, found.fingerprint, inner)

    def _failed(self, exc: BaseException, what: str) -> None:
        """Count a failed resolution or load (and log it in full when it is not a domain error)."""
        if isinstance(exc, LoraswapError):
            self.observer.on_load_failure(type(exc).__name__)
        else:
            log.error("%s failed", what, exc_info=exc)
            self.observer.on_load_failure("internal")

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
        """Read ``name@digest`` from the disk cache when a verified copy is there (no registry I/O), else
        pull it first. A cached copy trusted by its file stats that turns out invalid is hashed again
        (and fetched again if corrupt) before the error stands."""
        ref = f"{name}@{digest}"
        folder = verified_cache_folder(digest)
        if folder is None:
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
        except BaseException as exc:  # every failure must reach the waiting requests, whatever it is
            self._failed(exc, f"loading adapter {name}@{digest}")
            future.set_exception(exc)
        finally:
            with self._lock:
                self._loads.pop(digest, None)

    def _local_resolution(self, ref: str) -> Resolution | None:
        """A digest reference whose version is in the disk cache, answered from the manifest kept there."""
        name, _, digest = ref.partition("@")
        try:
            manifest = recorded_manifest(digest) if digest else None
        except LoraswapError:  # not a well-formed digest: the registry gives the error
            return None
        if manifest is None:
            return None
        return Resolution(name, manifest.digest, manifest.base_fingerprint, time.monotonic())

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
        _fail(target, source.exception())
    elif not target.done():
        target.set_result(source.result())


def _fail(future: Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)

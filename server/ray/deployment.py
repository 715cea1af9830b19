"""The engine replica: one loraswap engine per Ray Serve replica, its adapters Ray multiplexed models.

Requests come from the ingress with the adapter already resolved to ``name@sha256:…`` and sent with
``multiplexed_model_id`` = that digest, so Ray Serve's router prefers replicas where the digest is loaded.
:meth:`EngineReplica.load_adapter` is the multiplexed loader (wrapped by ``serve.multiplexed`` in
:func:`replica_deployment`): it loads the adapter into the engine (host tier, then a device slot when one
is free; otherwise the engine places it when the request is admitted) and returns a
:class:`ResidentAdapter`, whose release, called by Ray when its LRU drops the model, frees the engine's
device slot. The host copy stays: the engine's host tier (``host_cache_bytes``, its own LRU) decides when
it goes, so a digest Ray routes here again loads from RAM, not from disk. Each replica serves its own
``/metrics`` (``metrics_port``; 0 = a free one).

A request comes with the time its call has left (``timeout_s``), made a deadline on this replica's clock:
the engine drops the request when it passes. The ``admin_*`` methods are the Admin service's work on one
replica (:class:`~loraswap.server.ray.admin.ReplicaAdmin` sends them to the replicas where they matter).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from loraswap.errors import InvalidArgumentError, OverloadedError
from loraswap.server.engine.api import (
    AdapterStatus,
    EngineInfo,
    GenerationRequest,
    GenerationResult,
    Tier,
    TokenEvent,
)
from loraswap.server.metrics import Metrics
from loraswap.server.ray.config import RayAppConfig
from loraswap.server.settings import ServeSettings

log = logging.getLogger(__name__)
REPLICA_DEPLOYMENT = "LoraswapReplica"


@dataclass(frozen=True)
class ReplicaReport:
    """What one replica says about itself (:meth:`EngineReplica.describe`).

    Attributes:
        replica_id: Ray Serve's id of the replica (unique within the deployment).
        actor_name: Name of the replica's Ray actor (in namespace ``serve``), for ``ray.get_actor``.
        pid: The replica process.
        metrics_url: Its ``/metrics`` URL, or None when ``metrics_port`` is -1.
        loads: Multiplexed loads so far per adapter digest (each one an engine load).
        resident: Digests Ray holds as loaded models on this replica now.
    """

    replica_id: str
    actor_name: str
    pid: int
    metrics_url: str | None
    loads: dict[str, int]
    resident: tuple[str, ...]


class ResidentAdapter:
    """An adapter loaded in a replica's engine, as Ray's multiplexer holds it. Ray calls ``__del__`` when
    its LRU drops the model (and the interpreter may call it again when the object is collected), so the
    release runs once: it unloads the engine's copy unless a newer load of the same digest holds it."""

    def __init__(self, replica: EngineReplica, name: str, digest: str) -> None:
        self.replica, self.name, self.digest = replica, name, digest
        self._released = threading.Event()

    def release(self) -> None:
        """Unload the engine's copy (once; a slot in use stays until its requests end, then ages out)."""
        if self._released.is_set():
            return
        self._released.set()
        self.replica.unload(self)

    def __del__(self) -> None:
        self.release()


class EngineReplica:
    """One engine; the body of the Ray Serve replica deployment (see :func:`replica_deployment`)."""

    def __init__(self, settings: ServeSettings) -> None:
        from loraswap.device import serial_torch_thread
        from loraswap.server.engine import Engine

        serial_torch_thread()  # this thread loads the model; the engine's step thread is the one OpenMP team
        self.settings = settings
        self.metrics = Metrics(settings.metrics_adapters)
        self.engine = Engine(settings.engine, observer=self.metrics)
        self.engine.start()
        self.metrics.attach_engine(self.engine)
        self.metrics_url: str | None = None
        if settings.metrics_port >= 0:
            port = self.metrics.serve_http(settings.metrics_host, settings.metrics_port)
            self.metrics_url = f"http://{settings.metrics_host}:{port}/metrics"
        self.loads: Counter[str] = Counter()
        self._held: dict[str, ResidentAdapter] = {}  # digest -> the newest load Ray holds
        self._names: dict[str, str] = {}  # digest -> adapter name, from the requests that asked for it
        self._pinned: set[str] = set()  # digests pinned by the Admin service: Ray's LRU leaves them be
        self._lock = threading.Lock()

    # -- the multiplexed loader ---------------------------------------------------------------------

    async def load_adapter(self, digest: str) -> ResidentAdapter:
        """Ray Serve's multiplexed loader for ``digest`` (``serve.multiplexed`` wraps it)."""
        name = self._names[digest]
        ref = f"{name}@{digest}"
        try:
            await asyncio.to_thread(self.engine.load_adapter, ref, "device")
        except OverloadedError:  # every slot in use by running requests: admission places it later
            await asyncio.to_thread(self.engine.load_adapter, ref, "host")
        resident = ResidentAdapter(self, name, digest)
        with self._lock:
            self.loads[digest] += 1
            self._held[digest] = resident
        return resident

    def unload(self, resident: ResidentAdapter) -> None:
        """Ray dropped ``resident``: unload the engine's copy unless a newer load holds the digest or it
        is pinned."""
        with self._lock:
            if self._held.get(resident.digest) is not resident:
                return
            del self._held[resident.digest]
            if resident.digest in self._pinned:
                return
        try:  # the device slot only: the host copy ages out under the host tier's byte budget
            self.engine.unload_adapter(f"{resident.name}@{resident.digest}", keep_host=True)
        except Exception:  # an unload never fails a request; the engine's own LRU ages the copy out
            log.exception("unloading %s@%s failed", resident.name, resident.digest)

    async def _warm(self, request: GenerationRequest) -> None:
        """Hold the request's adapter as a multiplexed model (loading it on a miss)."""
        if not request.adapter:
            return
        from ray import serve

        digest = request.adapter.partition("@")[2]
        model_id = serve.get_multiplexed_model_id()
        if not digest.startswith("sha256:") or model_id != digest:
            raise InvalidArgumentError(
                f"replica requests carry name@digest and that digest as multiplexed_model_id, got "
                f"{request.adapter!r} with {model_id!r}"
            )
        await self._hold(request.adapter)

    async def _hold(self, ref: str) -> None:
        """Hold ``ref`` (``name@digest``) as a multiplexed model: Ray routes its digest here from now on."""
        name, _, digest = ref.partition("@")
        self._names[digest] = name
        await self.load_adapter(digest)

    # -- requests -------------------------------------------------------------------------------------

    async def _events(self, request: GenerationRequest, timeout_s: float | None) -> AsyncIterator[TokenEvent]:
        if timeout_s is not None:  # the deadline on this replica's clock
            request = replace(request, deadline=time.monotonic() + timeout_s)
        await self._warm(request)
        handle = self.engine.submit(request)
        try:
            async for event in handle.aevents():
                if event.result is not None:
                    self.metrics.on_result(request.adapter, event.result)
                yield event
        finally:
            handle.cancel()  # a no-op once finished; frees the row when the caller went away

    async def generate(self, request: GenerationRequest, timeout_s: float | None = None) -> GenerationResult:
        """Run ``request`` to the end (within ``timeout_s`` seconds from now, when given)."""
        result = None
        async for event in self._events(request, timeout_s):
            result = event.result
        assert result is not None
        return result

    async def generate_stream(
        self, request: GenerationRequest, timeout_s: float | None = None
    ) -> AsyncIterator[TokenEvent]:
        """Stream ``request``'s events (the last carries the result; ``timeout_s``: see :meth:`generate`)."""
        async for event in self._events(request, timeout_s):
            yield event

    # -- the Admin service's work on this replica (refs are name@digest) -----------------------------

    async def admin_load(self, ref: str, tier: Tier) -> AdapterStatus:
        """Warm ``ref`` into ``tier``: ``disk`` pulls it only; ``host`` and ``device`` also make it a
        multiplexed model of this replica (sent with its digest as ``multiplexed_model_id``)."""
        if tier != "disk":
            await self._hold(ref)
        return await asyncio.to_thread(self.engine.load_adapter, ref, tier)

    async def admin_unload(self, ref: str) -> None:
        """Drop ``ref`` from this engine's device and host tiers, pinned or not. Ray may still hold its
        digest here (and route it here): the next request loads it again, and Ray's LRU unloads that."""
        with self._lock:
            self._pinned.discard(ref.partition("@")[2])
        await asyncio.to_thread(self.engine.unload_adapter, ref)

    async def admin_pin(self, ref: str) -> AdapterStatus:
        """Load ``ref`` into a device slot and keep it there; a multiplexed model of this replica."""
        await self._hold(ref)
        status = await asyncio.to_thread(self.engine.pin, ref)
        with self._lock:
            self._pinned.add(status.digest)
        return status

    async def admin_unpin(self, ref: str) -> AdapterStatus:
        with self._lock:
            self._pinned.discard(ref.partition("@")[2])
        return await asyncio.to_thread(self.engine.unpin, ref)

    def list_adapters(self) -> list[AdapterStatus]:
        return self.engine.list_adapters()

    # -- observability ------------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        return self.engine.info()

    def describe(self) -> ReplicaReport:
        """This replica's identity, metrics URL and multiplexed loads."""
        import ray
        from ray import serve

        context = serve.get_replica_context()
        with self._lock:
            loads, resident = dict(self.loads), tuple(sorted(self._held))
        return ReplicaReport(
            replica_id=context.replica_id.unique_id,
            actor_name=ray.get_runtime_context().get_actor_name() or "",
            pid=os.getpid(),
            metrics_url=self.metrics_url,
            loads=loads,
            resident=resident,
        )

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(drain_timeout=self.settings.grace_seconds)
            self.metrics.stop_http()


def replica_deployment(config: RayAppConfig, settings: ServeSettings) -> Any:
    """The Ray Serve deployment of :class:`EngineReplica` (imports ``ray``)."""
    from ray import serve

    cap = config.max_adapters_per_replica or settings.engine.adapter_slots

    class LoraswapReplica(EngineReplica):
        load_adapter = serve.multiplexed(max_num_models_per_replica=cap)(EngineReplica.load_adapter)

    return serve.deployment(
        LoraswapReplica,
        name=REPLICA_DEPLOYMENT,
        autoscaling_config=config.autoscaling(),
        max_ongoing_requests=config.max_ongoing_requests,
        graceful_shutdown_timeout_s=settings.grace_seconds,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
    )

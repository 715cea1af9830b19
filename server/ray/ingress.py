"""The ingress: ``loraswap.v1.Inference`` and ``loraswap.v1.Admin`` behind Ray Serve's gRPC proxy, the OpenAI
API behind its HTTP proxy.

Every request's adapter reference is resolved here against the shared registry (the engine's
:class:`~loraswap.server.adapters.resolver.Resolver`: a tag is trusted for ``tag_ttl_s``, a digest
forever, the last answer served while the registry is unreachable), rewritten to ``name@sha256:…`` and
sent to the engine replicas with ``multiplexed_model_id`` = the digest: all traffic for one version goes
where that version is warm, and a moved tag moves it at once for every replica. A request whose replica
dies before it answers is sent again (:attr:`RayAppConfig.replica_retries` times; a stream only before its
first event), then fails UNAVAILABLE.

As on a single server, each gRPC call's bearer token is checked (``inference_tokens``, ``admin_tokens``)
and its deadline goes with the request to the engine, which drops the request when it passes
(:mod:`~loraswap.server.ray.calls`); the Admin service acts on the replicas
(:mod:`~loraswap.server.ray.admin`).
Errors get the single server's status codes (:mod:`loraswap.server.grpc.status`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

from loraswap.errors import CancelledError, DrainingError, LoraswapError
from loraswap.retry import Retry, aretry
from loraswap.server.adapters.resolver import Resolver
from loraswap.server.auth import TokenAuth
from loraswap.server.engine.api import (
    AdapterStatus,
    EngineInfo,
    GenerationRequest,
    GenerationResult,
    TokenEvent,
)
from loraswap.server.engine_slot import EngineSlot
from loraswap.server.grpc import convert
from loraswap.server.grpc.pb import admin_pb2, inference_pb2
from loraswap.server.grpc.servicers import AdminServicer
from loraswap.server.grpc.status import INTERNAL_MESSAGE, status_for
from loraswap.server.ray import grpc_proxy  # noqa: F401 - the proto module aliases, for unpickling requests
from loraswap.server.ray.admin import ReplicaAdmin
from loraswap.server.ray.calls import ADMIN_SERVICE, INFERENCE_SERVICE, admit, time_left
from loraswap.server.ray.config import RayAppConfig
from loraswap.server.ray.deployment import REPLICA_DEPLOYMENT
from loraswap.server.ray.failures import domain_error, replica_retry
from loraswap.server.settings import ServeSettings

log = logging.getLogger(__name__)
INGRESS_DEPLOYMENT = "LoraswapIngress"


class RegistryOpener:
    """Opens the registry at ``url`` on first use (and again after an attempt that failed)."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self._registry: Any = None

    def __call__(self) -> Any:
        if self._registry is None:
            from loraswap.registry import open_registry

            self._registry = open_registry(self.url)
        return self._registry


def ingress_resolver(settings: ServeSettings) -> Resolver:
    """The ingress's :class:`~loraswap.server.adapters.resolver.Resolver`: the engine's rules (tag TTL,
    stale answers within the grace while the registry is unreachable) against the shared registry."""
    engine = settings.engine
    return Resolver(
        RegistryOpener(engine.registry), engine.tag_ttl_s, engine.tag_stale_grace_s,
        refresh_wait_s=engine.tag_refresh_wait_s,
    )  # fmt: skip


def _sent(request: GenerationRequest) -> tuple[GenerationRequest, float | None]:
    """``request`` as a replica takes it: without this process's deadline, with the seconds left before it.

    Raises:
        DeadlineExceededError: the deadline has passed.
    """
    return replace(request, deadline=None), time_left(request.deadline)


def _resending(when: str) -> Callable[[Retry], None]:
    """A ``before_retry`` hook that logs a request sent again after its replica died ``when``."""

    def log_it(event: Retry) -> None:
        log.warning("a replica died %s; sending it again (%s)", when, type(event.error).__name__)

    return log_it


class Dispatcher:
    """Sends generation requests to the engine replicas: resolution, multiplexing, retries."""

    def __init__(self, replicas: Any, settings: ServeSettings, config: RayAppConfig) -> None:
        self.replicas, self.settings, self.config = replicas, settings, config
        self.resolver = ingress_resolver(settings)
        self.retry = replica_retry(config.replica_retries)

    def resolve_pair(self, ref: str) -> tuple[str, str]:
        """(name, digest) of ``ref`` now (blocking: registry I/O unless resolved recently)."""
        found = self.resolver.resolve(ref)
        return found.name, found.digest

    async def pinned(self, request: GenerationRequest) -> tuple[GenerationRequest, str | None]:
        """``request`` with its adapter pinned to ``name@digest``, and that digest (None: base model)."""
        if not request.adapter:
            return request, None
        found = await asyncio.to_thread(self.resolver.resolve, request.adapter)
        name, digest = found.name, found.digest
        return replace(request, adapter=f"{name}@{digest}"), digest

    def _handle(self, digest: str | None, stream: bool = False) -> Any:
        options: dict[str, Any] = {"stream": stream}
        if digest:
            options["multiplexed_model_id"] = digest
        return self.replicas.options(**options)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run ``request`` on a replica (domain errors raised as they are)."""
        request, digest = await self.pinned(request)

        async def send() -> GenerationResult:
            return await self._handle(digest).generate.remote(*_sent(request))

        try:
            return await aretry(send, self.retry, before_retry=_resending("under a request"))
        except Exception as exc:
            raise domain_error(exc) from exc

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream ``request``'s events from a replica; sent again if its replica dies before the first."""
        request, digest = await self.pinned(request)

        async def first() -> tuple[AsyncIterator[TokenEvent], TokenEvent | None]:
            events = aiter(self._handle(digest, stream=True).generate_stream.remote(*_sent(request)))
            return events, await anext(events, None)

        try:
            events, event = await aretry(first, self.retry, before_retry=_resending("before streaming"))
            if event is not None:
                yield event
                async for event in events:
                    yield event
        except Exception as exc:
            raise domain_error(exc) from exc

    async def info(self) -> EngineInfo:
        return await self.replicas.options(stream=False).info.remote()


def _fail(grpc_context: Any, exc: BaseException) -> BaseException:
    """Set the call's status for ``exc`` (the domain table of :mod:`loraswap.server.grpc.status`)."""
    code, details = status_for(exc)
    if details == INTERNAL_MESSAGE:
        log.error("request failed", exc_info=exc)
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(details)
    return exc


class InferenceIngress:
    """The gRPC methods of ``loraswap.v1.Inference`` and ``loraswap.v1.Admin``, called by Ray Serve's gRPC
    proxy by name (method names are unique across the two services); each checks the call's token first."""

    def __init__(self, replicas: Any, settings: ServeSettings, config: RayAppConfig) -> None:
        self.settings = settings
        self.dispatcher = Dispatcher(replicas, settings, config)
        self.auth = TokenAuth(settings.inference_tokens, settings.admin_tokens)

    def _request(self, name: str, pb: inference_pb2.GenerateRequest, grpc_context: Any) -> GenerationRequest:
        call = admit(self.auth, INFERENCE_SERVICE, name, grpc_context)
        return convert.request_from_pb(pb, self.settings, deadline=call.deadline)

    async def Generate(
        self, request: inference_pb2.GenerateRequest, grpc_context: Any = None
    ) -> inference_pb2.GenerateResponse:
        try:
            result = await self.dispatcher.generate(self._request("Generate", request, grpc_context))
        except Exception as exc:
            raise _fail(grpc_context, exc) from None
        return convert.result_to_pb(result)

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        try:
            async for event in self.dispatcher.stream(self._request("GenerateStream", request, grpc_context)):
                yield convert.event_to_pb(event)
        except Exception as exc:
            raise _fail(grpc_context, exc) from None

    # -- Admin: the single server's servicer over the replicas (blocking: in a worker thread) ---------

    async def _admin(self, name: str, request: Any, grpc_context: Any) -> Any:
        try:
            call = admit(self.auth, ADMIN_SERVICE, name, grpc_context)
            slot = EngineSlot()
            slot.engine = ReplicaAdmin(self.dispatcher.replicas, self.dispatcher.resolve_pair, call.deadline)
            servicer = AdminServicer(slot, self.settings)
            return await asyncio.to_thread(getattr(servicer, name), request, call)
        except Exception as exc:
            raise _fail(grpc_context, exc) from None

    async def LoadAdapter(self, request: admin_pb2.LoadAdapterRequest, grpc_context: Any = None) -> Any:
        return await self._admin("LoadAdapter", request, grpc_context)

    async def UnloadAdapter(self, request: admin_pb2.UnloadAdapterRequest, grpc_context: Any = None) -> Any:
        return await self._admin("UnloadAdapter", request, grpc_context)

    async def PinAdapter(self, request: admin_pb2.PinAdapterRequest, grpc_context: Any = None) -> Any:
        return await self._admin("PinAdapter", request, grpc_context)

    async def UnpinAdapter(self, request: admin_pb2.UnpinAdapterRequest, grpc_context: Any = None) -> Any:
        return await self._admin("UnpinAdapter", request, grpc_context)

    async def ListAdapters(self, request: admin_pb2.ListAdaptersRequest, grpc_context: Any = None) -> Any:
        return await self._admin("ListAdapters", request, grpc_context)

    async def ServerInfo(self, request: admin_pb2.ServerInfoRequest, grpc_context: Any = None) -> Any:
        return await self._admin("ServerInfo", request, grpc_context)

    async def PromoteAdapter(self, request: admin_pb2.PromoteAdapterRequest, grpc_context: Any = None) -> Any:
        return await self._admin("PromoteAdapter", request, grpc_context)

    async def DemoteAdapter(self, request: admin_pb2.DemoteAdapterRequest, grpc_context: Any = None) -> Any:
        return await self._admin("DemoteAdapter", request, grpc_context)


class RemoteHandle:
    """A request running on a replica, with the interface the HTTP app uses of an engine's
    :class:`~loraswap.server.engine.request.RequestHandle` (``aevents``, ``events(timeout=0)``, ``cancel``).

    It may be created on any thread (the HTTP app submits from a worker thread); the first read, on the
    event loop, starts the task that sends the request and moves the replica's events into a queue.
    """

    def __init__(self, dispatcher: Dispatcher, request: GenerationRequest) -> None:
        self._queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self._done = False
        self._dispatcher, self._request = dispatcher, request
        self._task: asyncio.Task[None] | None = None
        self._cancelled = False

    def _start(self) -> None:
        """Send the request (once, unless cancelled first); called on the event loop."""
        if self._task is None and not self._cancelled:
            self._task = asyncio.get_running_loop().create_task(self._pump(self._dispatcher, self._request))

    async def _pump(self, dispatcher: Dispatcher, request: GenerationRequest) -> None:
        """Move the replica's events into the queue; however the stream ends, the reader is told."""
        finished = False
        try:
            async for event in dispatcher.stream(request):
                self._queue.put_nowait(event)
                finished = event.result is not None
            if not finished:
                self._queue.put_nowait(LoraswapError("the replica's stream ended without a result"))
        except asyncio.CancelledError:
            self._queue.put_nowait(CancelledError("the request was cancelled"))
            raise
        except Exception as exc:
            self._queue.put_nowait(exc)

    def _take(self, item: TokenEvent | BaseException) -> TokenEvent:
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.result is not None
        return item

    async def aevents(self) -> AsyncIterator[TokenEvent]:
        self._start()
        while not self._done:
            yield self._take(await self._queue.get())

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """The events already here; raises ``queue.Empty`` once there are none (only ``timeout=0``)."""
        if timeout != 0:
            raise ValueError("a remote request's events are read with aevents(); events() takes timeout=0")
        self._start()
        while not self._done:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                raise queue.Empty from None
            yield self._take(item)

    def cancel(self) -> None:
        """Stop the replica's stream; a reader still waiting on :meth:`aevents` gets the cancellation
        instead of waiting for events that will not come."""
        if self._cancelled or (self._task is not None and self._task.done()):
            return
        self._cancelled = True
        if self._task is not None:
            self._task.cancel()
        # Told here too: a pump cancelled before it ran (or never started) never reaches its handler. A
        # reader stops at the first error, so a second one from the pump is never read.
        self._queue.put_nowait(CancelledError("the request was cancelled"))


class RemoteEngine:
    """What the HTTP app (:func:`loraswap.server.http.app.create_app`) calls an engine, over the replicas.

    ``info()`` is the replicas' (read once, by :class:`InfoFirst`); ``list_adapters()`` is empty: residency
    is per replica, in each one's ``/metrics``, so ``/v1/models`` lists the base model only.
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.engine_info: EngineInfo | None = None

    def submit(self, request: GenerationRequest) -> RemoteHandle:
        return RemoteHandle(self.dispatcher, request)

    def info(self) -> EngineInfo:
        if self.engine_info is None:
            raise DrainingError("the engine replicas are not ready yet")
        return self.engine_info

    def list_adapters(self) -> list[AdapterStatus]:
        return []


class InfoFirst:
    """ASGI middleware: fetch the replicas' engine info once, before the first request reaches the app."""

    def __init__(self, app: Any, engine: RemoteEngine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.engine.engine_info is None:
            try:
                self.engine.engine_info = await self.engine.dispatcher.info()
            except Exception as exc:
                log.warning("the engine info is not available yet: %s", exc)
        await self.app(scope, receive, send)


def http_app(settings: ServeSettings, config: RayAppConfig) -> Any:
    """The OpenAI-compatible app over the replicas (built inside the ingress replica by Ray Serve)."""
    from ray import serve

    from loraswap.server.engine_slot import EngineSlot
    from loraswap.server.http.app import create_app
    from loraswap.server.metrics import Metrics

    app_name = serve.get_replica_context().app_name
    replicas = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=app_name)
    engine = RemoteEngine(Dispatcher(replicas, settings, config))
    slot = EngineSlot()
    slot.engine = engine
    # Ray's replica relays ``receive`` from the proxy, which may report a disconnect on its own terms:
    # a JSON answer is not cancelled on it (a stream still is, when sending to a gone client fails).
    app = create_app(slot, settings, Metrics(settings.metrics_adapters), watch_disconnects=False)
    return InfoFirst(app, engine)


def ingress_deployment(config: RayAppConfig, settings: ServeSettings) -> Any:
    """The Ray Serve deployment of :class:`InferenceIngress`, with the HTTP app as its ASGI ingress."""
    from ray import serve

    def build_http_app() -> Any:
        return http_app(settings, config)

    return serve.deployment(
        serve.ingress(build_http_app)(InferenceIngress),
        name=INGRESS_DEPLOYMENT,
        ray_actor_options={"num_cpus": 0},
    )

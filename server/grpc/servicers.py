"""The gRPC servicers: thin methods over the engine; protobuf handled by :mod:`loraswap.server.grpc.convert`.

Errors are raised as domain exceptions and mapped to status codes by
:class:`~loraswap.server.grpc.interceptors.ErrorInterceptor`. Each generation carries the call's deadline,
and the call's termination (client cancel, deadline, server stop) cancels its engine handle.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from loraswap.errors import InvalidArgumentError
from loraswap.server.engine_slot import EngineSlot, route_statuses, routed_to
from loraswap.server.grpc import convert
from loraswap.server.grpc.pb import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from loraswap.server.limits import InFlight
from loraswap.server.metrics import Metrics
from loraswap.server.settings import ServeSettings

NO_DEADLINE_S = 1e8  # time_remaining() of a call without a deadline is huge, not None


def call_deadline(context: grpc.ServicerContext) -> float | None:
    """The call's deadline as an absolute ``time.monotonic()`` (None when the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > NO_DEADLINE_S else time.monotonic() + remaining


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` that runs on the first call only (thread-safe)."""
    lock, done = threading.Lock(), []

    def call() -> None:
        with lock:
            if done:
                return
            done.append(True)
        fn()

    return call


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """Generations; each holds one unit of the server's :class:`InFlight` budget while it runs."""

    def __init__(
        self, slot: EngineSlot, settings: ServeSettings, metrics: Metrics, inflight: InFlight | None = None
    ) -> None:
        self.slot, self.settings, self.metrics = slot, settings, metrics
        self.inflight = inflight or InFlight(settings.max_concurrent_rpcs)

    def _submit(self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext) -> Any:
        """Submit the call's generation, holding a unit of the budget until the call ends for any reason
        (finished, failed, cancelled, past its deadline: gRPC runs the call's callbacks then, even for a
        stream whose handler generator is left suspended)."""
        self.inflight.acquire()
        release = _once(self.inflight.release)
        try:
            req = convert.request_from_pb(request, self.settings, deadline=call_deadline(context))
            handle = self.slot.get().submit(req)
        except BaseException:
            release()
            raise
        for callback in (release, handle.cancel):
            if not context.add_callback(callback):  # the call has already ended
                callback()
        return handle

    def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext) -> Any:
        result = self._submit(request, context).result()
        self.metrics.on_result(request.adapter, result)
        return convert.result_to_pb(result)

    def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        for event in self._submit(request, context).events():
            if event.result is not None:
                self.metrics.on_result(request.adapter, event.result)
            yield convert.event_to_pb(event)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, slot: EngineSlot, settings: ServeSettings) -> None:
        self.slot, self.settings = slot, settings

    def LoadAdapter(self, request: admin_pb2.LoadAdapterRequest, context: grpc.ServicerContext) -> Any:
        ref, tier = convert.adapter_ref_from_pb(request.adapter), convert.tier_from_pb(request.tier)
        return convert.status_to_pb(self.slot.get().load_adapter(ref, tier))

    def UnloadAdapter(self, request: admin_pb2.UnloadAdapterRequest, context: grpc.ServicerContext) -> Any:
        self.slot.get().unload_adapter(convert.adapter_ref_from_pb(request.adapter))
        return admin_pb2.UnloadAdapterResponse()

    def PinAdapter(self, request: admin_pb2.PinAdapterRequest, context: grpc.ServicerContext) -> Any:
        return convert.status_to_pb(self.slot.get().pin(convert.adapter_ref_from_pb(request.adapter)))

    def UnpinAdapter(self, request: admin_pb2.UnpinAdapterRequest, context: grpc.ServicerContext) -> Any:
        return convert.status_to_pb(self.slot.get().unpin(convert.adapter_ref_from_pb(request.adapter)))

    def ListAdapters(self, request: admin_pb2.ListAdaptersRequest, context: grpc.ServicerContext) -> Any:
        engine = self.slot.get()
        routed = routed_to(engine)
        adapters = [convert.status_to_pb(s, routed.get(s.digest, "")) for s in engine.list_adapters()]
        return admin_pb2.ListAdaptersResponse(adapters=adapters)

    def ServerInfo(self, request: admin_pb2.ServerInfoRequest, context: grpc.ServicerContext) -> Any:
        engine = self.slot.get()
        return convert.info_to_pb(engine.info(), self.settings, route_statuses(engine))

    def PromoteAdapter(self, request: admin_pb2.PromoteAdapterRequest, context: grpc.ServicerContext) -> Any:
        router = self._router()
        remaining = context.time_remaining()
        timeout = None if remaining is None or remaining > NO_DEADLINE_S else remaining
        route = router.promote(convert.adapter_ref_from_pb(request.adapter), timeout=timeout)
        return convert.route_to_pb(route.status(router.route_state(route)))

    def DemoteAdapter(self, request: admin_pb2.DemoteAdapterRequest, context: grpc.ServicerContext) -> Any:
        freed = self._router().demote(convert.adapter_ref_from_pb(request.adapter))
        return admin_pb2.DemoteAdapterResponse(freed_bytes=freed.total)

    def _router(self) -> Any:
        engine = self.slot.get()
        if not hasattr(engine, "promote"):
            raise InvalidArgumentError("this server has no route table")
        return engine

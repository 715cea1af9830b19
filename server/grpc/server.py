"""The gRPC server: servicers, health, reflection, interceptors, limits, TLS and graceful drain.

:class:`GrpcServer` listens before the base model is loaded (health says NOT_SERVING, calls get
UNAVAILABLE), serves once :meth:`GrpcServer.attach` hands it the engine, and drains on
:meth:`GrpcServer.shutdown`. :func:`serve` is the whole lifecycle, used by ``loraswap serve``.
"""

from __future__ import annotations

import logging
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from loraswap.server.auth import TokenAuth
from loraswap.server.engine_slot import EngineSlot
from loraswap.server.grpc.auth import AuthInterceptor
from loraswap.server.grpc.interceptors import ErrorInterceptor
from loraswap.server.grpc.pb import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from loraswap.server.grpc.reflection import enable_reflection
from loraswap.server.grpc.servicers import AdminServicer, InferenceServicer
from loraswap.server.limits import InFlight
from loraswap.server.metrics import Metrics
from loraswap.server.settings import ServeSettings

log = logging.getLogger(__name__)

_SERVICES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"],
    admin_pb2.DESCRIPTOR.services_by_name["Admin"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
)
INFERENCE_SERVICE, ADMIN_SERVICE = _SERVICES[0].full_name, _SERVICES[1].full_name
HEALTH_SERVICES = ("", INFERENCE_SERVICE, ADMIN_SERVICE)
RPC_METHODS = tuple(
    f"/{service.full_name}/{method.name}" for service in _SERVICES for method in service.methods
)
"""Every method the interceptor sees, each a ``method`` label of the RPC metrics (reflection passes by)."""
EXTRA_WORKERS = 4  # threads beyond the RPC limit, so that the limit, not the pool, refuses calls
ADMIN_HEADROOM = 8  # calls beyond the generation budget: admin and health answer when generations are full
STOP_GRACE_S = 5.0  # once the engine has drained: the longest wait for the last responses to go out
ENGINE_FAILED_EXIT = 3  # the exit status of a server whose engine stopped (its supervisor restarts it)


def server_credentials(settings: ServeSettings) -> grpc.ServerCredentials:
    """TLS credentials; with ``tls_client_ca`` the client must present a certificate it signed."""
    ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    pair = (Path(settings.tls_key or "").read_bytes(), Path(settings.tls_cert or "").read_bytes())
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


class GrpcServer:
    """One gRPC server over one engine."""

    def __init__(self, settings: ServeSettings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        metrics.track_methods(RPC_METHODS)
        self.slot = EngineSlot()
        self.inflight = InFlight(settings.max_concurrent_rpcs)  # shared with the HTTP edge
        self.health = health.HealthServicer(experimental_non_blocking=True)
        auth = TokenAuth(settings.inference_tokens, settings.admin_tokens)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=settings.max_concurrent_rpcs + ADMIN_HEADROOM + EXTRA_WORKERS
            ),
            interceptors=[ErrorInterceptor(metrics.on_call), AuthInterceptor(auth)],
            options=[
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs + ADMIN_HEADROOM,
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceServicer(self.slot, settings, metrics, self.inflight), self.server
        )
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.slot, settings), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection([service.full_name for service in _SERVICES], self.server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status: int) -> None:
        for name in HEALTH_SERVICES:
            self.health.set(name, status)

    def start(self) -> int:
        """Listen (TLS when configured) and return the bound port."""
        address = f"{self.settings.host}:{self.settings.port}"
        if self.settings.tls_cert:
            port = self.server.add_secure_port(address, server_credentials(self.settings))
        else:
            port = self.server.add_insecure_port(address)
        self.server.start()
        return port

    def attach(self, engine: Any) -> None:
        """Serve ``engine`` from now on; health turns SERVING."""
        self.slot.engine = engine
        self.metrics.attach_engine(getattr(engine, "base", engine))  # a route table: its shared engine
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def set_failed(self) -> None:
        """The engine stopped for good: health says NOT_SERVING at once (before the process exits)."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def shutdown(self, grace: float) -> None:
        """Drain: health NOT_SERVING at once, the engine refuses new work and finishes in-flight requests
        (up to ``grace`` seconds), then the server stops."""
        self.health.enter_graceful_shutdown()
        engine = self.slot.engine
        if engine is not None:
            engine.stop(drain_timeout=grace)
        self.server.stop(grace=min(grace, STOP_GRACE_S)).wait()


def serve(settings: ServeSettings, stop: threading.Event) -> int:
    """Run a server until ``stop`` is set, then drain. Returns the process exit status."""
    from loraswap.device import serial_torch_thread
    from loraswap.server.engine import Engine
    from loraswap.server.routes.router import Router

    serial_torch_thread()  # this thread loads the model; the engine's step thread is the one OpenMP team
    check_registry_config(settings.engine.registry)
    status = 0
    metrics = Metrics(settings.metrics_adapters)
    server = GrpcServer(settings, metrics)
    port = server.start()
    http, http_port = None, None
    if settings.http_port is not None:
        from loraswap.server.http.server import HttpServer

        http = HttpServer(settings, metrics, server.slot, server.inflight)
        http_port = http.start()
    metrics_port = None
    if settings.metrics_port >= 0:
        metrics_port = metrics.serve_http(settings.metrics_host, settings.metrics_port)
    ports = f"metrics: {metrics_port}, http: {http_port}"
    _say(f"listening on {settings.host}:{port} ({ports}); loading {settings.engine.base}")
    try:
        engine = Engine(settings.engine, observer=metrics)
        _say(engine.loaded.precision.describe())
        engine.start()
        router = Router(
            engine,
            route_max_batch_size=settings.route_max_batch_size,
            route_memory_bytes=settings.route_memory_bytes,
            drain_seconds=settings.grace_seconds,
            observer=metrics,
        )
        server.slot.engine = router  # shut down with the rest if a route cannot be served
        router.add_configured(settings.route_specs())
        for status in router.route_statuses():
            held = status.weights_bytes + status.kv_cache_bytes
            _say(f"route {status.adapter} -> {status.model} ({held} bytes)")
        metrics.attach_router(router)
        server.attach(router)
        _say(f"serving on {settings.host}:{port} (http: {http_port})")
        # Wake up often: a signal delivered to another thread (gRPC, engine) only runs its Python handler
        # once the main thread executes bytecode again, which a plain stop.wait() would never do.
        while not stop.wait(timeout=0.1):
            if not router.healthy():
                server.set_failed()
                _say(f"the engine stopped: {router.failure or 'its step thread is gone'}; exiting")
                status = ENGINE_FAILED_EXIT
                break
        else:
            _say(f"draining (grace {settings.grace_seconds:g}s)")
    finally:
        server.shutdown(settings.grace_seconds)  # HTTP requests get 503 from here; in-flight ones finish
        if http is not None:
            http.stop()
        metrics.stop_http()
    _say("stopped")
    return status


def check_registry_config(url: str | None) -> None:
    """Refuse to start on a registry this installation cannot use (an unsupported URL, ``s3://`` without
    boto3, an unknown ``AWS_PROFILE``): :func:`~loraswap.registry.store.check_store_url`, no I/O. A
    registry that is down is not refused: adapters fail UNAVAILABLE until it is back."""
    import os

    from loraswap.registry.registry import REGISTRY_ENV
    from loraswap.registry.store import check_store_url

    target = url or os.environ.get(REGISTRY_ENV)
    if target:
        check_store_url(target)


def _say(message: str) -> None:
    print(f"loraswap serve: {message}", file=sys.stderr, flush=True)

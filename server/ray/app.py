"""The Ray Serve application builder: ``serve run loraswap.server.ray.app:build_app config=serve.yaml``, or
``import_path: loraswap.server.ray.app:build_app`` in a ``serveConfigV2`` (deploy/ray/rayservice.yaml).

Ray Serve's gRPC proxy must be started with ``grpc_servicer_functions`` = :data:`GRPC_SERVICER_FUNCTIONS`
(``grpc_options`` in the Serve config, or :func:`grpc_options` with ``serve.start``): they serve the
Inference and Admin services and forward each call's deadline to the ingress.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loraswap.server.ray.config import GRPC_SERVICER_FUNCTIONS, RayAppConfig, read_args
from loraswap.server.ray.deployment import replica_deployment
from loraswap.server.ray.ingress import ingress_deployment
from loraswap.server.settings import ServeSettings


def build(config: RayAppConfig, settings: ServeSettings) -> Any:
    """The application: the ingress bound to the engine replicas."""
    replicas = replica_deployment(config, settings).bind(settings)
    return ingress_deployment(config, settings).bind(replicas, settings, config)


def build_app(args: Mapping[str, Any]) -> Any:
    """Ray Serve's application builder (``args``: see :func:`loraswap.server.ray.config.read_args`)."""
    config, settings = read_args(args)
    return build(config, settings)


def grpc_options(port: int, request_timeout_s: float | None = None) -> Any:
    """Ray Serve's ``gRPCOptions`` serving ``loraswap.v1.Inference`` and ``loraswap.v1.Admin`` on ``port``."""
    from ray.serve.config import gRPCOptions

    return gRPCOptions(
        port=port, grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS), request_timeout_s=request_timeout_s
    )

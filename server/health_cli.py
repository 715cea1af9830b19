"""``loraswap health``: ask a server's standard gRPC health service (``grpc.health.v1.Health/Check``).

Exit status 0 when the service is SERVING, 1 otherwise (NOT_SERVING while the base loads and from the
moment a drain starts, an unknown service name, an unreachable server), with one line on the terminal.
Used by the container images' HEALTHCHECK; Kubernetes probes the same service natively.
"""

from __future__ import annotations

import argparse
import os

from loraswap.errors import LoraswapError

DEFAULT_ADDRESS = "127.0.0.1:50051"
ADDRESS_ENV = "LORASWAP_HEALTH_ADDRESS"
DEFAULT_TIMEOUT_S = 5.0


class HealthCheckError(LoraswapError):
    """The health check could not be answered (server unreachable, deadline passed, unknown service)."""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    health = subparsers.add_parser(
        "health",
        help="check a running server's gRPC health service (exit 0 SERVING, 1 otherwise)",
        description="Call grpc.health.v1.Health/Check on ADDRESS; exit 0 when SERVING, 1 otherwise.",
    )
    health.add_argument(
        "address",
        nargs="?",
        default=None,
        help=f"server host:port (env {ADDRESS_ENV}, then LORASWAP_TARGET; default {DEFAULT_ADDRESS})",
    )
    health.add_argument(
        "--service",
        default="",
        help="service name to check, e.g. loraswap.v1.Inference (default: the whole server)",
    )
    health.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="deadline of the check, seconds"
    )
    health.add_argument("--token", default=None, help="bearer token (env LORASWAP_TOKEN; health needs none)")
    health.add_argument("--tls", action="store_true", help="connect with TLS")
    health.add_argument("--ca", default=None, help="PEM CA bundle of the server certificate (implies --tls)")
    health.add_argument("--cert", default=None, help="PEM client certificate (mutual TLS)")
    health.add_argument("--key", default=None, help="PEM key of --cert")
    health.set_defaults(func=_health)


def resolve_address(given: str | None) -> str:
    """The address to check: the argument, else $LORASWAP_HEALTH_ADDRESS, $LORASWAP_TARGET, the default."""
    return given or os.environ.get(ADDRESS_ENV) or os.environ.get("LORASWAP_TARGET") or DEFAULT_ADDRESS


def check(
    address: str,
    service: str = "",
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    token: str | None = None,
    tls: bool = False,
    root_certificates: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> str:
    """The status name (``SERVING``, ``NOT_SERVING``, ...) of ``service`` on ``address``.

    Raises:
        HealthCheckError: the call failed (its status code and details, on one line).
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loraswap.server.grpc.client import Client

    with Client(
        address,
        token=token,
        tls=tls,
        root_certificates=root_certificates,
        client_cert=client_cert,
        client_key=client_key,
        timeout=timeout,
    ) as client:
        stub = health_pb2_grpc.HealthStub(client.channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=client.metadata
            )
        except grpc.RpcError as exc:
            details = " ".join((exc.details() or "").split())
            what = f"service {service!r} on {address}" if service else address
            raise HealthCheckError(f"health check of {what} failed: {exc.code().name}: {details}") from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _health(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    status = check(
        address,
        args.service,
        timeout=args.timeout,
        token=args.token if args.token is not None else os.environ.get("LORASWAP_TOKEN"),
        tls=args.tls,
        root_certificates=args.ca,
        client_cert=args.cert,
        client_key=args.key,
    )
    suffix = f" ({args.service})" if args.service else ""
    print(f"{address}{suffix}: {status}")
    return 0 if status == "SERVING" else 1

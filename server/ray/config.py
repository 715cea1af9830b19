"""How the Ray Serve application is laid out: replicas, their resources, autoscaling, multiplexing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraswap.config_layers import field_types, from_layers
from loraswap.errors import InvalidArgumentError
from loraswap.server.settings import ServeSettings, load_settings

APP_NAME = "loraswap"
GRPC_SERVICER_FUNCTIONS = (
    "loraswap.server.ray.grpc_proxy.add_InferenceServicer_to_server",
    "loraswap.server.ray.grpc_proxy.add_AdminServicer_to_server",
)
"""What Ray Serve's gRPC proxy needs to serve ``loraswap.v1.Inference`` and ``loraswap.v1.Admin``, with
deadlines forwarded to the ingress (``grpc_options``)."""


@dataclass
class RayAppConfig:
    """The application's shape; each field is also a key of the builder's ``args``.

    Attributes:
        min_replicas: Engine replicas kept running at the least (autoscaling lower bound).
        max_replicas: Engine replicas at the most (autoscaling upper bound).
        initial_replicas: Replicas started with the application (None = ``min_replicas``).
        target_ongoing_requests: Autoscaling target of requests in flight per replica (Ray Serve's
            ``target_ongoing_requests``): replicas are added above it and removed below it.
        max_ongoing_requests: Requests a replica takes at once; past it the router sends a request
            elsewhere or queues it (set it near the engine's ``max_batch_size``).
        replica_cpus: CPUs Ray reserves per engine replica.
        replica_gpus: GPUs Ray reserves per engine replica (1 on GPU workers, 0 on CPU).
        max_adapters_per_replica: Adapters a replica holds as multiplexed models (Ray's LRU over them
            unloads the engine's copy); None = the engine's ``adapter_slots``, so what Ray routes by is
            what sits in device slots.
        replica_retries: Times the ingress re-sends a request whose replica died before answering (a
            stream only before its first token); past them the caller gets UNAVAILABLE and may retry.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 16.0
    max_ongoing_requests: int = 32
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    max_adapters_per_replica: int | None = None
    replica_retries: int = 2

    def problems(self) -> list[str]:
        """Every invalid field, as readable messages (empty when valid)."""
        out = []
        if not 1 <= self.min_replicas <= self.max_replicas:
            out.append(
                f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}"
            )
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            out.append(f"initial_replicas must be in [min_replicas, max_replicas], got {initial}")
        if self.target_ongoing_requests <= 0 or self.max_ongoing_requests < 1:
            out.append("target_ongoing_requests must be > 0 and max_ongoing_requests >= 1")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            out.append("replica_cpus and replica_gpus must be >= 0")
        if self.max_adapters_per_replica is not None and self.max_adapters_per_replica < 1:
            out.append(f"max_adapters_per_replica must be >= 1, got {self.max_adapters_per_replica}")
        if self.replica_retries < 0:
            out.append(f"replica_retries must be >= 0, got {self.replica_retries}")
        return out

    def autoscaling(self) -> dict[str, Any]:
        """Ray Serve's ``autoscaling_config`` for the replica deployment."""
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": self.initial_replicas or self.min_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }


FIELDS = field_types(RayAppConfig)
"""Field name → type (checked here, at import: :mod:`loraswap.config_layers` reads every one)."""


def read_args(args: Mapping[str, Any]) -> tuple[RayAppConfig, ServeSettings]:
    """The builder's ``args``: :class:`RayAppConfig` fields, ``config`` (a ``loraswap serve`` YAML file)
    and ``settings`` (serve and engine fields, over the YAML and the ``LORASWAP_*`` environment). Values
    are coerced to the fields' types as a flag's would be (:mod:`loraswap.config_layers`).

    The bearer tokens are serve settings as on a single server: ``LORASWAP_INFERENCE_TOKENS`` and
    ``LORASWAP_ADMIN_TOKENS`` (comma-separated) in the environment of the process that builds the
    application (on KubeRay, every pod's, from a Secret), or ``config``; not ``settings``, whose values
    are stored in plain text in the Serve config. Without tokens, every call is accepted.

    Raises:
        InvalidArgumentError: listing every unknown or invalid value.
    """
    app_args = {k: v for k, v in args.items() if k not in ("config", "settings")}
    config, problems = from_layers(RayAppConfig, app_args)
    problems += config.problems()
    if problems:
        raise InvalidArgumentError("invalid Ray Serve arguments", problems)
    settings = dict(args.get("settings") or {})
    return config, load_settings(flags=settings, config_file=args.get("config"))

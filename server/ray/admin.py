"""The Admin service on Ray Serve: the single server's servicer over the engine replicas.

The ingress runs :class:`~loraswap.server.grpc.servicers.AdminServicer` (in a worker thread) over a
:class:`ReplicaAdmin`, which answers the servicer's engine calls by acting on the replicas where each one
matters. The reference is resolved once, here, so that every replica acts on the same version:

* ``LoadAdapter`` to ``device`` or ``host``: on the replica Ray routes that digest to (the one holding it,
  else the one holding the fewest adapters), which makes it a multiplexed model there, so that traffic for
  it goes there; to ``disk``: a pull on every replica.
* ``UnloadAdapter``, ``PinAdapter``, ``UnpinAdapter``: on every replica (a pinned adapter is a multiplexed
  model of every replica, resident on each). Replicas started later do not have the pins.
* ``ListAdapters``: every replica's view merged per digest (tiers and pins where any replica has them,
  hits summed, the latest use); ``ServerInfo``: one replica's engine.
* ``PromoteAdapter`` / ``DemoteAdapter``: FAILED_PRECONDITION; routes to merged models are not served on
  Ray (serve a merged model as an application of its own).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from loraswap.errors import FailedPreconditionError, NotFoundError
from loraswap.server.engine.api import AdapterStatus, EngineInfo, Tier
from loraswap.server.ray.calls import time_left
from loraswap.server.ray.failures import domain_error

TIERS: tuple[Tier, ...] = typing.get_args(Tier)  # fastest first
NO_ROUTES = (
    "routes to merged models are not served on Ray Serve; serve the merged model (loraswap merge) as an "
    "application of its own"
)


class ReplicaAdmin:
    """What the Admin servicer calls an engine, over the replicas; blocking (a worker thread's calls).

    Args:
        replicas: Ray Serve's handle of the engine replica deployment.
        resolve: Adapter reference → (name, digest), as the ingress resolves requests' references.
        deadline: The call's deadline (``time.monotonic()``), bounding each wait on the replicas.
    """

    def __init__(
        self, replicas: Any, resolve: Callable[[str], tuple[str, str]], deadline: float | None
    ) -> None:
        self.replicas, self.resolve, self.deadline = replicas, resolve, deadline

    def load_adapter(self, ref: str, tier: Tier = "device") -> AdapterStatus:
        ref = self._version(ref)
        if tier == "disk":
            return _one(merge_statuses([self._everywhere("admin_load", ref, tier)]))
        handle = self.replicas.options(multiplexed_model_id=ref.partition("@")[2])
        return self._wait(handle.admin_load.remote(ref, tier))

    def unload_adapter(self, ref: str) -> None:
        self._everywhere("admin_unload", self._version(ref))

    def pin(self, ref: str) -> AdapterStatus:
        return _one(merge_statuses([self._everywhere("admin_pin", self._version(ref))]))

    def unpin(self, ref: str) -> AdapterStatus:
        return _one(merge_statuses([self._everywhere("admin_unpin", self._version(ref))]))

    def list_adapters(self) -> list[AdapterStatus]:
        return merge_statuses(self._everywhere("list_adapters"))

    def info(self) -> EngineInfo:
        return self._wait(self.replicas.options(stream=False).info.remote())

    def promote(self, ref: str, timeout: float | None = None) -> Any:
        raise FailedPreconditionError(f"cannot promote {ref}: {NO_ROUTES}")

    def demote(self, ref: str) -> Any:
        raise FailedPreconditionError(f"cannot demote {ref}: {NO_ROUTES}")

    # -- plumbing -------------------------------------------------------------------------------------

    def _version(self, ref: str) -> str:
        """``ref`` as ``name@digest`` (NotFoundError for an unknown adapter, tag or version)."""
        name, digest = self.resolve(ref)
        return f"{name}@{digest}"

    def _wait(self, response: Any) -> Any:
        """The replica's answer, waited for until the deadline (errors: :func:`domain_error`)."""
        try:
            return response.result(timeout_s=time_left(self.deadline))
        except Exception as exc:
            raise domain_error(exc) from exc

    def _everywhere(self, method: str, *args: Any) -> list[Any]:
        """``method`` on every running replica: the answers of those that know the adapter. An error
        other than "not found here" is raised; NotFoundError only when no replica knows it."""
        try:
            broadcast = self.replicas.broadcast(method, *args)
            answers = broadcast.results(timeout_s=time_left(self.deadline), return_exceptions=True)
        except Exception as exc:
            raise domain_error(exc) from exc
        errors = [domain_error(a) for a in answers if isinstance(a, BaseException)]
        if failed := next((e for e in errors if not isinstance(e, NotFoundError)), None):
            raise failed
        if errors and len(errors) == len(answers):
            raise errors[0]
        return [a for a in answers if not isinstance(a, BaseException)]


def merge_statuses(views: Iterable[Iterable[AdapterStatus]]) -> list[AdapterStatus]:
    """Replicas' adapter listings as one, per digest, least recently used first (the engine's order)."""
    merged: dict[str, AdapterStatus] = {}
    for view in views:
        for status in view:
            seen = merged.get(status.digest)
            merged[status.digest] = status if seen is None else _merged(seen, status)
    return sorted(merged.values(), key=lambda s: s.last_used)


def _merged(a: AdapterStatus, b: AdapterStatus) -> AdapterStatus:
    return replace(
        a,
        tiers=tuple(t for t in TIERS if t in a.tiers or t in b.tiers),
        pinned=a.pinned or b.pinned,
        hits=a.hits + b.hits,
        last_used=max(a.last_used, b.last_used),
    )


def _one(statuses: list[AdapterStatus]) -> AdapterStatus:
    (status,) = statuses
    return status

"""A gRPC call as the ingress sees it behind Ray Serve's gRPC proxy: who may make it, and until when.

Ray hands each ingress method a copy of the proxy's call context (``grpc_context``): the caller's
metadata, with the time the call has left added by :mod:`~loraswap.server.ray.grpc_proxy`. :func:`admit`
checks the bearer token with the single server's rule (:class:`~loraswap.server.grpc.auth.TokenAuth`)
and turns the time left into a deadline on this process's clock.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from loraswap.errors import DeadlineExceededError, InvalidArgumentError
from loraswap.server.auth import TokenAuth
from loraswap.server.ray.grpc_proxy import TIME_REMAINING_KEY

INFERENCE_SERVICE = "loraswap.v1.Inference"
ADMIN_SERVICE = "loraswap.v1.Admin"


@dataclass(frozen=True)
class Call:
    """One admitted call.

    Attributes:
        method: ``/package.Service/Method``.
        deadline: ``time.monotonic()`` of this process when the call ends; None when the caller set none.
    """

    method: str
    deadline: float | None

    def time_remaining(self) -> float | None:
        """Seconds left (None without a deadline), as ``grpc.ServicerContext.time_remaining``."""
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)


def admit(auth: TokenAuth, service: str, name: str, grpc_context: Any) -> Call:
    """The call to ``service``'s method ``name``, once its token allows it (none needed without tokens;
    a call without a context, from a handle inside the cluster, carries no token).

    Raises:
        UnauthenticatedError: no token, or an unknown one.
        PermissionDeniedError: an inference token on ``Admin``.
    """
    metadata = list(grpc_context.invocation_metadata()) if grpc_context is not None else []
    method = f"/{service}/{name}"
    auth.check(method, metadata)
    return Call(method, _deadline(metadata))


def _deadline(metadata: Iterable[tuple[str, Any]]) -> float | None:
    for key, value in metadata:
        if key == TIME_REMAINING_KEY:
            try:
                return time.monotonic() + float(value)
            except ValueError:
                raise InvalidArgumentError(f"unreadable {TIME_REMAINING_KEY} metadata {value!r}") from None
    return None


def time_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (None: no deadline), for a call sent on to another process.

    Raises:
        DeadlineExceededError: the deadline has passed.
    """
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceededError("the request's deadline passed")
    return left

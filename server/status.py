"""The one table from domain errors to what each edge answers: the gRPC status code, and the HTTP status
with its OpenAI error ``type`` and ``code``.

Rows are most specific first: an error takes the first row whose class it is an instance of (a subclass's
row stands before its base's). :mod:`loraswap.server.grpc.status` reads the gRPC column (and turns codes
back into error classes for the client), :mod:`loraswap.server.http.app` the HTTP columns. Pure Python:
no gRPC or HTTP import.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraswap import errors


@dataclass(frozen=True)
class Status:
    """What the edges answer for one class of domain error.

    Attributes:
        error: The domain error class (its subclasses too, unless a row of their own comes first).
        grpc: The name of the ``grpc.StatusCode``.
        http: The HTTP status.
        kind: The OpenAI error object's ``type``.
        code: The OpenAI error object's ``code`` (None: none).
    """

    error: type[Exception]
    grpc: str
    http: int
    kind: str
    code: str | None = None


_UNAVAILABLE = "service_unavailable"

STATUSES: tuple[Status, ...] = (
    Status(errors.UnauthenticatedError, "UNAUTHENTICATED", 401, "authentication_error", "invalid_api_key"),
    Status(errors.PermissionDeniedError, "PERMISSION_DENIED", 403, "permission_error"),
    Status(errors.NotFoundError, "NOT_FOUND", 404, "not_found_error", "model_not_found"),
    Status(errors.InvalidArgumentError, "INVALID_ARGUMENT", 400, "invalid_request_error"),
    Status(errors.IncompatibleAdapterError, "FAILED_PRECONDITION", 422, "invalid_request_error"),
    Status(errors.MissingDependencyError, "FAILED_PRECONDITION", 503, _UNAVAILABLE, "missing_dependency"),
    Status(errors.FailedPreconditionError, "FAILED_PRECONDITION", 503, _UNAVAILABLE),
    Status(errors.OverloadedError, "RESOURCE_EXHAUSTED", 429, "rate_limit_error", "overloaded"),
    Status(errors.DrainingError, "UNAVAILABLE", 503, _UNAVAILABLE, "draining"),
    Status(errors.RegistryUnavailableError, "UNAVAILABLE", 503, _UNAVAILABLE, "registry_unavailable"),
    Status(errors.UnavailableError, "UNAVAILABLE", 503, _UNAVAILABLE),
    Status(errors.ConflictError, "ABORTED", 500, "server_error"),
    Status(errors.IntegrityError, "DATA_LOSS", 500, "server_error"),
    Status(errors.CancelledError, "CANCELLED", 500, "server_error"),
    Status(errors.DeadlineExceededError, "DEADLINE_EXCEEDED", 504, "timeout"),
)

INTERNAL_MESSAGE = "internal error"
"""What a caller is told of an error outside the table: its own text may carry internals and is only
logged."""


def status_of(exc: BaseException) -> Status | None:
    """The row for ``exc`` (the first whose class it is an instance of); None outside the table."""
    return next((row for row in STATUSES if isinstance(exc, row.error)), None)

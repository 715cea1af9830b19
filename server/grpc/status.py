"""The one table between domain errors and gRPC status codes, read by both ends of a call.

The server's :class:`~loraswap.server.grpc.interceptors.ErrorInterceptor` turns a raised error into its
code with :func:`status_for`; the client (:mod:`loraswap.server.grpc.client`) turns a code back into the
error class with :func:`error_class_for`. Each code appears once, so the two directions are inverse,
with two documented exceptions:

* Subclasses travel as their table ancestor: :class:`~loraswap.errors.AdapterValidationError` is sent
  as INVALID_ARGUMENT and comes back as :class:`~loraswap.errors.InvalidArgumentError`;
  :class:`~loraswap.errors.IncompatibleAdapterError` comes back as
  :class:`~loraswap.errors.FailedPreconditionError`.
* UNAVAILABLE is sent for :class:`~loraswap.errors.UnavailableError` (a draining server, an unreachable
  registry) but the client does not turn it back into one: gRPC itself reports UNAVAILABLE when no
  server answers (connection refused, TLS mismatch),
  so a client cannot tell a draining server from an absent one (:data:`SERVER_ONLY_CODES`).
"""

from __future__ import annotations

import grpc

from loraswap import errors
from loraswap.server.grpc.auth import PermissionDeniedError, UnauthenticatedError

# Most specific first: the first class an exception is an instance of wins.
STATUS_TABLE: tuple[tuple[type[errors.LoraswapError], grpc.StatusCode], ...] = (
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.ConflictError, grpc.StatusCode.ABORTED),
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (errors.CancelledError, grpc.StatusCode.CANCELLED),
    (errors.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
)
SERVER_ONLY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
"""Codes the server sends for a table entry but the client leaves as a generic error (see above)."""

INTERNAL_MESSAGE = "internal error"
"""Details of an INTERNAL status: the exception's own text may carry internals and is only logged."""

_ERROR_BY_CODE = {code: cls for cls, code in STATUS_TABLE if code not in SERVER_ONLY_CODES}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details a caller sees for ``exc`` (INTERNAL for anything not in the table)."""
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def error_class_for(code: grpc.StatusCode) -> type[errors.LoraswapError] | None:
    """The domain error class a client raises for ``code``; None for codes without one."""
    return _ERROR_BY_CODE.get(code)

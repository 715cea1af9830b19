"""Domain errors ↔ gRPC status codes, read by both ends of a call: the gRPC column of the one table
(:mod:`loraswap.server.status`).

The server's :class:`~loraswap.server.grpc.interceptors.ErrorInterceptor` turns a raised error into its
code with :func:`status_for`; the client (:mod:`loraswap.server.grpc.client`) turns a code back into the
error class with :func:`error_class_for`. The two directions are inverse, with two documented exceptions
(where several rows share a code, the client raises their common base):

* Subclasses travel as their table ancestor: :class:`~loraswap.errors.AdapterValidationError` is sent
  as INVALID_ARGUMENT and comes back as :class:`~loraswap.errors.InvalidArgumentError`;
  :class:`~loraswap.errors.IncompatibleAdapterError` comes back as
  :class:`~loraswap.errors.FailedPreconditionError`.
* UNAVAILABLE is sent for :class:`~loraswap.errors.UnavailableError` (a draining server, an unreachable
  registry) but the client does not turn it back into one: gRPC itself reports UNAVAILABLE when no
  server answers (connection refused, TLS mismatch), so a client cannot tell a draining server from an
  absent one (:data:`SERVER_ONLY_CODES`).
"""

from __future__ import annotations

import grpc

from loraswap import errors
from loraswap.server.status import INTERNAL_MESSAGE, STATUSES

__all__ = ["INTERNAL_MESSAGE", "SERVER_ONLY_CODES", "STATUS_TABLE", "error_class_for", "status_for"]

STATUS_TABLE: tuple[tuple[type[Exception], grpc.StatusCode], ...] = tuple(
    (row.error, grpc.StatusCode[row.grpc]) for row in STATUSES
)
"""The gRPC column of :data:`loraswap.server.status.STATUSES`, most specific first."""
SERVER_ONLY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
"""Codes the server sends for a table entry but the client leaves as a generic error (see above)."""


def _most_general(code: grpc.StatusCode) -> type[Exception]:
    """The class the client raises for ``code``: the one every other row with ``code`` derives from."""
    classes = [cls for cls, c in STATUS_TABLE if c == code]
    return next(cls for cls in classes if all(issubclass(other, cls) for other in classes))


_ERROR_BY_CODE = {code: _most_general(code) for _, code in STATUS_TABLE if code not in SERVER_ONLY_CODES}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details a caller sees for ``exc`` (INTERNAL for anything not in the table)."""
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def error_class_for(code: grpc.StatusCode) -> type[errors.LoraswapError] | None:
    """The domain error class a client raises for ``code``; None for codes without one."""
    return _ERROR_BY_CODE.get(code)

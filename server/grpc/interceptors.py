"""The one place that turns exceptions into gRPC status codes, and counts every call's outcome.

Servicers raise domain errors (:mod:`loraswap.errors`) and never call ``context.abort``; this
interceptor aborts with the code from :data:`STATUS_BY_ERROR`. Anything else is logged and becomes
INTERNAL with a generic message, so that no internals leak to callers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from loraswap import errors
from loraswap.server.grpc.auth import PermissionDeniedError, UnauthenticatedError

log = logging.getLogger(__name__)

# Most specific first: the first class an exception is an instance of wins.
STATUS_BY_ERROR: tuple[tuple[type[errors.LoraswapError], grpc.StatusCode], ...] = (
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),  # AdapterValidationError too
    (errors.IncompatibleAdapterError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DrainingError, grpc.StatusCode.UNAVAILABLE),
    (errors.ConflictError, grpc.StatusCode.ABORTED),
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (errors.CancelledError, grpc.StatusCode.CANCELLED),
    (errors.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
)
INTERNAL_MESSAGE = "internal error"

CallObserver = Callable[[str, grpc.StatusCode, float], None]
"""``(method, code, seconds)`` called once per finished call (for the requests metric)."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details a caller sees for ``exc``."""
    for cls, code in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def _final_code(context: grpc.ServicerContext, code: grpc.StatusCode) -> grpc.StatusCode:
    """What the caller got: a call whose client went away ended by deadline or cancellation."""
    if context.is_active():
        return code
    return grpc.StatusCode.DEADLINE_EXCEEDED if context.time_remaining() <= 0 else grpc.StatusCode.CANCELLED


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions of unary-request handlers to status codes and reports each call's outcome."""

    def __init__(self, on_call: CallObserver | None = None) -> None:
        self.on_call = on_call or (lambda method, code, seconds: None)

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client-streaming calls (reflection) pass through untouched

    def _abort(self, context: grpc.ServicerContext, method: str, exc: Exception) -> None:
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("unexpected error in %s", method)
        context.abort(code, message)

    def _unary(self, method: str, behaviour: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                return behaviour(request, context)
            except Exception as exc:
                code = status_for(exc)[0]
                self._abort(context, method, exc)
            finally:
                self.on_call(method, _final_code(context, code), time.perf_counter() - start)

        return wrapped

    def _stream(
        self, method: str, behaviour: Callable[[Any, Any], Iterator[Any]]
    ) -> Callable[[Any, Any], Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                yield from behaviour(request, context)
            except Exception as exc:
                code = status_for(exc)[0]
                self._abort(context, method, exc)
            finally:
                self.on_call(method, _final_code(context, code), time.perf_counter() - start)

        return wrapped

"""The one place that turns exceptions into gRPC status codes, and counts every call's outcome.

Servicers raise domain errors (:mod:`loraswap.errors`) and never call ``context.abort``; this
interceptor aborts with the code from :func:`~loraswap.server.grpc.status.status_for`. Anything else is
logged and becomes INTERNAL with a generic message, so that no internals leak to callers. Handlers that
are not ours (the health service) may set a code on the context instead, or abort themselves; such a
call keeps that code, and is counted with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from loraswap.server.grpc.status import status_for

log = logging.getLogger(__name__)

CallObserver = Callable[[str, grpc.StatusCode, float], None]
"""``(method, code, seconds)`` called once per finished call (for the requests and latency metrics)."""


def _set_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The code set on the context so far (by ``set_code`` or ``abort``), unless none or OK."""
    code = context.code()
    return None if code is None or code == grpc.StatusCode.OK else code


def _final_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """What the caller got: a call whose client went away ended by deadline or cancellation; any other
    ended with the code set on its context (by the handler, or by :meth:`ErrorInterceptor._abort`)."""
    if context.is_active():
        return _set_code(context) or grpc.StatusCode.OK
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
        """End the call for ``exc`` (``context.abort`` raises). An error outside the table is INTERNAL,
        unless the handler had set a code itself (``context.abort`` does): then that code and its
        details stand."""
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL and (own := _set_code(context)) is not None:
            details = context.details()
            code, message = own, details.decode() if isinstance(details, bytes) else details or ""
        elif code == grpc.StatusCode.INTERNAL:
            log.exception("unexpected error in %s", method)
        context.abort(code, message)

    def _unary(self, method: str, behaviour: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                return behaviour(request, context)
            except Exception as exc:
                self._abort(context, method, exc)
            finally:
                self.on_call(method, _final_code(context), time.perf_counter() - start)

        return wrapped

    def _stream(
        self, method: str, behaviour: Callable[[Any, Any], Iterator[Any]]
    ) -> Callable[[Any, Any], Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            try:
                yield from behaviour(request, context)
            except Exception as exc:
                self._abort(context, method, exc)
            finally:
                self.on_call(method, _final_code(context), time.perf_counter() - start)

        return wrapped

"""The gRPC side of bearer tokens: an interceptor that runs :class:`~loraswap.server.auth.TokenAuth` before
each call (the rule itself lives in :mod:`loraswap.server.auth`, shared with the HTTP edge)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from loraswap.errors import LoraswapError
from loraswap.server.auth import TokenAuth


class AuthInterceptor(grpc.ServerInterceptor):
    """Runs :class:`TokenAuth` before each call; a refused call gets a handler that raises the error."""

    def __init__(self, auth: TokenAuth) -> None:
        self.auth = auth

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        try:
            self.auth.check(details.method, details.invocation_metadata)
        except LoraswapError as exc:
            return _refusing(handler, exc) if handler is not None else None
        return handler


def _refusing(handler: grpc.RpcMethodHandler, exc: LoraswapError) -> grpc.RpcMethodHandler:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        raise exc

    def refuse_stream(request: Any, context: grpc.ServicerContext) -> Any:
        raise exc
        yield  # a generator, like the handler it replaces

    kinds = {
        "unary_unary": (grpc.unary_unary_rpc_method_handler, refuse),
        "unary_stream": (grpc.unary_stream_rpc_method_handler, refuse_stream),
        "stream_unary": (grpc.stream_unary_rpc_method_handler, refuse),
        "stream_stream": (grpc.stream_stream_rpc_method_handler, refuse_stream),
    }
    for attr, (make, behaviour) in kinds.items():
        if getattr(handler, attr) is not None:
            return make(
                behaviour,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise AssertionError("handler of unknown kind")

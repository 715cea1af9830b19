"""Bearer-token checks per call: inference tokens for ``Inference``, admin tokens for ``Admin`` (and both).

Health checks and server reflection stay open so that probes and off-the-shelf tools work without a
token. The interceptor raises the two errors below; the table in :mod:`loraswap.server.grpc.status` maps
them to UNAUTHENTICATED and PERMISSION_DENIED like every other error, and the client raises them back.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from loraswap.errors import LoraswapError

API_PREFIX = "/loraswap.v1."
ADMIN_PREFIX = "/loraswap.v1.Admin/"


class UnauthenticatedError(LoraswapError):
    """No bearer token, or one the server does not know (gRPC UNAUTHENTICATED)."""


class PermissionDeniedError(LoraswapError):
    """A valid token that does not allow this call (gRPC PERMISSION_DENIED)."""


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _known(token: str, tokens: Iterable[str]) -> bool:
    # compare against every token, so that timing does not tell which one nearly matched
    return any([hmac.compare_digest(token.encode(), t.encode()) for t in tokens])


class TokenAuth:
    """Decides whether a call may proceed; raises the errors above otherwise."""

    def __init__(self, inference_tokens: Iterable[str] = (), admin_tokens: Iterable[str] = ()) -> None:
        self.inference_tokens = tuple(inference_tokens)
        self.admin_tokens = tuple(admin_tokens)

    @property
    def enabled(self) -> bool:
        return bool(self.inference_tokens or self.admin_tokens)

    def check(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> None:
        if not self.enabled or not method.startswith(API_PREFIX):
            return
        token = bearer_token(metadata)
        if token is None:
            raise UnauthenticatedError("missing bearer token (metadata 'authorization: Bearer <token>')")
        if _known(token, self.admin_tokens):
            return
        if not _known(token, self.inference_tokens):
            raise UnauthenticatedError("unknown bearer token")
        if method.startswith(ADMIN_PREFIX):
            raise PermissionDeniedError("this token may call Inference only; Admin needs an admin token")


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

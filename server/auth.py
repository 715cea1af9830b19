"""Bearer tokens, the one rule both edges apply: inference tokens for ``Inference`` (and the OpenAI HTTP
API), admin tokens for ``Admin`` and for ``Inference`` too.

Health checks and server reflection stay open so that probes and off-the-shelf tools work without a
token. A refusal raises :class:`~loraswap.errors.UnauthenticatedError` or
:class:`~loraswap.errors.PermissionDeniedError`; :mod:`loraswap.server.status` maps them to each edge's
status (gRPC UNAUTHENTICATED / PERMISSION_DENIED, HTTP 401 / 403). No gRPC or HTTP import here: the gRPC
interceptor (:mod:`loraswap.server.grpc.auth`), the HTTP app and the Ray ingress call it.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from loraswap.errors import PermissionDeniedError, UnauthenticatedError

API_PREFIX = "/loraswap.v1."
ADMIN_PREFIX = "/loraswap.v1.Admin/"


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

    def check_http(self, header: str | None) -> None:
        """The HTTP API's rule for an ``Authorization`` header: inference tokens only; no token or an
        unknown one is refused, an admin token (the gRPC Admin service's) is a permission error."""
        if not self.enabled:
            return
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise UnauthenticatedError("missing bearer token (header 'Authorization: Bearer <token>')")
        if _known(token, self.inference_tokens):
            return
        if _known(token, self.admin_tokens):
            raise PermissionDeniedError(
                "admin tokens are for the gRPC Admin service; HTTP takes inference tokens"
            )
        raise UnauthenticatedError("unknown bearer token")

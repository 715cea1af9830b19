"""Typed Python clients (sync and asyncio) of a loraswap server, returning the engine's domain types.

Status codes that have a domain error class come back as that class (NOT_FOUND → NotFoundError,
UNAUTHENTICATED → :class:`~loraswap.server.grpc.auth.UnauthenticatedError`, …; the table is
:mod:`loraswap.server.grpc.status`); any other failure, UNAVAILABLE included, raises :class:`ServerError`
with the status code.

Example::

    with Client("127.0.0.1:50051", token="…") as client:
        print(client.generate("Hello", adapter="support:prod").text)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from loraswap import errors
from loraswap.server.engine.api import (
    AdapterStatus,
    ChatMessage,
    EngineInfo,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Tier,
    TokenEvent,
)
from loraswap.server.grpc import convert, status
from loraswap.server.grpc.pb import admin_pb2, admin_pb2_grpc, inference_pb2_grpc

if TYPE_CHECKING:
    from loraswap.server.routes.route import RouteStatus


class ServerError(errors.LoraswapError):
    """A call failed with a status code that has no domain error class (UNAVAILABLE, INTERNAL, …)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        super().__init__(f"{code.name}: {details}")


def translate(exc: grpc.RpcError) -> errors.LoraswapError:
    """The domain error for a failed call (:func:`~loraswap.server.grpc.status.error_class_for`)."""
    code, details = exc.code(), exc.details() or ""
    cls = status.error_class_for(code)
    return cls(details) if cls is not None else ServerError(code, details)


def build_request(
    prompt: str | None,
    adapter: str,
    messages: Sequence[ChatMessage] | None,
    sampling: SamplingParams | None,
    request_id: str,
) -> Any:
    """The GenerateRequest; without ``sampling``, ``max_new_tokens`` is left to the server's default."""
    req = GenerationRequest(
        adapter=adapter,
        prompt=prompt,
        messages=tuple(messages) if messages is not None else None,
        sampling=sampling or SamplingParams(),
        request_id=request_id,
    )
    pb = convert.request_to_pb(req)
    if sampling is None:
        pb.max_new_tokens = 0
    return pb


def channel_credentials(
    root_certificates: str | Path | None, client_cert: str | Path | None, client_key: str | Path | None
) -> grpc.ChannelCredentials:
    def read(p: str | Path | None) -> bytes | None:
        return Path(p).read_bytes() if p else None

    return grpc.ssl_channel_credentials(read(root_certificates), read(client_key), read(client_cert))


class _Base:
    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Args:
        target: ``host:port`` of the server.
        token: Bearer token sent with every call (inference or admin).
        tls: Use TLS (implied by any of the certificate arguments).
        root_certificates: PEM CA bundle that signed the server's certificate (None = system roots).
        client_cert: PEM client certificate, for servers that verify clients.
        client_key: PEM key of ``client_cert``.
        timeout: Default deadline of every call, in seconds (None = none).
        options: Extra gRPC channel options.
        """
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._secure = tls or any((root_certificates, client_cert, client_key))
        self._credentials = (
            channel_credentials(root_certificates, client_cert, client_key) if self._secure else None
        )
        self._target, self._options = target, list(options)

    def _kw(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": timeout if timeout is not None else self.timeout, "metadata": self.metadata}


class Client(_Base):
    """Blocking client."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        if self._credentials is not None:
            self.channel = grpc.secure_channel(self._target, self._credentials, self._options)
        else:
            self.channel = grpc.insecure_channel(self._target, self._options)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, **self._kw(timeout))
        except grpc.RpcError as exc:
            raise translate(exc) from None

    def generate(
        self,
        prompt: str | None = None,
        *,
        adapter: str = "",
        messages: Sequence[ChatMessage] | None = None,
        sampling: SamplingParams | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> GenerationResult:
        """Generate a completion of ``prompt`` (or of chat ``messages``) with ``adapter`` ("" = base)."""
        request = build_request(prompt, adapter, messages, sampling, request_id)
        return convert.result_from_pb(self._call(self.inference.Generate, request, timeout))

    def stream(
        self,
        prompt: str | None = None,
        *,
        adapter: str = "",
        messages: Sequence[ChatMessage] | None = None,
        sampling: SamplingParams | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Iterator[TokenEvent]:
        """Like :meth:`generate`, yielding token events; the last carries the result."""
        request = build_request(prompt, adapter, messages, sampling, request_id)
        text, ids = "", ()
        try:
            for pb in self.inference.GenerateStream(request, **self._kw(timeout)):
                text, ids = text + pb.text, ids + tuple(pb.token_ids)
                yield convert.event_from_pb(pb, text, ids)
        except grpc.RpcError as exc:
            raise translate(exc) from None

    def load_adapter(self, ref: str, tier: Tier = "device") -> AdapterStatus:
        request = admin_pb2.LoadAdapterRequest(adapter=ref, tier=convert.TIER_TO_PB[tier])
        return convert.status_from_pb(self._call(self.admin.LoadAdapter, request))

    def unload_adapter(self, ref: str) -> None:
        self._call(self.admin.UnloadAdapter, admin_pb2.UnloadAdapterRequest(adapter=ref))

    def pin(self, ref: str) -> AdapterStatus:
        return convert.status_from_pb(
            self._call(self.admin.PinAdapter, admin_pb2.PinAdapterRequest(adapter=ref))
        )

    def unpin(self, ref: str) -> AdapterStatus:
        request = admin_pb2.UnpinAdapterRequest(adapter=ref)
        return convert.status_from_pb(self._call(self.admin.UnpinAdapter, request))

    def list_adapters(self) -> list[AdapterStatus]:
        response = self._call(self.admin.ListAdapters, admin_pb2.ListAdaptersRequest())
        return [convert.status_from_pb(a) for a in response.adapters]

    def info(self) -> EngineInfo:
        return convert.info_from_pb(self._call(self.admin.ServerInfo, admin_pb2.ServerInfoRequest()))

    def routes(self) -> list[RouteStatus]:
        """The server's routes to merged models (from ``ServerInfo``)."""
        response = self._call(self.admin.ServerInfo, admin_pb2.ServerInfoRequest())
        return [convert.route_from_pb(r) for r in response.routes]

    def routed_to(self) -> dict[str, str]:
        """Adapter digest → the merged model answering for it (from ``ListAdapters``)."""
        response = self._call(self.admin.ListAdapters, admin_pb2.ListAdaptersRequest())
        return {a.digest: a.routed_to for a in response.adapters if a.routed_to}

    def promote(self, ref: str, timeout: float | None = None) -> RouteStatus:
        """Merge ``ref`` into a route and switch its requests there (returns once it serves)."""
        request = admin_pb2.PromoteAdapterRequest(adapter=ref)
        return convert.route_from_pb(self._call(self.admin.PromoteAdapter, request, timeout))

    def demote(self, ref: str) -> int:
        """Send ``ref`` back to the shared base; returns the bytes its route freed."""
        request = admin_pb2.DemoteAdapterRequest(adapter=ref)
        return self._call(self.admin.DemoteAdapter, request).freed_bytes


class AsyncClient(_Base):
    """asyncio client (``grpc.aio``); same methods as :class:`Client`, as coroutines."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        if self._credentials is not None:
            self.channel = grpc.aio.secure_channel(self._target, self._credentials, self._options)
        else:
            self.channel = grpc.aio.insecure_channel(self._target, self._options)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, **self._kw(timeout))
        except grpc.RpcError as exc:
            raise translate(exc) from None

    async def generate(
        self,
        prompt: str | None = None,
        *,
        adapter: str = "",
        messages: Sequence[ChatMessage] | None = None,
        sampling: SamplingParams | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> GenerationResult:
        request = build_request(prompt, adapter, messages, sampling, request_id)
        return convert.result_from_pb(await self._call(self.inference.Generate, request, timeout))

    async def stream(
        self,
        prompt: str | None = None,
        *,
        adapter: str = "",
        messages: Sequence[ChatMessage] | None = None,
        sampling: SamplingParams | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[TokenEvent]:
        request = build_request(prompt, adapter, messages, sampling, request_id)
        text, ids = "", ()
        try:
            async for pb in self.inference.GenerateStream(request, **self._kw(timeout)):
                text, ids = text + pb.text, ids + tuple(pb.token_ids)
                yield convert.event_from_pb(pb, text, ids)
        except grpc.RpcError as exc:
            raise translate(exc) from None

    async def load_adapter(self, ref: str, tier: Tier = "device") -> AdapterStatus:
        request = admin_pb2.LoadAdapterRequest(adapter=ref, tier=convert.TIER_TO_PB[tier])
        return convert.status_from_pb(await self._call(self.admin.LoadAdapter, request))

    async def unload_adapter(self, ref: str) -> None:
        await self._call(self.admin.UnloadAdapter, admin_pb2.UnloadAdapterRequest(adapter=ref))

    async def pin(self, ref: str) -> AdapterStatus:
        request = admin_pb2.PinAdapterRequest(adapter=ref)
        return convert.status_from_pb(await self._call(self.admin.PinAdapter, request))

    async def unpin(self, ref: str) -> AdapterStatus:
        request = admin_pb2.UnpinAdapterRequest(adapter=ref)
        return convert.status_from_pb(await self._call(self.admin.UnpinAdapter, request))

    async def list_adapters(self) -> list[AdapterStatus]:
        response = await self._call(self.admin.ListAdapters, admin_pb2.ListAdaptersRequest())
        return [convert.status_from_pb(a) for a in response.adapters]

    async def info(self) -> EngineInfo:
        return convert.info_from_pb(await self._call(self.admin.ServerInfo, admin_pb2.ServerInfoRequest()))

"""The FastAPI app: ``/v1/completions`` and ``/v1/chat/completions`` (JSON or server-sent events), and
``/v1/models``.

Every error is an OpenAI error object ``{"error": {"message", "type", "param", "code"}}`` with the status
of :data:`STATUS`. Requests are counted in :class:`~loraswap.server.metrics.Metrics` by path and status.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import queue
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraswap import errors
from loraswap.server.engine.api import TokenEvent
from loraswap.server.grpc.auth import PermissionDeniedError, TokenAuth, UnauthenticatedError
from loraswap.server.grpc.servicers import EngineSlot
from loraswap.server.http import convert, models
from loraswap.server.metrics import Metrics
from loraswap.server.settings import ServeSettings

PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
"""Every path the app serves, each a ``method`` label of the request metrics."""
STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (UnauthenticatedError, 401, "authentication_error"),
    (PermissionDeniedError, 403, "permission_error"),
    (errors.NotFoundError, 404, "not_found_error"),
    (errors.InvalidArgumentError, 400, "invalid_request_error"),
    (errors.IncompatibleAdapterError, 422, "invalid_request_error"),
    (errors.OverloadedError, 429, "rate_limit_error"),
    (errors.DrainingError, 503, "service_unavailable"),
    (errors.DeadlineExceededError, 504, "timeout"),
    (errors.LoraswapError, 500, "server_error"),
)
"""Domain error → HTTP status and OpenAI error ``type`` (the first matching class wins)."""
CODES = {404: "model_not_found", 429: "overloaded", 503: "draining", 401: "invalid_api_key"}


def error_response(
    status: int, kind: str, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _error_of(exc: Exception) -> JSONResponse:
    for cls, status, kind in STATUS:
        if isinstance(exc, cls):
            return error_response(
                status, kind, str(exc), "model" if status == 404 else None, CODES.get(status)
            )
    return error_response(500, "server_error", f"internal error: {type(exc).__name__}")


def authorize(auth: TokenAuth, header: str | None) -> None:
    """Inference tokens only: no token or an unknown one is 401, an admin token (gRPC Admin's) is 403."""
    if not auth.enabled:
        return
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise UnauthenticatedError("missing bearer token (header 'Authorization: Bearer <token>')")
    known = [hmac.compare_digest(token.encode(), t.encode()) for t in auth.inference_tokens]
    if any(known):
        return
    if any([hmac.compare_digest(token.encode(), t.encode()) for t in auth.admin_tokens]):
        raise PermissionDeniedError(
            "admin tokens are for the gRPC Admin service; HTTP takes inference tokens"
        )
    raise UnauthenticatedError("unknown bearer token")


class CallMetrics:
    """ASGI middleware: counts each request by path and final status, timed until its last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.on_http(scope["path"], status[0], time.perf_counter() - start)


def ready(handle: Any) -> list[TokenEvent]:
    """The events of ``handle`` already queued, without waiting (raises the request's error)."""
    out: list[TokenEvent] = []
    with contextlib.suppress(queue.Empty):
        for event in handle.events(timeout=0):
            out.append(event)
    return out


def create_app(slot: EngineSlot, settings: ServeSettings, metrics: Metrics) -> ASGIApp:
    """The app over the engine in ``slot`` (requests get 503 until the engine is attached)."""
    app = FastAPI(title="loraswap", docs_url=None, redoc_url=None, openapi_url=None)
    auth = TokenAuth(settings.inference_tokens, settings.admin_tokens)
    metrics.track_methods(PATHS)

    @app.exception_handler(errors.LoraswapError)
    async def _domain(request: Request, exc: errors.LoraswapError) -> JSONResponse:
        return _error_of(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()]
        return _error_of(errors.InvalidArgumentError("invalid request", problems))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, "invalid_request_error", str(exc.detail))

    @app.get("/v1/models")
    async def list_models(request: Request) -> models.ModelList:
        authorize(auth, request.headers.get("authorization"))
        engine = slot.get()
        info = engine.info()
        base = {"kind": "base", "fingerprint": info.base_fingerprint, "quantization": info.quantization}
        cards = [models.ModelCard(id=info.base_model, loraswap=base)]
        for s in engine.list_adapters():
            extra = {"kind": "adapter", "digest": s.digest, "tiers": list(s.tiers), "pinned": s.pinned,
                     "rank": s.rank, "size_bytes": s.size_bytes, "base": info.base_model}  # fmt: skip
            cards.append(models.ModelCard(id=s.name, loraswap=extra))
        return models.ModelList(data=cards)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: models.CompletionRequest, request: Request) -> Any:
        return await _generate(body, request, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: models.ChatCompletionRequest, request: Request) -> Any:
        return await _generate(body, request, chat=True)

    async def _generate(
        body: models.CompletionRequest | models.ChatCompletionRequest, request: Request, chat: bool
    ) -> Any:
        authorize(auth, request.headers.get("authorization"))
        engine = slot.get()
        req = convert.request_from_body(body, settings, engine.info().base_model)
        handle = engine.submit(req)
        events = handle.aevents()
        try:
            first = await anext(events)  # adapter errors (unknown, incompatible) surface as a status here
        except BaseException:
            handle.cancel()
            raise
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if not body.stream:
            result = first.result
            try:
                async for event in events:  # woken by the engine: no thread waits for the request
                    result = event.result
            finally:
                handle.cancel()  # a no-op once finished
            assert result is not None
            metrics.on_result(req.adapter, result)
            if chat:
                choice = models.ChatChoice(
                    message=models.ChatMessageOut(content=result.text),
                    finish_reason=convert.finish_reason(result),
                )
                return models.ChatCompletion(
                    id=ident, created=created, model=body.model, choices=[choice], usage=convert.usage(result)
                )
            text = models.CompletionChoice(text=result.text, finish_reason=convert.finish_reason(result))
            return models.Completion(
                id=ident, created=created, model=body.model, choices=[text], usage=convert.usage(result)
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": ident, "object": kind, "created": created, "model": body.model}

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": delta,
                    "finish_reason": finish,
                    "logprobs": None,
                }
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return json.dumps({**head, "choices": [choice]})

        async def stream() -> AsyncIterator[dict[str, str]]:
            try:
                if chat:
                    yield {"data": chunk("", None, role=True)}
                event = first
                while True:
                    batch = [event, *ready(handle)]  # tokens already out go in one chunk
                    text, result = "".join(e.text for e in batch), batch[-1].result
                    if text or result is None:
                        yield {"data": chunk(text, None)}
                    if result is not None:
                        metrics.on_result(req.adapter, result)
                        yield {"data": chunk(None if chat else "", convert.finish_reason(result))}
                        if include_usage:
                            usage = convert.usage(result).model_dump()
                            yield {"data": json.dumps({**head, "choices": [], "usage": usage})}
                        yield {"data": "[DONE]"}
                        return
                    event = await anext(events)
            except errors.LoraswapError as exc:  # after the response started: an error event, then stop
                yield {"data": bytes(_error_of(exc).body).decode()}
            finally:
                handle.cancel()  # the client went away (or the stream ended): free the request's row

        return EventSourceResponse(stream(), ping=15)

    return CallMetrics(app, metrics)

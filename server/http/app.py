"""The FastAPI app: ``/v1/completions`` and ``/v1/chat/completions`` (JSON or server-sent events), and
``/v1/models``.

Every error is an OpenAI error object ``{"error": {"message", "type", "param", "code"}}`` with the HTTP
status, type and code of :mod:`loraswap.server.status` (the table the gRPC edge reads too). Requests are
counted in :class:`~loraswap.server.metrics.Metrics` by path and status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraswap import errors
from loraswap.server.auth import TokenAuth
from loraswap.server.engine.api import GenerationResult, TokenEvent
from loraswap.server.engine_slot import EngineSlot, routed_to
from loraswap.server.http import convert, models
from loraswap.server.limits import InFlight
from loraswap.server.metrics import Metrics
from loraswap.server.settings import ServeSettings
from loraswap.server.status import status_of

PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
"""Every path the app serves, each a ``method`` label of the request metrics."""


def error_response(
    status: int, kind: str, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _error_of(exc: Exception) -> JSONResponse:
    """The OpenAI error object for ``exc``, as :mod:`loraswap.server.status` says (500 outside it)."""
    row = status_of(exc)
    if row is None:
        return error_response(500, "server_error", f"internal error: {type(exc).__name__}")
    return error_response(row.http, row.kind, str(exc), "model" if row.http == 404 else None, row.code)


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


def create_app(
    slot: EngineSlot,
    settings: ServeSettings,
    metrics: Metrics,
    watch_disconnects: bool = True,
    inflight: InFlight | None = None,
) -> ASGIApp:
    """The app over the engine in ``slot`` (requests get 503 until the engine is attached).

    ``inflight``: the server's generation budget, shared with its gRPC edge (default: one of the app's
    own, of ``settings.max_concurrent_rpcs``).

    ``watch_disconnects``: a JSON answer's request is cancelled when its client hangs up before it is
    ready (the ASGI server's ``http.disconnect``); off where the ASGI server relays ``receive`` from
    elsewhere and may report a disconnect for a client that is still there (Ray Serve's replicas).
    """
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
        auth.check_http(request.headers.get("authorization"))
        engine = slot.get()
        info = engine.info()
        base = {"kind": "base", "fingerprint": info.base_fingerprint, "quantization": info.quantization}
        cards = [models.ModelCard(id=info.base_model, loraswap=base)]
        routed = routed_to(engine)
        for s in engine.list_adapters():
            extra = {"kind": "adapter", "digest": s.digest, "tiers": list(s.tiers), "pinned": s.pinned,
                     "rank": s.rank, "size_bytes": s.size_bytes, "base": info.base_model,
                     "routed_to": routed.get(s.digest)}  # fmt: skip
            cards.append(models.ModelCard(id=s.name, loraswap=extra))
        return models.ModelList(data=cards)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: models.CompletionRequest, request: Request) -> Any:
        return await _generate(body, request, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: models.ChatCompletionRequest, request: Request) -> Any:
        return await _generate(body, request, chat=True)

    admission = inflight or InFlight(settings.max_concurrent_rpcs)

    async def _generate(
        body: models.CompletionRequest | models.ChatCompletionRequest, request: Request, chat: bool
    ) -> Any:
        auth.check_http(request.headers.get("authorization"))
        engine = slot.get()
        req = convert.request_from_body(body, settings, engine.info().base_model)
        admission.acquire()
        released = False
        watch: asyncio.Future | None = None
        try:
            handle = await submit_off_loop(engine, req)  # tokenizing, templates, route look-ups block
            events = handle.aevents()
            # A JSON answer reads nothing from the client until it is written: this watch is what
            # notices a hang-up meanwhile and cancels the request, freeing its row.
            if not body.stream and watch_disconnects:
                watch = asyncio.ensure_future(cancel_on_disconnect(request.receive, handle))
            try:
                first = await anext(events)  # adapter errors (unknown, incompatible) surface here as a status
            except BaseException:
                handle.cancel()
                raise
            ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            created = int(time.time())
            if body.stream:
                kind = "chat.completion.chunk" if chat else "text_completion"
                head = {"id": ident, "object": kind, "created": created, "model": body.model}
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                chunks = stream_chunks(ChunkWriter(head, chat), handle, events, first, include_usage)
                released = True  # the response gives the admission back when it ends, however it ends
                return StreamResponse(_counted(chunks, req.adapter), on_close(handle, admission), ping=15)
            result = first.result
            try:
                async for event in events:  # woken by the engine: no thread waits for the request
                    result = event.result
            finally:
                handle.cancel()  # a no-op once finished
        finally:
            if watch is not None:
                watch.cancel()
            if not released:
                admission.release()
        if result is None:  # cancelled before it finished: the client is gone
            raise errors.LoraswapError("the request ended without a result")
        metrics.on_result(req.adapter, result)
        usage, finish = convert.usage(result), convert.finish_reason(result)
        if chat:
            message = models.ChatChoice(
                message=models.ChatMessageOut(content=result.text), finish_reason=finish
            )
            return models.ChatCompletion(
                id=ident, created=created, model=body.model, choices=[message], usage=usage
            )
        text = models.CompletionChoice(text=result.text, finish_reason=finish)
        return models.Completion(id=ident, created=created, model=body.model, choices=[text], usage=usage)

    async def _counted(chunks: AsyncIterator[tuple[str, GenerationResult | None]], adapter: str) -> Any:
        async for data, result in chunks:
            if result is not None:
                metrics.on_result(adapter, result)
            yield {"data": data}

    return CallMetrics(app, metrics)


async def submit_off_loop(engine: Any, request: Any) -> Any:
    """``engine.submit(request)`` on a worker thread (it tokenizes, renders chat templates and may look a
    route's tag up in the registry: none of it may stall the event loop's other requests). If this task
    is cancelled meanwhile, the request, once submitted, is cancelled too: nothing runs for nobody."""
    submitting = asyncio.ensure_future(asyncio.to_thread(engine.submit, request))
    try:
        return await asyncio.shield(submitting)
    except asyncio.CancelledError:
        submitting.add_done_callback(_cancel_submitted)
        raise


def _cancel_submitted(done: asyncio.Future) -> None:
    if not done.cancelled() and done.exception() is None:
        done.result().cancel()


def on_close(handle: Any, admission: InFlight) -> Callable[[], None]:
    """What a stream's end must do exactly once, however it ends: cancel its request (a no-op once it
    finished) and give its unit of the budget back."""
    closed: list[bool] = []

    def close() -> None:
        if not closed:
            closed.append(True)
            handle.cancel()
            admission.release()

    return close


class StreamResponse(EventSourceResponse):
    """Server-sent events that run ``on_close`` when the response ends for any reason: finished, the
    client gone before the first chunk was pulled (the body generator never starts, so its own
    ``finally`` would never run), or the server stopping."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()

    def __del__(self) -> None:  # never sent (an error between creating and sending it): still release
        close = getattr(self, "_on_close", None)
        if close is not None:
            close()


async def cancel_on_disconnect(receive: Receive, handle: Any) -> None:
    """Cancel ``handle`` when the client hangs up (the ASGI ``http.disconnect`` message)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


class ChunkWriter:
    """The JSON of one stream's chunks. Text chunks differ only in their text, so the document around
    it is encoded once and each chunk encodes just its text."""

    TEXT = "\x00text\x00"  # a placeholder no JSON encoding of real text can contain

    def __init__(self, head: dict[str, Any], chat: bool) -> None:
        self.head, self.chat = head, chat
        template = self.encode(self.TEXT, None)
        self.before, self.after = template.split(json.dumps(self.TEXT))

    def encode(self, text: str | None, finish: str | None, role: bool = False) -> str:
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return json.dumps({**self.head, "choices": [choice]})

    def text(self, text: str) -> str:
        """A text chunk, as :meth:`encode` would write it."""
        return self.before + json.dumps(text) + self.after

    def usage(self, usage: dict[str, Any]) -> str:
        return json.dumps({**self.head, "choices": [], "usage": usage})


async def stream_chunks(
    writer: ChunkWriter,
    handle: Any,
    events: AsyncIterator[TokenEvent],
    first: TokenEvent,
    include_usage: bool,
) -> AsyncIterator[tuple[str, GenerationResult | None]]:
    """The ``data`` of each SSE event of one stream, with the result beside the finish chunk: text
    chunks (tokens already out go in one), the finish chunk, the usage chunk when asked for, ``[DONE]``;
    after an error, its error object, then stop. Ending, or being closed early (the client went away),
    cancels the request, which frees its row."""
    try:
        if writer.chat:
            yield writer.encode("", None, role=True), None
        event = first
        while True:
            batch = [event, *ready(handle)]
            text, result = "".join(e.text for e in batch), batch[-1].result
            if text or result is None:
                yield writer.text(text), None
            if result is not None:
                yield writer.encode(None if writer.chat else "", convert.finish_reason(result)), result
                if include_usage:
                    yield writer.usage(convert.usage(result).model_dump()), None
                yield "[DONE]", None
                return
            event = await anext(events)
    except errors.LoraswapError as exc:
        yield bytes(_error_of(exc).body).decode(), None
    finally:
        handle.cancel()

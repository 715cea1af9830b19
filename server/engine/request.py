"""A request's life inside the engine, and the handle its caller holds."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from loraswap.errors import CancelledError
from loraswap.server.adapters.reader import HostAdapter
from loraswap.server.engine.api import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Timings,
    TokenEvent,
    now,
)
from loraswap.server.engine.detok import TextStream
from loraswap.server.engine.sampling import SamplerState

_END = object()


@dataclass(eq=False)
class RequestState:
    """Engine-side state of one request (touched by the engine thread only, except ``cancelled``)."""

    request: GenerationRequest
    prompt_ids: list[int]
    text: TextStream
    adapter: Future[HostAdapter] | None  # None = base model
    sampler: SamplerState
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # set by RequestHandle.aevents
    submitted: float = field(default_factory=now)
    digest: str = ""
    row: int = -1
    slot: int = -1
    cached: int = 0  # tokens whose K/V are in the cache
    output_ids: list[int] = field(default_factory=list)
    admitted: float = 0.0
    first_token: float = 0.0
    last_token: float = 0.0

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt_ids)

    def next_input(self, budget: int) -> list[int]:
        """The tokens to run this step: a prompt chunk of at most ``budget``, or the last output token."""
        if self.prefilling:
            return self.prompt_ids[self.cached : self.cached + budget]
        return [self.output_ids[-1]]

    def result(self, reason: FinishReason) -> GenerationResult:
        end = now()
        return GenerationResult(
            text=self.text.text,
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            adapter_digest=self.digest,
            token_ids=tuple(self.output_ids),
            timings=Timings(
                queue_s=(self.admitted or end) - self.submitted,
                ttft_s=(self.first_token - self.submitted) if self.first_token else 0.0,
                total_s=end - self.submitted,
            ),
        )

    def emit(self, event: TokenEvent) -> None:
        self._put(event)

    def fail(self, error: BaseException) -> None:
        self._put(error)

    def _put(self, item: TokenEvent | BaseException) -> None:
        self.events.put(item)
        waker = self.waker
        if waker is not None:  # an asyncio consumer: wake its loop (no thread waits per event)
            loop, ready = waker
            with contextlib.suppress(RuntimeError):  # its loop has closed: nobody is listening
                loop.call_soon_threadsafe(ready.set)


class RequestHandle:
    """What ``Engine.submit`` returns: stream the events, wait for the result, or cancel."""

    def __init__(self, state: RequestState) -> None:
        self._state = state
        self._result: GenerationResult | None = None
        self._done = False

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Yield token events as they come; the last carries ``result``. Raises the request's error."""
        while not self._done:
            yield self._take(self._state.events.get(timeout=timeout))

    async def aevents(self) -> AsyncIterator[TokenEvent]:
        """The same events as :meth:`events`, for asyncio callers: the engine thread wakes the running
        loop when it queues an event, so no thread blocks per request or per token."""
        ready = asyncio.Event()
        self._state.waker = (asyncio.get_running_loop(), ready)
        while not self._done:
            try:
                item = self._state.events.get_nowait()
            except queue.Empty:
                ready.clear()  # no wake-up is lost: callbacks run only at the await below
                try:
                    item = self._state.events.get_nowait()
                except queue.Empty:
                    await ready.wait()
                    continue
            yield self._take(item)

    def _take(self, item: TokenEvent | BaseException) -> TokenEvent:
        """Account for one queued item: an error ends the stream by raising, a result ends it normally."""
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.result is not None:
            self._done = True
            self._result = item.result
        return item

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request ends; return its result (raises its error)."""
        for _ in self.events(timeout):
            pass
        if self._result is None:
            raise CancelledError("request ended without a result")
        return self._result

    def cancel(self) -> None:
        """Ask the engine to drop the request; its batch row and cache are freed at the next step."""
        self._state.cancelled.set()

    @property
    def state(self) -> RequestState:
        return self._state

"""The Ray ingress's remote request handle on its own (no Ray needed): a cancel ends a waiting reader; a
handle made off the event loop (the HTTP app submits from a worker thread) runs on it."""

from __future__ import annotations

import asyncio

import pytest

from loraswap.errors import CancelledError
from loraswap.server.engine.api import GenerationRequest, GenerationResult, Timings, TokenEvent
from loraswap.server.ray.ingress import RemoteHandle


class SilentReplica:
    """A replica stream that has not produced its first event yet (an adapter still loading)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def stream(self, request: GenerationRequest):
        self.started.set()
        await asyncio.Event().wait()  # nothing comes until the stream is cancelled
        yield  # pragma: no cover


def test_cancel_ends_a_reader_waiting_for_the_first_event() -> None:
    async def scenario() -> None:
        replica = SilentReplica()
        handle = RemoteHandle(replica, GenerationRequest(prompt="hi"))  # type: ignore[arg-type]
        reader = asyncio.ensure_future(anext(handle.aevents()))
        await replica.started.wait()
        handle.cancel()
        with pytest.raises(CancelledError, match="cancelled"):
            await asyncio.wait_for(reader, timeout=30)

    asyncio.run(scenario())


class TalkingReplica:
    """A replica stream that answers at once: one token, then the result."""

    async def stream(self, request: GenerationRequest):
        yield TokenEvent(text="hi", token_ids=(1,))
        yield TokenEvent(text="", token_ids=(), result=RESULT)


RESULT = GenerationResult(
    text="hi", finish_reason="length", prompt_tokens=1, completion_tokens=1, adapter_digest="",
    token_ids=(1,), timings=Timings(queue_s=0.0, ttft_s=0.0, total_s=0.0),
)  # fmt: skip


def test_a_handle_submitted_off_the_loop_streams_on_it() -> None:
    """The HTTP app submits from a worker thread (no event loop there); reading, on the loop, sends it."""

    async def scenario() -> None:
        request = GenerationRequest(prompt="hi")
        handle = await asyncio.to_thread(RemoteHandle, TalkingReplica(), request)  # type: ignore[arg-type]
        events = [event async for event in handle.aevents()]
        assert [e.text for e in events] == ["hi", ""] and events[-1].result == RESULT

    asyncio.run(scenario())


def test_cancel_before_the_first_read_ends_the_reader() -> None:
    async def scenario() -> None:
        replica = SilentReplica()
        handle = await asyncio.to_thread(RemoteHandle, replica, GenerationRequest(prompt="hi"))  # type: ignore[arg-type]
        handle.cancel()
        with pytest.raises(CancelledError, match="cancelled"):
            await asyncio.wait_for(anext(handle.aevents()), timeout=30)
        assert not replica.started.is_set()  # never sent

    asyncio.run(scenario())

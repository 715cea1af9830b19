"""The Ray ingress's remote request handle on its own (no Ray needed): a cancel ends a waiting reader."""

from __future__ import annotations

import asyncio

import pytest

from loraswap.errors import CancelledError
from loraswap.server.engine.api import GenerationRequest
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

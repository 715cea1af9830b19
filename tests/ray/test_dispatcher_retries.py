"""The ingress's :class:`~loraswap.server.ray.ingress.Dispatcher` over fake replicas (no Ray cluster): a
request whose replica dies is sent again ``replica_retries`` times (a stream only before its first event),
then fails UNAVAILABLE; other errors are not retried."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.exceptions import ActorUnavailableError

from loraswap.errors import DrainingError, NotFoundError
from loraswap.server.engine.api import GenerationRequest, GenerationResult, TokenEvent
from loraswap.server.ray.config import RayAppConfig
from loraswap.server.ray.ingress import Dispatcher
from loraswap.server.settings import ServeSettings

RESULT = GenerationResult(
    text="hi", finish_reason="length", prompt_tokens=1, completion_tokens=1, adapter_digest=""
)
# ray.serve (imported to map errors) declares its config with pydantic v1-style fields.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")
EVENTS = [TokenEvent(text="hi", token_ids=(1,)), TokenEvent(text="", token_ids=(), result=RESULT)]


def _gone() -> ActorUnavailableError:
    return ActorUnavailableError("the replica died", None)


class _Method:
    def __init__(self, run: Any) -> None:
        self.remote = run


class FakeReplicas:
    """A deployment handle whose calls fail with ``errors`` in turn (a stream after ``events_first`` of its
    events), then answer."""

    def __init__(self, *errors: BaseException, events_first: int = 0) -> None:
        self.errors, self.events_first, self.sent = list(errors), events_first, 0

    def options(self, **_: Any) -> FakeReplicas:
        return self

    @property
    def generate(self) -> _Method:
        async def remote(request: GenerationRequest, time_left: float | None) -> GenerationResult:
            self.sent += 1
            if self.errors:
                raise self.errors.pop(0)
            return RESULT

        return _Method(remote)

    @property
    def generate_stream(self) -> _Method:
        async def remote(request: GenerationRequest, time_left: float | None) -> Any:
            self.sent += 1
            for event in EVENTS[: self.events_first] if self.errors else EVENTS:
                yield event
            if self.errors:
                raise self.errors.pop(0)

        return _Method(remote)


def _dispatcher(replicas: FakeReplicas, retries: int = 2) -> Dispatcher:
    return Dispatcher(replicas, ServeSettings(), RayAppConfig(replica_retries=retries))


async def _streamed(dispatcher: Dispatcher) -> list[TokenEvent]:
    return [event async for event in dispatcher.stream(GenerationRequest(prompt="hi"))]


def test_generate_is_sent_again_while_its_replica_dies() -> None:
    replicas = FakeReplicas(_gone(), _gone())
    assert asyncio.run(_dispatcher(replicas).generate(GenerationRequest(prompt="hi"))) == RESULT
    assert replicas.sent == 3
    replicas = FakeReplicas(_gone(), _gone(), _gone())
    with pytest.raises(DrainingError, match="replica serving the request stopped"):
        asyncio.run(_dispatcher(replicas).generate(GenerationRequest(prompt="hi")))
    assert replicas.sent == 3
    replicas = FakeReplicas(NotFoundError("no such adapter"))
    with pytest.raises(NotFoundError):
        asyncio.run(_dispatcher(replicas).generate(GenerationRequest(prompt="hi")))
    assert replicas.sent == 1


def test_a_stream_is_sent_again_only_before_its_first_event() -> None:
    replicas = FakeReplicas(_gone(), _gone())
    assert asyncio.run(_streamed(_dispatcher(replicas))) == EVENTS and replicas.sent == 3
    replicas = FakeReplicas(_gone(), events_first=1)
    with pytest.raises(DrainingError):
        asyncio.run(_streamed(_dispatcher(replicas)))
    assert replicas.sent == 1
    replicas = FakeReplicas(_gone())
    with pytest.raises(DrainingError):
        asyncio.run(_streamed(_dispatcher(replicas, retries=0)))
    assert replicas.sent == 1

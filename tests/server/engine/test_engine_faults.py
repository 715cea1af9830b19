"""The engine when things fail: requests waiting on a stuck adapter load honour their deadlines and
cancellations while the engine idles, and an engine whose step loop fails for good says so and fails
every request instead of leaving them waiting (issue 23)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from loraswap.errors import CancelledError, DeadlineExceededError, UnavailableError
from loraswap.models import resolve_base
from loraswap.registry.registry import Registry, open_registry
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.api import GenerationRequest, SamplingParams, now

WAIT_S = 60  # a bound on waiting for something that must happen: far above any expected time


class StuckRegistry(Registry):
    """A real local registry whose look-ups wait until :attr:`release` is set (a store that accepts
    connections and never replies)."""

    def __init__(self, store) -> None:
        super().__init__(store)
        self.release = threading.Event()
        self.asked = threading.Event()

    def resolve(self, ref: str, kind: str | None = "adapter"):
        self.asked.set()
        self.release.wait(WAIT_S)
        return super().resolve(ref, kind)


@pytest.fixture
def stuck(tmp_path: Path, tiny_base: Path, make_adapter) -> StuckRegistry:
    registry = StuckRegistry(open_registry(tmp_path / "registry").store)
    registry.push(make_adapter(r=4, seed=3), "a", base=resolve_base(tiny_base))
    return registry


def _engine(tiny_base: Path, registry, **overrides) -> Engine:
    config = EngineConfig(
        base=str(tiny_base), quantization="fp32", adapter_slots=2, max_rank=8, max_batch_size=4,
        max_seq_len=64, **overrides,
    )  # fmt: skip
    engine = Engine(config, registry=registry)
    engine.start()
    return engine


def _request(adapter: str = "", deadline: float | None = None) -> GenerationRequest:
    return GenerationRequest(
        prompt="hello", adapter=adapter, sampling=SamplingParams(2, ignore_eos=True), deadline=deadline
    )


def test_waiting_requests_expire_and_cancel_while_the_engine_idles(tiny_base: Path, stuck) -> None:
    """Defect: a request waiting for an adapter whose load never finished stayed queued past its deadline
    or its cancellation while the engine was idle (the loop woke only for ready work); queue depth stayed
    up until an unrelated request came."""
    engine = _engine(tiny_base, stuck)
    try:
        expired = engine.submit(_request("a", deadline=now() - 1))
        cancelled = engine.submit(_request("a"))
        assert stuck.asked.wait(WAIT_S)
        cancelled.cancel()
        with pytest.raises(DeadlineExceededError):
            expired.result(timeout=WAIT_S)
        with pytest.raises(CancelledError):
            cancelled.result(timeout=WAIT_S)
        assert engine.queue_depth() == 0
    finally:
        stuck.release.set()
        engine.stop(drain_timeout=5)


def test_an_engine_whose_steps_keep_failing_gives_up(
    tiny_base: Path, stuck, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect: with every step failing (a persistent device error), the engine failed one batch after
    another forever while health said SERVING. Now, after ``max_step_failures`` in a row, it fails every
    request UNAVAILABLE, refuses new ones and reports itself unhealthy."""
    stuck.release.set()
    engine = _engine(tiny_base, stuck, max_step_failures=2)
    try:

        def broken(*args, **kwargs):
            raise RuntimeError("CUDA out of memory (simulated)")

        monkeypatch.setattr(engine, "forward", broken)
        for _ in range(2):
            with pytest.raises(RuntimeError, match="internal error"):
                engine.generate(_request())
        assert not engine.healthy() and "2 steps in a row failed" in (engine.failure or "")
        with pytest.raises(UnavailableError, match="the engine stopped"):
            engine.submit(_request())
    finally:
        engine.stop(drain_timeout=5)


def test_a_step_loop_that_dies_fails_its_requests(tiny_base: Path, stuck) -> None:
    """Defect: an exception outside ``step()`` ended the daemon step thread silently; requests waited
    forever and health said SERVING."""
    engine = _engine(tiny_base, stuck)
    try:
        waiting = engine.submit(_request("a"))  # its adapter's look-up is stuck: it waits
        assert stuck.asked.wait(WAIT_S)
        assert engine.healthy()

        def explode() -> None:
            raise MemoryError("simulated")

        engine.take_incoming = explode  # the next loop iteration fails outside step()
        engine.submit(_request())
        with pytest.raises(UnavailableError, match="step loop failed"):
            waiting.result(timeout=WAIT_S)
        assert not engine.healthy()
    finally:
        stuck.release.set()
        engine.stop(drain_timeout=5)

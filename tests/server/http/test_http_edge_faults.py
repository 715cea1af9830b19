"""The HTTP edge under pressure (issue 23): blocking work stays off the event loop, a stream whose client
leaves before its first chunk gives its budget back, and gRPC and HTTP share one generation budget.

Real parts: the tiny Llama in an engine whose steps the tests drive (no timing involved), the app under
uvicorn on 127.0.0.1 or called as the ASGI app it is, a real gRPC server, the real ``openai`` client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine_slot import EngineSlot
from loraswap.server.grpc.pb import inference_pb2, inference_pb2_grpc
from loraswap.server.grpc.server import GrpcServer
from loraswap.server.http.app import create_app
from loraswap.server.http.server import HttpServer
from loraswap.server.limits import InFlight
from loraswap.server.metrics import Metrics
from loraswap.server.settings import ServeSettings

WAIT_S = 60  # a bound on waiting for something that must happen: far above any expected time


@pytest.fixture
def engine(tiny_base: Path, tmp_path: Path) -> Iterator[Engine]:
    """An engine whose steps the test runs (not started)."""
    config = EngineConfig(
        base=str(tiny_base), registry=str(tmp_path / "registry"), quantization="fp32", adapter_slots=2,
        max_rank=8, max_batch_size=4, max_seq_len=128,
    )  # fmt: skip
    engine = Engine(config)
    yield engine
    engine.stop(drain_timeout=0)


def _step(engine: Engine) -> None:
    with engine.step_lock:
        engine.take_incoming()
        engine.step()


def _settings(engine: Engine, limit: int = 4) -> ServeSettings:
    return ServeSettings(
        engine=engine.config, port=0, http_port=0, metrics_port=-1, max_concurrent_rpcs=limit, grace_seconds=1
    )


def test_blocking_submit_work_does_not_stall_other_requests(engine: Engine) -> None:
    """Defect: the app tokenized (and rendered chat templates, and looked routes' tags up in the registry)
    on its one event-loop thread, so one slow submit stalled every other HTTP request."""
    inside, release = threading.Event(), threading.Event()
    encode = engine._encode

    def slow_encode(request):  # a submit that blocks (a registry look-up that hangs, a huge template)
        inside.set()
        assert release.wait(WAIT_S)
        return encode(request)

    engine._encode = slow_encode
    base_model = engine.info().base_model
    slot = EngineSlot()
    slot.engine = engine
    server = HttpServer(_settings(engine), Metrics(), slot)
    port = server.start()
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=WAIT_S)
    blocked = threading.Thread(
        target=lambda: oai.completions.create(model=base_model, prompt="hi", max_tokens=1), daemon=True
    )
    try:
        blocked.start()
        assert inside.wait(WAIT_S)
        assert oai.models.list().data  # answered while the other request's submit is still blocked
        assert blocked.is_alive()
    finally:
        release.set()
        engine.start()
        blocked.join(WAIT_S)
        server.stop()


def _asgi_post(app, body: dict, send_fails: bool) -> list[dict]:
    """POST ``body`` to /v1/completions as an ASGI server would; ``send_fails``: the client is gone, so
    the first message sent raises (as uvicorn's send does for a closed connection)."""
    sent: list[dict] = []
    payload = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
    }  # fmt: skip
    messages = [{"type": "http.request", "body": payload, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client sends nothing more
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if send_fails:
            raise OSError("connection reset by peer")
        sent.append(message)

    async def call() -> None:
        with contextlib.suppress(OSError):  # what the ASGI server swallows for a client that is gone
            await app(scope, receive, send)

    asyncio.run(call())
    return sent


def test_a_stream_whose_client_left_before_its_first_chunk_gives_its_budget_back(engine: Engine) -> None:
    """Defect: a stream's budget unit was given back by its body generator's ``finally``; a client gone
    before the response started never started that generator, so the unit (and the request) leaked."""
    slot = EngineSlot()
    slot.engine = engine
    inflight = InFlight(1)
    app = create_app(slot, _settings(engine, 1), Metrics(), inflight=inflight)
    engine.start()
    body = {"model": engine.info().base_model, "prompt": "hi", "max_tokens": 50, "stream": True}
    _asgi_post(app, body, send_fails=True)
    assert inflight.count == 0
    state = engine.lora_activity()  # nothing runs for a client that is gone
    assert engine.queue_depth() == 0 and not any(state)
    sent = _asgi_post(app, {**body, "max_tokens": 2}, send_fails=False)  # the budget is free again
    assert sent[0]["status"] == 200 and inflight.count == 0


def test_grpc_and_http_share_one_generation_budget(engine: Engine) -> None:
    """Defect: gRPC and HTTP each counted ``max_concurrent_rpcs`` on their own: the server admitted twice
    the limit."""
    settings = _settings(engine, limit=1)
    metrics = Metrics()
    grpc_server = GrpcServer(settings, metrics)
    port = grpc_server.start()
    grpc_server.attach(engine)  # not started: the test steps it
    http = HttpServer(settings, metrics, grpc_server.slot, grpc_server.inflight)
    http_port = http.start()
    url = f"http://127.0.0.1:{http_port}/v1"
    oai = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=WAIT_S)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        request = inference_pb2.GenerateRequest(
            prompt="hi", max_new_tokens=100, sampling=inference_pb2.SamplingParameters(ignore_eos=True)
        )
        call = stub.GenerateStream(request, timeout=WAIT_S)
        while not (engine._running and engine._running[0].output_ids):  # until its first token
            _step(engine)
        next(call)  # gRPC holds the one unit; the engine does not step again
        with pytest.raises(openai.RateLimitError, match="gRPC and HTTP together"):
            oai.completions.create(model=engine.info().base_model, prompt="hi", max_tokens=1)
        call.cancel()  # the next step drops the request; its handler ends and gives the unit back
        _step(engine)
        for _ in range(WAIT_S * 10):
            if grpc_server.inflight.count == 0:
                break
            threading.Event().wait(0.1)  # the handler's thread wakes on its own
        assert grpc_server.inflight.count == 0
        engine.start()  # the budget is free again: HTTP gets its generation
        assert oai.completions.create(model=engine.info().base_model, prompt="hi", max_tokens=1).choices
    finally:
        channel.close()
        http.stop()
        grpc_server.shutdown(grace=0)

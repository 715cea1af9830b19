"""The OpenAI-compatible HTTP API, driven by the real ``openai`` client.

Most tests talk to a real ``loraswap serve`` process on 127.0.0.1 (gRPC and HTTP on one engine); the
disconnect, overload and draining tests run the HTTP server in this process over an engine whose steps
the test drives itself, so that they can look at the KV cache and the queue with no timing involved.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from loraswap.devtools.launch import ServeProcess, start_serve
from loraswap.models import resolve_base
from loraswap.registry import open_registry
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.api import SamplingParams
from loraswap.server.engine_slot import EngineSlot
from loraswap.server.grpc.client import Client
from loraswap.server.http.server import HttpServer
from loraswap.server.metrics import Metrics
from loraswap.server.settings import ServeSettings

INFERENCE, ADMIN = "inf-1", "adm-1"
PROMPT = "The quick brown fox"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, make_adapter) -> Path:
    root = tmp_path_factory.mktemp("http-registry")
    registry, base = open_registry(root), resolve_base(tiny_base)
    registry.push(
        make_adapter(r=4, target_modules=("q_proj", "v_proj"), seed=41), "a1", tags=["prod"], base=base
    )
    registry.push(make_adapter(r=32, seed=42), "too-big", base=base)  # over --max-rank 16
    return root


@pytest.fixture(scope="module")
def serve(
    tiny_base: Path, registry_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    env = {**os.environ, "LORASWAP_HOME": str(tmp_path_factory.mktemp("http-home"))}
    args = ["--port", "0", "--http-port", "0", "--metrics-port", "0", "--base", str(tiny_base)]
    args += ["--registry", str(registry_root), "--quantization", "fp32", "--max-rank", "16"]
    args += ["--adapter-slots", "2", "--max-seq-len", "300", "--max-new-tokens", "250"]
    args += ["--default-max-new-tokens", "8", "--metrics-adapters", "a1"]
    args += ["--inference-tokens", INFERENCE, "--admin-tokens", ADMIN]
    server = start_serve(args, env, timeout=120)
    assert server.http_url is not None, "".join(server.log)
    yield server
    server.kill()


@pytest.fixture(scope="module")
def oai(serve: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve.http_url}/v1", api_key=INFERENCE, max_retries=0, timeout=60)


def test_completion_and_chat_equal_grpc_greedy(serve: ServeProcess, oai: openai.OpenAI) -> None:
    with Client(serve.target, token=INFERENCE, timeout=60) as grpc_client:
        for model, adapter in (("a1:prod", "a1:prod"), ("a1", "a1"), (str(oai.models.list().data[0].id), "")):
            ref = grpc_client.generate(PROMPT, adapter=adapter, sampling=SamplingParams(12, temperature=0))
            out = oai.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, user="u1")
            assert out.choices[0].text == ref.text and out.usage.completion_tokens == ref.completion_tokens
            assert out.usage.prompt_tokens == ref.prompt_tokens and out.object == "text_completion"
            assert out.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
        from loraswap.server.engine.api import ChatMessage

        messages = [ChatMessage(m["role"], m["content"]) for m in CHAT]
        ref = grpc_client.generate(
            adapter="a1", messages=messages, sampling=SamplingParams(10, temperature=0)
        )
    chat = oai.chat.completions.create(model="a1", messages=CHAT, max_completion_tokens=10, temperature=0)
    assert chat.choices[0].message.content == ref.text and chat.choices[0].message.role == "assistant"
    assert (
        chat.usage.completion_tokens == ref.completion_tokens
        and chat.usage.prompt_tokens == ref.prompt_tokens
    )


def test_user_does_not_change_result_and_seed_reproduces(oai: openai.OpenAI) -> None:
    kw = dict(model="a1", prompt=PROMPT, max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    a = oai.completions.create(**kw)
    b = oai.completions.create(**kw, user="someone-else")
    assert a.choices[0].text == b.choices[0].text


def test_ignore_eos_is_vllms_extra_parameter(serve: ServeProcess, oai: openai.OpenAI) -> None:
    from loraswap.server.http.convert import request_from_body
    from loraswap.server.http.models import CompletionRequest

    body = CompletionRequest(model="a1", prompt=PROMPT, max_tokens=5, ignore_eos=True)
    assert request_from_body(body, ServeSettings(), "base").sampling.ignore_eos
    assert not request_from_body(
        body.model_copy(update={"ignore_eos": False}), ServeSettings(), "base"
    ).sampling.ignore_eos
    with Client(serve.target, token=INFERENCE, timeout=60) as grpc_client:
        params = SamplingParams(20, temperature=0, ignore_eos=True)
        ref = grpc_client.generate(PROMPT, adapter="a1", sampling=params)
    out = oai.completions.create(
        model="a1", prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text == ref.text and out.usage.completion_tokens == 20 == ref.completion_tokens


def test_streaming_with_usage_matches_non_streaming(oai: openai.OpenAI) -> None:
    full = oai.chat.completions.create(model="a1:prod", messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(
        oai.chat.completions.create(
            model="a1:prod", messages=CHAT, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    plain = oai.completions.create(model="a1", prompt=PROMPT, max_tokens=9, temperature=0)
    streamed = list(
        oai.completions.create(model="a1", prompt=PROMPT, max_tokens=9, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert all(c.usage is None for c in streamed)  # no usage chunk unless asked for


def test_models_lists_base_and_adapters_with_loraswap_extras(oai: openai.OpenAI, tiny_base: Path) -> None:
    oai.completions.create(model="a1:prod", prompt="hi", max_tokens=1)
    cards = {m.id: m for m in oai.models.list().data}
    base = next(m for m in cards.values() if m.loraswap["kind"] == "base")
    assert base.object == "model" and base.loraswap["fingerprint"]
    a1 = cards["a1"].loraswap
    assert a1["kind"] == "adapter" and a1["digest"].startswith("sha256:") and "device" in a1["tiers"]
    assert a1["rank"] == 4 and a1["base"] == base.id


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(logprobs=2), "logprobs"),
        (dict(extra_body={"response_format": {"type": "json_object"}}), "response_format"),
        (dict(extra_body={"tools": [{"type": "function", "function": {"name": "f"}}]}), "tools"),
        (dict(n=2), "n=2"),
        (dict(frequency_penalty=0.5), "frequency_penalty"),
        (dict(presence_penalty=1.0), "presence_penalty"),
        (dict(max_tokens=251), "max_tokens 251 is over the limit of 250"),
        (dict(max_tokens=0), "max_tokens must be >= 1"),
        (dict(temperature=-1), "temperature must be >= 0"),
        (dict(top_p=0), "top_p must be in (0, 1]"),
        (dict(prompt="x" * 40_000), "over the limit"),
        (dict(stop=[""]), "stop strings must not be empty"),
    ],
)
def test_bad_requests_are_400_naming_the_problem(oai: openai.OpenAI, kwargs: dict, named: str) -> None:
    kw = {"model": "a1", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(**kw)
    assert err.value.status_code == 400 and named in err.value.message
    assert err.value.body["type"] == "invalid_request_error"


def test_chat_refuses_unsupported_parameters_and_parts(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="tools"):
        oai.chat.completions.create(
            model="a1", messages=CHAT, tools=[{"type": "function", "function": {"name": "f"}}]
        )
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        oai.chat.completions.create(model="a1", messages=image)
    with pytest.raises(openai.BadRequestError, match="messages"):
        oai.chat.completions.create(model="a1", messages="not a list")  # type: ignore[arg-type]


def test_auth_404_and_422(serve: ServeProcess) -> None:
    url = f"{serve.http_url}/v1"
    for headers in ({"Authorization": "Bearer nope"}, {"Authorization": "Basic aW5mLTE="}):
        client = openai.OpenAI(base_url=url, api_key="-", default_headers=headers, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            client.completions.create(model="a1", prompt="hi", max_tokens=1)
        assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    bare = urllib.request.Request(f"{url}/models")  # no Authorization header at all
    with pytest.raises(urllib.error.HTTPError) as unauthenticated:
        urllib.request.urlopen(bare, timeout=10)
    assert unauthenticated.value.code == 401
    body = json.loads(unauthenticated.value.read())
    assert "missing bearer token" in body["error"]["message"] and body["error"]["code"] == "invalid_api_key"
    admin = openai.OpenAI(base_url=url, api_key=ADMIN, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="inference tokens") as denied:
        admin.models.list()
    assert denied.value.status_code == 403
    oai = openai.OpenAI(base_url=url, api_key=INFERENCE, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        oai.completions.create(model="no-such-adapter", prompt="hi", max_tokens=1)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-adapter:v9", messages=CHAT, stream=True)
    with pytest.raises(openai.UnprocessableEntityError, match="rank") as incompatible:
        oai.completions.create(model="too-big", prompt="hi", max_tokens=1)
    assert incompatible.value.status_code == 422


def test_unknown_path_is_an_openai_error_object(serve: ServeProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{serve.http_url}/v1/nothing-here", timeout=10)
    assert missing.value.code == 404
    error = json.loads(missing.value.read())["error"]
    assert error["message"] == "Not Found" and error["code"] is None


def test_http_port_setting_is_checked() -> None:
    assert ServeSettings(http_port=None).problems() == ServeSettings().problems()
    assert any("http_port must be in [0, 65535]" in p for p in ServeSettings(http_port=70000).problems())


def test_http_requests_are_counted(serve: ServeProcess, oai: openai.OpenAI) -> None:
    oai.completions.create(model="a1", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nothing", prompt="hi", max_tokens=1)
    assert serve.metrics_url is not None
    text = urllib.request.urlopen(serve.metrics_url, timeout=10).read().decode()
    assert 'loraswap_requests_total{code="200",method="/v1/completions"}' in text
    assert 'loraswap_requests_total{code="404",method="/v1/completions"}' in text
    assert 'loraswap_time_to_first_token_seconds_count{adapter="a1"}' in text


# --- in process, with the engine stepped by the test -------------------------------------------


@pytest.fixture
def stepped(tiny_base: Path, registry_root: Path) -> Iterator[tuple[Engine, EngineSlot, openai.OpenAI]]:
    """An HTTP server over an engine that is not started: the test runs its steps."""
    engine_config = EngineConfig(
        base=str(tiny_base), registry=str(registry_root), quantization="fp32", adapter_slots=2, max_rank=16,
        max_batch_size=4, max_seq_len=300, max_queue=8,
    )  # fmt: skip
    settings = ServeSettings(engine=engine_config, http_port=0, max_new_tokens=250, grace_seconds=1)
    slot = EngineSlot()
    server = HttpServer(settings, Metrics(), slot)
    port = server.start()
    engine = Engine(engine_config)
    slot.engine = engine
    yield engine, slot, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    server.stop()
    engine.stop(drain_timeout=0)


def test_client_disconnect_mid_stream_cancels_and_frees_the_row(stepped) -> None:
    engine, _, oai = stepped
    rows = engine.kv.free_rows
    got_first = threading.Event()

    def client() -> None:
        stream = oai.completions.create(model="a1", prompt=PROMPT, max_tokens=250, temperature=0, stream=True)
        next(iter(stream))
        got_first.set()
        stream.close()  # hang up mid-stream

    caller = threading.Thread(target=client)
    caller.start()
    while not (engine._running and engine._running[0].output_ids):  # admitted and one token out
        with engine.step_lock:
            engine.take_incoming()
            engine.step()
    state = engine._running[0]
    assert engine.kv.free_rows == rows - 1
    caller.join()  # the engine does not step meanwhile: the request cannot finish on its own
    assert got_first.is_set()
    assert state.cancelled.wait(timeout=30), "the disconnect did not cancel the request"
    with engine.step_lock:
        engine.step()
    assert engine.kv.free_rows == rows and not engine._running
    assert len(state.output_ids) == 1


def _step_until_first_token(engine: Engine, index: int = 0) -> None:
    while not (len(engine._running) > index and engine._running[index].output_ids):
        with engine.step_lock:
            engine.take_incoming()
            engine.step()


def test_client_disconnect_before_a_json_answer_cancels_and_frees_the_row(stepped) -> None:
    engine, _, oai = stepped
    rows = engine.kv.free_rows
    body = json.dumps({"model": "a1", "prompt": PROMPT, "max_tokens": 250, "temperature": 0}).encode()
    port = int(str(oai.base_url).rsplit(":", 1)[1].split("/")[0])
    conn = socket.create_connection(("127.0.0.1", port))
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    conn.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    _step_until_first_token(engine)
    state = engine._running[0]
    assert engine.kv.free_rows == rows - 1
    conn.close()  # hang up while the answer (250 tokens) is far from ready; the engine does not step
    assert state.cancelled.wait(timeout=30), "the disconnect did not cancel the request"
    with engine.step_lock:
        engine.step()
    assert engine.kv.free_rows == rows and not engine._running
    assert len(state.output_ids) == 1


def test_http_generations_past_max_concurrent_rpcs_get_429(tiny_base: Path, registry_root: Path) -> None:
    engine_config = EngineConfig(
        base=str(tiny_base), registry=str(registry_root), quantization="fp32", adapter_slots=2, max_rank=16,
        max_batch_size=4, max_seq_len=300, max_queue=8,
    )  # fmt: skip
    settings = ServeSettings(engine=engine_config, http_port=0, max_concurrent_rpcs=1, grace_seconds=1)
    slot = EngineSlot()
    server = HttpServer(settings, Metrics(), slot)
    port = server.start()
    engine = slot.engine = Engine(engine_config)
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    streams: list = []

    def open_stream() -> None:  # headers come with the first token: the engine must step meanwhile
        stream = oai.completions.create(model="a1", prompt=PROMPT, max_tokens=250, temperature=0, stream=True)
        next(iter(stream))
        streams.append(stream)

    try:
        caller = threading.Thread(target=open_stream)
        caller.start()
        _step_until_first_token(engine)
        caller.join()
        with pytest.raises(openai.RateLimitError) as refused:
            oai.completions.create(model="a1", prompt="hi", max_tokens=1)
        assert refused.value.status_code == 429 and "limit 1" in refused.value.message
        oai.models.list()  # not a generation: not counted
        state = engine._running[0]
        streams.pop().close()
        assert state.cancelled.wait(timeout=30)
        with engine.step_lock:
            engine.step()
        caller = threading.Thread(target=open_stream)
        caller.start()
        _step_until_first_token(engine)  # admitted: the first stream gave its place back
        caller.join()
        streams.pop().close()
    finally:
        server.stop()
        engine.stop(drain_timeout=0)


def test_overloaded_is_429_and_draining_is_503(stepped) -> None:
    engine, slot, oai = stepped
    engine.config.max_queue = 0  # every submit finds the queue full
    with pytest.raises(openai.RateLimitError) as overloaded:
        oai.completions.create(model="a1", prompt="hi", max_tokens=1)
    assert overloaded.value.status_code == 429 and "queue is full" in overloaded.value.message
    engine.config.max_queue = 8
    engine.draining = True
    with pytest.raises(openai.InternalServerError) as draining:
        oai.chat.completions.create(model="a1", messages=CHAT, max_tokens=1)
    assert draining.value.status_code == 503 and draining.value.body["code"] == "draining"
    slot.engine = None  # still loading the base model
    with pytest.raises(openai.InternalServerError, match="starting") as starting:
        oai.models.list()
    assert starting.value.status_code == 503


@pytest.mark.slow
def test_sigterm_drains_http_streams(tiny_base: Path, tmp_path: Path) -> None:
    env = {**os.environ, "LORASWAP_HOME": str(tmp_path / "home")}
    args = ["--port", "0", "--http-port", "0", "--metrics-port", "-1", "--base", str(tiny_base)]
    args += ["--quantization", "fp32", "--max-seq-len", "1100", "--max-new-tokens", "1000"]
    args += ["--grace-seconds", "60"]
    server = start_serve(args, env, timeout=120)
    try:
        oai = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="-", max_retries=0, timeout=60)
        base = oai.models.list().data[0].id
        stream = iter(
            oai.completions.create(
                model=base, prompt=PROMPT, max_tokens=1000, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        first = next(stream)
        server.proc.send_signal(signal.SIGTERM)
        for _ in range(100_000):  # until the server has taken the signal: new requests are then refused
            try:
                oai.completions.create(model=base, prompt="hi", max_tokens=1)
            except openai.InternalServerError as exc:
                assert exc.status_code == 503 and exc.body["code"] == "draining"
                break
        else:
            pytest.fail("no 503 after SIGTERM")
        rest = list(stream)
        assert server.wait(timeout=120) == 0
    finally:
        server.kill()
    text = first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)
    assert rest[-1].usage.completion_tokens == 1000 and len(text) > 0
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert "stopped" in "".join(server.log)

"""The real server on 127.0.0.1 over the real engine on the tiny model, driven over real gRPC."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraswap import errors
from loraswap.errors import PermissionDeniedError, UnauthenticatedError
from loraswap.models import resolve_base
from loraswap.registry import open_registry
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.api import GenerationRequest, SamplingParams
from loraswap.server.grpc.client import AsyncClient, Client, ServerError
from loraswap.server.grpc.pb import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from loraswap.server.grpc.server import GrpcServer
from loraswap.server.metrics import Metrics
from loraswap.server.settings import ServeSettings

pytestmark = pytest.mark.slow

ADAPTERS = {
    "a1": dict(r=4, target_modules=("q_proj", "v_proj"), seed=21),
    "a2": dict(r=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=22),
    "a3": dict(r=16, target_modules=("gate_proj", "up_proj", "down_proj"), seed=23),
    "a4": dict(r=2, target_modules=("o_proj",), seed=24),
    "a5": dict(r=6, target_modules=("v_proj",), seed=25),
    "a6": dict(r=4, target_modules=("k_proj",), seed=26),
}
PROMPTS = ["The quick brown fox", "Paris is the capital", "def add(a, b):", "Adapters are small low"]


@dataclass
class Stack:
    settings: ServeSettings
    engine: Engine
    metrics: Metrics
    server: GrpcServer
    target: str
    metrics_url: str
    digests: dict[str, str]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, make_adapter) -> Path:
    """A local registry: six adapters (tag ``prod``), one over the rank limit, one with a corrupted blob."""
    root = tmp_path_factory.mktemp("registry")
    registry, base = open_registry(root), resolve_base(tiny_base)
    for name, spec in ADAPTERS.items():
        registry.push(make_adapter(**spec), name, tags=["prod"], base=base)
    registry.push(make_adapter(r=32, seed=27), "too-big", base=base)
    corrupt = make_adapter(r=4, seed=28)
    registry.push(corrupt, "corrupt", base=base)
    weights = (corrupt / "adapter_model.safetensors").read_bytes()
    (root / "blobs" / "sha256" / hashlib.sha256(weights).hexdigest()).write_bytes(b"garbage" * 10)
    return root


def serve_settings(tiny_base: Path, registry_root: Path, **overrides) -> ServeSettings:
    engine = EngineConfig(
        base=str(tiny_base),
        registry=str(registry_root),
        quantization="fp32",
        adapter_slots=4,
        max_rank=16,
        max_batch_size=8,
        max_seq_len=300,
        max_queue=64,
    )
    base = ServeSettings(
        engine=engine,
        port=0,
        metrics_port=0,
        metrics_adapters=("a1",),
        max_prompt_chars=200,
        max_new_tokens=250,
        default_max_new_tokens=8,
        max_concurrent_rpcs=32,
        grace_seconds=10,
    )
    return replace(base, **overrides)


def start_server(settings: ServeSettings, engine: Engine | None) -> tuple[GrpcServer, Metrics, str]:
    metrics = Metrics(settings.metrics_adapters)
    server = GrpcServer(settings, metrics)
    port = server.start()
    if engine is not None:
        server.attach(engine)
    return server, metrics, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def stack(tiny_base: Path, registry_root: Path) -> Iterator[Stack]:
    settings = serve_settings(tiny_base, registry_root)
    metrics = Metrics(settings.metrics_adapters)
    server = GrpcServer(settings, metrics)
    port = server.start()
    metrics_port = metrics.serve_http("127.0.0.1", 0)
    engine = Engine(settings.engine, observer=metrics)
    engine.start()
    server.attach(engine)
    registry = open_registry(registry_root)
    digests = {name: registry.resolve(f"{name}:prod").digest for name in ADAPTERS}
    yield Stack(
        settings,
        engine,
        metrics,
        server,
        f"127.0.0.1:{port}",
        f"http://127.0.0.1:{metrics_port}/metrics",
        digests,
    )
    server.shutdown(grace=2)
    metrics.stop_http()


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    with Client(stack.target, timeout=60) as c:
        yield c


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def sample(stack: Stack, name: str, labels: dict[str, str] | None = None) -> float:
    return stack.metrics.registry.get_sample_value(name, labels or {}) or 0.0


# --- serving ---------------------------------------------------------------------------------------


def test_concurrent_mixed_adapters_match_the_engine(stack: Stack, client: Client, greedy) -> None:
    refs = ["", "a1", "a2:prod", f"a3@{stack.digests['a3']}", "a4", "a1:prod"]
    # greedy, and seeded sampling (the seed travels through the proto): reproducible whatever the batch
    samplings = [greedy(10), SamplingParams(10, temperature=0.9, top_k=40, top_p=0.95, seed=7)]
    jobs = [(ref, PROMPTS[i % len(PROMPTS)], samplings[i % 2]) for i, ref in enumerate(refs * 2)]
    direct = [
        stack.engine.generate(GenerationRequest(adapter=ref, prompt=prompt, sampling=sampling))
        for ref, prompt, sampling in jobs
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        over_grpc = list(pool.map(lambda job: client.generate(job[1], adapter=job[0], sampling=job[2]), jobs))
    for (ref, _, _), want, got in zip(jobs, direct, over_grpc, strict=True):
        assert got.token_ids == want.token_ids and got.text == want.text, ref
        assert got.adapter_digest == want.adapter_digest
        assert got.finish_reason == want.finish_reason and got.completion_tokens == want.completion_tokens
        assert got.timings.total_s >= got.timings.ttft_s > 0
    assert over_grpc[2].adapter_digest == stack.digests["a2"] and over_grpc[0].adapter_digest == ""


def test_stream_matches_unary_and_ends_with_usage(stack: Stack, client: Client, greedy) -> None:
    unary = client.generate("Paris is", adapter="a2", sampling=greedy(12))
    events = list(client.stream("Paris is", adapter="a2", sampling=greedy(12)))
    assert len(events) == 12 and all(e.result is None for e in events[:-1])
    assert "".join(e.text for e in events) == unary.text
    last = events[-1].result
    assert last is not None and last.token_ids == unary.token_ids and last.finish_reason == "length"
    assert last.completion_tokens == 12 and last.prompt_tokens == unary.prompt_tokens
    assert last.adapter_digest == stack.digests["a2"]
    stub = inference_pb2_grpc.InferenceStub(client.channel)
    raw = list(stub.GenerateStream(inference_pb2.GenerateRequest(prompt="Paris is", max_new_tokens=3)))
    reasons = [m.finish_reason for m in raw]
    assert reasons[:-1] == [inference_pb2.FINISH_REASON_UNSPECIFIED] * (len(raw) - 1)
    assert reasons[-1] != inference_pb2.FINISH_REASON_UNSPECIFIED and raw[-1].usage.completion_tokens == len(
        raw
    )


def test_chat_request(client: Client, greedy) -> None:
    from loraswap.server.engine.api import ChatMessage

    result = client.generate(messages=[ChatMessage("user", "hello")], adapter="a1", sampling=greedy(4))
    assert result.completion_tokens >= 1 and result.prompt_tokens > 2


def test_async_client(stack: Stack, greedy) -> None:
    async def run() -> tuple:
        async with AsyncClient(stack.target, timeout=60) as c:
            one = await c.generate("The quick", adapter="a1", sampling=greedy(6))
            events = [e async for e in c.stream("The quick", adapter="a1", sampling=greedy(6))]
            return one, events, await c.list_adapters(), await c.info()

    one, events, adapters, info = asyncio.run(run())
    assert events[-1].result is not None and events[-1].result.token_ids == one.token_ids
    assert "a1" in {a.name for a in adapters} and info.max_rank == 16


# --- error codes -----------------------------------------------------------------------------------


def test_error_codes_from_the_engine(stack: Stack, client: Client) -> None:
    stub = inference_pb2_grpc.InferenceStub(client.channel)

    def gen(**kw) -> Callable[[], object]:
        return lambda: stub.Generate(inference_pb2.GenerateRequest(**{"prompt": "hi", **kw}), timeout=30)

    assert code_of(gen(adapter="nope"))[0] == grpc.StatusCode.NOT_FOUND
    code, details = code_of(gen(adapter="too-big"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "rank" in details.lower()
    assert code_of(gen(adapter="corrupt"))[0] == grpc.StatusCode.DATA_LOSS
    assert code_of(gen(adapter="Bad Name!"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = code_of(
        gen(prompt="x" * 201, max_new_tokens=251, sampling=inference_pb2.SamplingParameters(temperature=-1))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "201 characters" in details and "max_new_tokens 251" in details and "temperature" in details
    assert code_of(gen(prompt=""))[0] == grpc.StatusCode.INVALID_ARGUMENT  # engine: empty prompt
    stream = stub.GenerateStream(inference_pb2.GenerateRequest(prompt="hi", adapter="nope"), timeout=30)
    assert code_of(lambda: list(stream))[0] == grpc.StatusCode.NOT_FOUND
    with pytest.raises(errors.NotFoundError):
        client.generate("hi", adapter="nope")
    with pytest.raises(errors.FailedPreconditionError, match="rank"):
        client.load_adapter("too-big")


def test_full_queue_is_resource_exhausted(stack: Stack, client: Client) -> None:
    saved = stack.engine.config.max_queue
    stack.engine.config.max_queue = 0  # every submit finds the queue full
    try:
        with pytest.raises(errors.OverloadedError):
            client.generate("hi")
    finally:
        stack.engine.config.max_queue = saved
    assert sample(
        stack,
        "loraswap_requests_total",
        {"method": "/loraswap.v1.Inference/Generate", "code": "RESOURCE_EXHAUSTED"},
    )


def test_concurrent_rpc_limit(stack: Stack, tiny_base: Path, registry_root: Path, greedy) -> None:
    settings = serve_settings(tiny_base, registry_root, max_concurrent_rpcs=1, max_message_bytes=1024)
    server, _, target = start_server(settings, stack.engine)
    try:
        with Client(target, timeout=30) as c:
            with pytest.raises(errors.OverloadedError, match="message larger than max"):
                c.generate("x" * 2000)  # over max_message_bytes
            stream = c.stream("The quick", sampling=greedy(250))
            next(stream)  # one stream in progress
            with pytest.raises(errors.OverloadedError):
                c.generate("hi")
            stream.close()
    finally:
        server.server.stop(None)


def test_deadline_exceeded_drops_the_work(stack: Stack, client: Client, greedy) -> None:
    engine = stack.engine
    labels = {"method": "/loraswap.v1.Inference/Generate", "code": "DEADLINE_EXCEEDED"}
    before = sample(stack, "loraswap_requests_total", labels)

    def queued() -> list:  # incoming first: a request moving to waiting meanwhile is seen, maybe twice
        return list({id(s): s for s in [*engine._incoming, *engine._waiting]}.values())

    def ended(state) -> bool:  # the engine knows the call is over: cancelled by its end, or past its deadline
        return state.cancelled.is_set() or time.monotonic() > (state.request.deadline or float("inf"))

    with engine.step_lock:  # no engine step while this is held: the deadline passes before the work runs
        with pytest.raises(errors.DeadlineExceededError):
            client.generate("The quick", sampling=greedy(250), timeout=0.5)
        assert wait_for(lambda: [ended(s) for s in queued()] == [True])
        (state,) = queued()
    assert wait_for(lambda: sample(stack, "loraswap_requests_total", labels) > before)  # the handler returned
    assert state.output_ids == [] and engine.kv.free_rows == engine.config.max_batch_size  # none of it ran


def test_client_cancellation_frees_the_batch_slot(stack: Stack, client: Client) -> None:
    stub = inference_pb2_grpc.InferenceStub(client.channel)
    request = inference_pb2.GenerateRequest(
        prompt="The quick", max_new_tokens=240, sampling=inference_pb2.SamplingParameters(ignore_eos=True)
    )
    engine = stack.engine
    before = sample(stack, "loraswap_inter_token_latency_seconds_count")
    call = stub.GenerateStream(request, timeout=60)
    next(call), next(call)
    with engine.step_lock:  # no step runs until the cancellation has reached the engine
        [state] = engine._running
        call.cancel()
        assert wait_for(state.cancelled.is_set, timeout=10)
        emitted = len(state.output_ids)
    assert wait_for(lambda: engine.kv.free_rows == engine.config.max_batch_size, timeout=10)
    assert len(state.output_ids) == emitted < 240  # dropped at the next step: no token after the cancel
    inter_token = sample(stack, "loraswap_inter_token_latency_seconds_count") - before
    assert inter_token == emitted - 1
    labels = {"method": "/loraswap.v1.Inference/GenerateStream", "code": "CANCELLED"}
    assert wait_for(lambda: sample(stack, "loraswap_requests_total", labels) >= 1)


def test_starting_server_is_unavailable_and_not_serving(tiny_base: Path, registry_root: Path) -> None:
    server, _, target = start_server(serve_settings(tiny_base, registry_root), engine=None)
    try:
        with Client(target, timeout=10) as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(ServerError) as info:
                c.generate("hi")
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and "loading" in str(info.value)
    finally:
        server.shutdown(grace=0)


# --- security --------------------------------------------------------------------------------------


def test_tokens_and_admin_separation(stack: Stack, tiny_base: Path, registry_root: Path, greedy) -> None:
    settings = serve_settings(tiny_base, registry_root, inference_tokens=("inf-1",), admin_tokens=("adm-1",))
    server, _, target = start_server(settings, stack.engine)
    try:
        for token, reason in ((None, "missing bearer token"), ("wrong", "unknown bearer token")):
            refused = pytest.raises(UnauthenticatedError, match=reason)
            with Client(target, token=token, timeout=30) as c, refused:
                c.generate("hi", sampling=greedy(2))
        with Client(target, token="inf-1", timeout=30) as c:
            assert c.generate("hi", sampling=greedy(2)).completion_tokens >= 1
            for call in (lambda: c.load_adapter("a1"), lambda: c.unload_adapter("a1"), lambda: c.pin("a1")):
                with pytest.raises(PermissionDeniedError, match="Admin needs an admin token"):
                    call()
            health = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
        with Client(target, token="adm-1", timeout=30) as c:
            assert c.generate("hi", sampling=greedy(2)).completion_tokens >= 1
            assert c.load_adapter("a6").name == "a6" and c.info().base_model
    finally:
        server.server.stop(None)


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())

    def cert(subject: str, key, issuer_key, ca: bool, san: list | None = None) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name("loraswap test CA"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    out = {}
    ca_cert = cert("loraswap test CA", ca_key, ca_key, ca=True)
    out["ca"] = folder / "ca.pem"
    out["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        c = cert(who, key, ca_key, ca=False, san=san if who == "server" else None)
        out[who] = folder / f"{who}.pem"
        out[who].write_bytes(c.public_bytes(serialization.Encoding.PEM))
        out[f"{who}-key"] = folder / f"{who}-key.pem"
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        out[f"{who}-key"].write_bytes(pem)
    return out


def test_tls_and_client_certificates(
    stack: Stack, tiny_base: Path, registry_root: Path, tmp_path: Path, greedy
) -> None:
    pem = _certificates(tmp_path)
    tls = {"tls_cert": str(pem["server"]), "tls_key": str(pem["server-key"])}
    server, _, target = start_server(serve_settings(tiny_base, registry_root, **tls), stack.engine)
    try:
        with Client(target, root_certificates=pem["ca"], timeout=30) as c:
            assert c.generate("hi", sampling=greedy(2)).completion_tokens >= 1
        with Client(target, timeout=5) as c, pytest.raises(ServerError):  # plaintext to a TLS port
            c.generate("hi", sampling=greedy(2))
    finally:
        server.server.stop(None)
    mtls = serve_settings(tiny_base, registry_root, tls_client_ca=str(pem["ca"]), **tls)
    server, _, target = start_server(mtls, stack.engine)
    try:
        with Client(target, root_certificates=pem["ca"], timeout=5) as c, pytest.raises(ServerError):
            c.generate("hi", sampling=greedy(2))  # no client certificate
        certs = {"client_cert": pem["client"], "client_key": pem["client-key"]}
        with Client(target, root_certificates=pem["ca"], timeout=30, **certs) as c:
            assert c.generate("hi", sampling=greedy(2)).completion_tokens >= 1
    finally:
        server.server.stop(None)


# --- admin, health, reflection -----------------------------------------------------------------------


def test_admin_lifecycle(stack: Stack, client: Client) -> None:
    status = client.load_adapter("a4:prod", tier="host")
    assert status.name == "a4" and "host" in status.tiers and status.digest == stack.digests["a4"]
    assert "device" in client.load_adapter("a4").tiers
    pinned = client.pin("a4")
    assert pinned.pinned and "device" in pinned.tiers
    listed = {a.name: a for a in client.list_adapters()}
    assert listed["a4"].pinned and listed["a4"].rank == 2 and listed["a4"].size_bytes > 0
    assert not client.unpin("a4").pinned
    client.unload_adapter("a4")
    after = {a.name: a for a in client.list_adapters()}.get("a4")
    assert after is None or not {"device", "host"} & set(after.tiers)
    with pytest.raises(errors.NotFoundError):
        client.load_adapter("nope")
    info = client.info()
    assert info.base_fingerprint == stack.engine.info().base_fingerprint and info.max_seq_len == 300
    raw = admin_pb2_grpc.AdminStub(client.channel).ServerInfo(admin_pb2.ServerInfoRequest(), timeout=10)
    assert raw.limits.max_new_tokens == 250 and raw.limits.max_concurrent_rpcs == 32 and raw.versions["torch"]


def test_health_and_reflection(stack: Stack, client: Client) -> None:
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "loraswap.v1.Inference", "loraswap.v1.Admin"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
    services = {
        s.name for r in reflect.ServerReflectionInfo(iter(ask)) for s in r.list_services_response.service
    }
    assert {"loraswap.v1.Inference", "loraswap.v1.Admin", "grpc.health.v1.Health"} <= services
    # call Generate with nothing but what reflection serves (no generated stubs)
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    ask = [reflection_pb2.ServerReflectionRequest(file_containing_symbol="loraswap.v1.Inference")]
    pool = descriptor_pool.DescriptorPool()
    for response in reflect.ServerReflectionInfo(iter(ask)):
        for blob in response.file_descriptor_response.file_descriptor_proto:
            pool.Add(descriptor_pb2.FileDescriptorProto.FromString(blob))
    method = pool.FindServiceByName("loraswap.v1.Inference").FindMethodByName("Generate")
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = client.channel.unary_unary(
        "/loraswap.v1.Inference/Generate",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    response = call(request_cls(prompt="hi", max_new_tokens=3), timeout=30)
    assert response.usage.completion_tokens >= 1


def test_cli_commands_against_the_server(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    from loraswap.cli import main

    target = ["--target", stack.target]
    assert main(["generate", *target, "--adapter", "a1", "--max-new-tokens", "5", "The quick"]) == 0
    captured = capsys.readouterr()
    assert "generated" in captured.err and captured.out
    assert main(["adapters", "load", *target, "a5"]) == 0
    assert main(["adapters", "list", *target]) == 0
    assert "a5" in capsys.readouterr().out
    assert main(["info", *target]) == 0
    assert '"base_fingerprint"' in capsys.readouterr().out
    assert main(["generate", *target, "--adapter", "nope", "hi"]) == 1
    assert "not found" in capsys.readouterr().err


def test_drain_finishes_in_flight_and_refuses_new(tiny_base: Path, registry_root: Path, greedy) -> None:
    settings = serve_settings(tiny_base, registry_root, max_new_tokens=1000)
    settings.engine = replace(settings.engine, max_seq_len=1100)
    engine = Engine(settings.engine)
    engine.start()
    server, _, target = start_server(settings, engine)
    with Client(target, timeout=60) as c:
        health = health_pb2_grpc.HealthStub(c.channel)
        stream = c.stream("The quick", sampling=greedy(1000))
        first = next(stream)
        with engine.step_lock:  # the stream cannot finish while the drain is checked
            stopper = threading.Thread(target=server.shutdown, args=(10.0,))
            stopper.start()
            assert wait_for(lambda: engine.draining, timeout=5)
            check = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(ServerError) as info:
                c.generate("hi", sampling=greedy(2))
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)
        stopper.join(timeout=20)
    assert rest[-1].result is not None and rest[-1].result.completion_tokens == 1000
    assert "".join(e.text for e in [first, *rest]) == rest[-1].result.text


# --- metrics -----------------------------------------------------------------------------------------


def scrape(stack: Stack) -> tuple[str, dict[tuple[str, frozenset], float]]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(stack.metrics_url, timeout=10) as response:
        text = response.read().decode()
    values = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, values


def total(values: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and want <= ls)


def test_metrics_move_on_cold_and_warm_requests(
    stack: Stack, client: Client, registry_root: Path, tiny_base: Path, make_adapter, greedy
) -> None:
    open_registry(registry_root).push(make_adapter(r=4, seed=29), "fresh", base=resolve_base(tiny_base))
    client.generate("hi", adapter="a1", sampling=greedy(1))  # a1 warm
    _, before = scrape(stack)
    client.generate("hi", adapter="fresh", sampling=greedy(3))
    _, cold = scrape(stack)
    client.generate("hi", adapter="fresh", sampling=greedy(3))
    client.generate("hi", adapter="a1", sampling=greedy(3))
    text, warm = scrape(stack)

    def delta(a: dict, b: dict, name: str, **labels: str) -> float:
        return total(b, name, **labels) - total(a, name, **labels)

    assert delta(before, cold, "loraswap_adapter_loads_total") == 1
    assert delta(before, cold, "loraswap_adapter_load_duration_seconds_count") == 1
    assert delta(before, cold, "loraswap_adapter_cache_lookups_total", tier="device") == 1
    assert delta(before, cold, "loraswap_adapter_cache_hits_total", tier="device") == 0  # a miss
    assert delta(cold, warm, "loraswap_adapter_loads_total") == 0
    assert delta(cold, warm, "loraswap_adapter_cache_hits_total", tier="device") == 2  # warm: hits
    ok = {"method": "/loraswap.v1.Inference/Generate", "code": "OK"}
    assert delta(before, warm, "loraswap_requests_total", **ok) == 3
    generate = {"method": "/loraswap.v1.Inference/Generate"}
    assert delta(before, warm, "loraswap_rpc_duration_seconds_count", **generate) == 3
    assert (
        delta(before, warm, "loraswap_generated_tokens_total", adapter="other") == 6
    )  # "fresh" is untracked
    assert delta(before, warm, "loraswap_generated_tokens_total", adapter="a1") == 3
    assert delta(before, warm, "loraswap_request_duration_seconds_count") == 3
    # A step is observed once it has run, after its tokens went out: the step that ended the last reply
    # may be counted just after that reply reached the client. Re-scrape until it is (a bounded number of
    # times; each scrape is one HTTP round trip, so the step thread gets a turn between them).
    for _ in range(50):
        if delta(before, warm, "loraswap_batch_size_count") >= 9:
            break
        time.sleep(0.02)
        text, warm = scrape(stack)
    assert delta(before, warm, "loraswap_batch_size_count") >= 9
    assert total(warm, "loraswap_adapter_cache_resident_adapters", tier="device") >= 1
    assert total(warm, "loraswap_adapter_cache_resident_bytes", tier="host") > 0
    assert total(warm, "loraswap_host_memory_rss_bytes") > 0
    assert total(warm, "loraswap_build_info", slots="4", max_rank="16", quantization="fp32") == 1
    adapter_labels = {dict(ls).get("adapter") for (n, ls) in warm if n.startswith("loraswap_")} - {None}
    assert adapter_labels <= {"a1", "other", "base"}
    check_metric_names(text)


def check_metric_names(text: str) -> None:
    """Naming rules: loraswap_ prefix, counters end in _total, durations in _seconds, sizes in _bytes;
    and promtool's linter, when installed."""
    import re
    import shutil
    import subprocess

    from prometheus_client.parser import text_string_to_metric_families

    from loraswap.server.metrics import LORA_INFO_METRIC

    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue  # creation timestamps that prometheus_client adds to counters and histograms
        if family.name == LORA_INFO_METRIC:
            continue  # vLLM's gauge under vLLM's name, for the inference gateways that read it
        assert re.fullmatch(r"loraswap_[a-z][a-z0-9_]*", family.name), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if any(w in family.name for w in ("duration", "latency", "time_")):
            assert family.name.endswith("_seconds"), family.name
        if any(w in family.name for w in ("memory", "bytes")) and "adapters" not in family.name:
            assert family.name.endswith("_bytes"), family.name
    if shutil.which("promtool"):
        result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        # The one lint finding allowed: the colon in vLLM's name (promtool reserves colons for rules).
        problems = [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if line.strip() and not line.startswith(f"{LORA_INFO_METRIC} metric names should not contain ':'")
        ]
        assert problems == [], problems

"""The gRPC layer's pieces that need no engine: codegen, conversion, auth, error mapping, settings, and a
real server before an engine is attached (health, reflection, call metrics)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from loraswap import errors
from loraswap.devtools import protogen
from loraswap.docfields import field_docs
from loraswap.errors import PermissionDeniedError, UnauthenticatedError
from loraswap.server.auth import TokenAuth, bearer_token
from loraswap.server.engine import EngineConfig
from loraswap.server.engine.api import (
    AdapterStatus,
    ChatMessage,
    EngineInfo,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Timings,
    TokenEvent,
)
from loraswap.server.grpc import convert
from loraswap.server.grpc.client import ServerError, translate
from loraswap.server.grpc.interceptors import ErrorInterceptor
from loraswap.server.grpc.pb import admin_pb2, admin_pb2_grpc, inference_pb2
from loraswap.server.grpc.server import RPC_METHODS, GrpcServer
from loraswap.server.grpc.status import (
    INTERNAL_MESSAGE,
    SERVER_ONLY_CODES,
    STATUS_TABLE,
    error_class_for,
    status_for,
)
from loraswap.server.metrics import Metrics
from loraswap.server.settings import ServeSettings, load_settings

# --- codegen -------------------------------------------------------------------------------------


def test_generated_code_is_up_to_date() -> None:
    assert protogen.stale_files() == [], "run: python -m loraswap.devtools.protogen"


def test_generated_code_imports_under_loraswap_namespace() -> None:
    for path in protogen.OUT_DIR.glob("*_pb2*.py"):
        text = path.read_text()
        assert "from loraswap.v1" not in text and "import loraswap.v1" not in text, path
    assert inference_pb2.DESCRIPTOR.package == "loraswap.v1"
    assert "loraswap.v1" not in sys.modules


def test_protogen_check_reports_stale(tmp_path: Path) -> None:
    assert protogen.main(["--check", "--out", str(tmp_path)]) == 1
    assert protogen.main(["--out", str(tmp_path)]) == 0
    assert protogen.main(["--check", "--out", str(tmp_path)]) == 0


# --- conversion ----------------------------------------------------------------------------------

SETTINGS = ServeSettings(max_prompt_chars=50, max_new_tokens=64, default_max_new_tokens=16)


def test_request_round_trip() -> None:
    req = GenerationRequest(
        adapter="bot:prod",
        messages=(ChatMessage("system", "be brief"), ChatMessage("user", "hi")),
        sampling=SamplingParams(max_new_tokens=9, temperature=0.7, top_k=5, top_p=0.9, seed=42, stop=("\n",)),
        request_id="r1",
    )
    back = convert.request_from_pb(convert.request_to_pb(req), SETTINGS, deadline=12.5)
    assert back == GenerationRequest(**{**req.__dict__, "deadline": 12.5})


def test_request_defaults_from_unset_fields() -> None:
    req = convert.request_from_pb(inference_pb2.GenerateRequest(prompt="hello"), SETTINGS)
    assert req.prompt == "hello" and req.adapter == "" and req.deadline is None
    assert req.sampling == SamplingParams(max_new_tokens=16)


def test_invalid_request_lists_every_problem() -> None:
    pb = inference_pb2.GenerateRequest(
        prompt="x" * 51,
        max_new_tokens=65,
        sampling=inference_pb2.SamplingParameters(temperature=-1, top_p=0.0, repetition_penalty=-2),
        stop=[""],
    )
    with pytest.raises(errors.InvalidArgumentError) as info:
        convert.request_from_pb(pb, SETTINGS)
    text = str(info.value)
    assert len(info.value.problems) == 6, text
    for needle in (
        "51 characters",
        "max_new_tokens 65",
        "temperature",
        "top_p",
        "repetition_penalty",
        "stop",
    ):
        assert needle in text


def test_missing_input_and_empty_chat_are_invalid() -> None:
    with pytest.raises(errors.InvalidArgumentError, match="one of prompt or chat"):
        convert.request_from_pb(inference_pb2.GenerateRequest(), SETTINGS)
    pb = inference_pb2.GenerateRequest(chat=inference_pb2.Chat())
    with pytest.raises(errors.InvalidArgumentError, match="at least one message"):
        convert.request_from_pb(pb, SETTINGS)


def test_result_and_stream_events_round_trip() -> None:
    result = GenerationResult(
        text="ab",
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=2,
        adapter_digest="sha256:" + "0" * 64,
        token_ids=(5, 6),
        timings=Timings(0.25, 0.5, 1.0),
    )
    assert convert.result_from_pb(convert.result_to_pb(result)) == result
    first = convert.event_to_pb(TokenEvent("a", (5,)))
    assert first.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED and not first.HasField("usage")
    assert convert.event_from_pb(first, "a", (5,)) == TokenEvent("a", (5,))
    last = convert.event_from_pb(convert.event_to_pb(TokenEvent("b", (6,), result)), "ab", (5, 6))
    assert last == TokenEvent("b", (6,), result)


def test_admin_messages_round_trip() -> None:
    status = AdapterStatus("bot", "sha256:" + "1" * 64, ("device", "host"), True, 1024, 8, 3, 1_700_000_000.5)
    assert convert.status_from_pb(convert.status_to_pb(status)) == status
    never = AdapterStatus("bot", "d", ("disk",), False, 1, 1, 0, 0.0)
    assert not convert.status_to_pb(never).HasField("last_used")
    assert convert.tier_from_pb(admin_pb2.TIER_UNSPECIFIED) == "device"
    with pytest.raises(errors.InvalidArgumentError):
        convert.tier_from_pb(99)
    info = EngineInfo("tiny", "sha256:f", "fp32", "float32", "cpu", 4, 16, 8, 96, 10, 1 << 20, {"torch": "2"})
    pb = convert.info_to_pb(info, SETTINGS)
    assert pb.limits.max_prompt_chars == 50 and pb.limits.max_new_tokens == 64
    assert convert.info_from_pb(pb) == info


# --- auth ----------------------------------------------------------------------------------------

INFER, ADMIN = "/loraswap.v1.Inference/Generate", "/loraswap.v1.Admin/LoadAdapter"


def md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_bearer_token_parsing() -> None:
    assert bearer_token(md("abc")) == "abc"
    assert bearer_token([("Authorization", "bearer  xyz ")]) == "xyz"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token(None) is None


def test_token_auth_separates_inference_and_admin() -> None:
    auth = TokenAuth(inference_tokens=["inf"], admin_tokens=["adm"])
    auth.check(INFER, md("inf"))
    auth.check(INFER, md("adm"))
    auth.check(ADMIN, md("adm"))
    with pytest.raises(PermissionDeniedError):
        auth.check(ADMIN, md("inf"))
    for metadata in (None, md("wrong"), [("authorization", "Basic inf")]):
        with pytest.raises(UnauthenticatedError):
            auth.check(INFER, metadata)
    auth.check("/grpc.health.v1.Health/Check", None)  # probes need no token
    TokenAuth().check(ADMIN, None)  # no tokens configured: open


# --- error mapping -------------------------------------------------------------------------------

EXPECTED_CODES = {
    errors.NotFoundError("x"): grpc.StatusCode.NOT_FOUND,
    errors.InvalidArgumentError("x", ["a"]): grpc.StatusCode.INVALID_ARGUMENT,
    errors.AdapterValidationError("x"): grpc.StatusCode.INVALID_ARGUMENT,
    errors.IncompatibleAdapterError("x"): grpc.StatusCode.FAILED_PRECONDITION,
    errors.OverloadedError("x"): grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DrainingError("x"): grpc.StatusCode.UNAVAILABLE,
    errors.RegistryUnavailableError("x"): grpc.StatusCode.UNAVAILABLE,
    errors.MissingDependencyError("x"): grpc.StatusCode.FAILED_PRECONDITION,
    errors.ConflictError("x"): grpc.StatusCode.ABORTED,
    errors.IntegrityError("x"): grpc.StatusCode.DATA_LOSS,
    errors.CancelledError("x"): grpc.StatusCode.CANCELLED,
    errors.DeadlineExceededError("x"): grpc.StatusCode.DEADLINE_EXCEEDED,
    UnauthenticatedError("x"): grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError("x"): grpc.StatusCode.PERMISSION_DENIED,
    RuntimeError("secret /path"): grpc.StatusCode.INTERNAL,
}


# what the client raises for each, where it is not the server's class
CLIENT_RAISES = {
    errors.AdapterValidationError: errors.InvalidArgumentError,  # travels as its table ancestor
    errors.IncompatibleAdapterError: errors.FailedPreconditionError,
    errors.MissingDependencyError: errors.FailedPreconditionError,
    errors.DrainingError: ServerError,
    errors.RegistryUnavailableError: ServerError,
    errors.UnavailableError: ServerError,  # UNAVAILABLE is also "no server answered"
    RuntimeError: ServerError,  # INTERNAL
}


def test_status_table_covers_every_domain_error() -> None:
    mapped = {cls for cls, _ in STATUS_TABLE}
    domain = {
        c
        for name, c in vars(errors).items()
        if isinstance(c, type) and issubclass(c, errors.LoraswapError) and not name.startswith("_")
    }
    # every domain error has a table ancestor (itself or a base class), so none reaches a caller as INTERNAL
    assert all(any(issubclass(c, m) for m in mapped) for c in domain - {errors.LoraswapError})
    for exc, code in EXPECTED_CODES.items():
        assert status_for(exc)[0] == code
    assert status_for(RuntimeError("secret"))[1] == INTERNAL_MESSAGE
    assert status_for(errors.LoraswapError("base"))[0] == grpc.StatusCode.INTERNAL


def test_status_table_round_trips() -> None:
    """error → code → error class, for every entry; where rows share a code, the client raises the one
    class all of them derive from; no entry shadowed by an earlier."""
    for i, (cls, code) in enumerate(STATUS_TABLE):
        assert status_for(cls("x")) == (code, "x")
        if code in SERVER_ONLY_CODES:
            assert error_class_for(code) is None and CLIENT_RAISES[cls] is ServerError
        else:
            assert issubclass(cls, error_class_for(code))
            assert CLIENT_RAISES.get(cls, cls) is error_class_for(code)
        assert not any(issubclass(cls, earlier) for earlier, _ in STATUS_TABLE[:i]), cls
    assert {grpc.StatusCode.UNAVAILABLE} == SERVER_ONLY_CODES
    for code in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED):
        assert error_class_for(code) is None


def test_http_and_grpc_read_one_table() -> None:
    """Each domain error's HTTP answer and gRPC code come from the same row of loraswap.server.status."""
    from loraswap.server.http.app import _error_of
    from loraswap.server.status import STATUSES

    for row in STATUSES:
        response = _error_of(row.error("x"))
        body = json.loads(bytes(response.body))["error"]
        assert (response.status_code, body["type"], body["code"]) == (row.http, row.kind, row.code)
        assert status_for(row.error("x"))[0] == grpc.StatusCode[row.grpc]
    assert _error_of(RuntimeError("secret")).status_code == 500


@pytest.fixture(scope="module")
def raising_server():
    """A real gRPC server whose one method raises the exception named by the request bytes."""
    by_name = {type(e).__name__ + str(i): e for i, e in enumerate(EXPECTED_CODES)}
    calls: list[tuple[str, grpc.StatusCode]] = []

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        raise by_name[request.decode()]

    def stream(request: bytes, context: grpc.ServicerContext):
        yield b"first"
        raise by_name[request.decode()]

    def set_code(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_code(grpc.StatusCode.NOT_FOUND)  # like the health service for an unknown name
        return b""

    def set_code_stream(request: bytes, context: grpc.ServicerContext):
        yield b"first"
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)

    def abort(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "SetCode": grpc.unary_unary_rpc_method_handler(set_code),
        "SetCodeStream": grpc.unary_stream_rpc_method_handler(set_code_stream),
        "Abort": grpc.unary_unary_rpc_method_handler(abort),
    }
    from concurrent import futures

    server = grpc.server(
        futures.ThreadPoolExecutor(2), interceptors=[ErrorInterceptor(lambda m, c, s: calls.append((m, c)))]
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Raise", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel, by_name, calls
    channel.close()
    server.stop(None)


def test_interceptor_maps_errors_on_unary_and_stream(raising_server) -> None:
    channel, by_name, calls = raising_server
    unary = channel.unary_unary("/test.Raise/Unary")
    stream = channel.unary_stream("/test.Raise/Stream")
    for key, exc in by_name.items():
        code = EXPECTED_CODES[exc]
        with pytest.raises(grpc.RpcError) as info:
            unary(key.encode(), timeout=10)
        assert info.value.code() == code
        if code == grpc.StatusCode.INTERNAL:
            assert info.value.details() == INTERNAL_MESSAGE  # nothing of "secret /path" leaks
        else:
            assert info.value.details() == str(exc)
        got = []
        with pytest.raises(grpc.RpcError) as info:
            got.extend(stream(key.encode(), timeout=10))
        assert got == [b"first"] and info.value.code() == code
    assert ("/test.Raise/Unary", grpc.StatusCode.NOT_FOUND) in calls
    assert ("/test.Raise/Stream", grpc.StatusCode.DATA_LOSS) in calls


def test_interceptor_counts_the_code_a_handler_set_itself(raising_server) -> None:
    """A handler that sets a code on the context (or aborts) ends with that code, and is counted with it."""
    channel, _, calls = raising_server
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/test.Raise/SetCode")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert calls[-1] == ("/test.Raise/SetCode", grpc.StatusCode.NOT_FOUND)
    got = []
    with pytest.raises(grpc.RpcError) as info:
        got.extend(channel.unary_stream("/test.Raise/SetCodeStream")(b"", timeout=10))
    assert got == [b"first"] and info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert calls[-1] == ("/test.Raise/SetCodeStream", grpc.StatusCode.FAILED_PRECONDITION)
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/test.Raise/Abort")(b"", timeout=10)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.PERMISSION_DENIED, "not yours")
    assert calls[-1] == ("/test.Raise/Abort", grpc.StatusCode.PERMISSION_DENIED)


def test_client_translates_codes_back(raising_server) -> None:
    channel, by_name, _ = raising_server
    unary = channel.unary_unary("/test.Raise/Unary")
    for key, exc in by_name.items():
        with pytest.raises(grpc.RpcError) as info:
            unary(key.encode(), timeout=10)
        domain = translate(info.value)
        assert type(domain) is CLIENT_RAISES.get(type(exc), type(exc)), key
        if isinstance(domain, ServerError):
            assert domain.code == EXPECTED_CODES[exc]
        else:
            assert str(domain) == str(exc)


# --- a real server with no engine yet: health, reflection, call metrics ------------------------------


@pytest.fixture(scope="module")
def bare_server():
    """A real :class:`GrpcServer` on 127.0.0.1 before an engine is attached (health NOT_SERVING, calls
    UNAVAILABLE): everything but the engine's calls answers."""
    metrics = Metrics()
    server = GrpcServer(ServeSettings(port=0, max_concurrent_rpcs=8), metrics)
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield metrics, channel
    channel.close()
    server.shutdown(grace=0)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


CHECK = "/grpc.health.v1.Health/Check"


def test_health_check_of_an_unknown_service_is_counted_not_found(bare_server) -> None:
    metrics, channel = bare_server
    health = health_pb2_grpc.HealthStub(channel)

    def checks(code: str) -> float:
        return sample(metrics, "loraswap_requests_total", method=CHECK, code=code)

    ok, not_found = checks("OK"), checks("NOT_FOUND")
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert (checks("OK"), checks("NOT_FOUND")) == (ok, not_found + 1)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert (checks("OK"), checks("NOT_FOUND")) == (ok + 1, not_found + 1)


def test_rpc_latency_is_observed_per_registered_method(bare_server) -> None:
    metrics, channel = bare_server
    info_method = "/loraswap.v1.Admin/ServerInfo"
    assert {CHECK, info_method, "/loraswap.v1.Inference/GenerateStream"} <= set(RPC_METHODS)
    duration = "loraswap_rpc_duration_seconds"
    before = sample(metrics, f"{duration}_count", method=info_method)
    with pytest.raises(grpc.RpcError) as info:
        admin_pb2_grpc.AdminStub(channel).ServerInfo(admin_pb2.ServerInfoRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # no engine yet
    assert sample(metrics, f"{duration}_count", method=info_method) == before + 1
    assert sample(metrics, f"{duration}_bucket", method=info_method, le="+Inf") == before + 1
    assert sample(metrics, "loraswap_requests_total", method=info_method, code="UNAVAILABLE") >= 1
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/made.Up/Method")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    labels = {s.labels.get("method") for family in metrics.registry.collect() for s in family.samples}
    assert labels - {None} <= set(RPC_METHODS) | {"other"}


def test_reflection_answers_v1_and_v1alpha(bare_server) -> None:
    """grpc.reflection.v1 and v1alpha carry the same messages on the wire: v1alpha's classes encode both."""
    _, channel = bare_server
    request = reflection_pb2.ServerReflectionRequest
    asks = [
        request(list_services=""),
        request(file_containing_symbol="loraswap.v1.Inference"),
        request(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    ]
    for version in ("v1", "v1alpha"):
        info = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=request.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        listed, inference, v1 = list(info(iter(asks), timeout=10))
        names = {s.name for s in listed.list_services_response.service}
        assert {"loraswap.v1.Inference", "loraswap.v1.Admin", "grpc.health.v1.Health"} <= names, version
        assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
        blobs = inference.file_descriptor_response.file_descriptor_proto
        assert any(FileDescriptorProto.FromString(b).package == "loraswap.v1" for b in blobs), version
        (blob,) = v1.file_descriptor_response.file_descriptor_proto
        served = FileDescriptorProto.FromString(blob)
        method = served.service[0].method[0]
        assert served.package == "grpc.reflection.v1" and method.name == "ServerReflectionInfo"
        assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"


# --- settings ------------------------------------------------------------------------------------


def test_every_field_is_documented() -> None:
    for cls in (ServeSettings, EngineConfig):
        docs = field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if not docs.get(f)]
        assert not missing, f"{cls.__name__}: {missing}"


def test_settings_precedence_flags_env_yaml_defaults(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "port: 7001\nmetrics_port: 7101\nmax_new_tokens: 300\n"
        "engine:\n  adapter_slots: 3\n  max_rank: 8\n  base: /yaml/base\n"
    )
    env = {"LORASWAP_PORT": "7002", "LORASWAP_MAX_RANK": "12", "LORASWAP_ADMIN_TOKENS": "a, b"}
    s = load_settings({"port": "7003", "max_new_tokens": None}, config_file=config, env=env)
    assert s.port == 7003  # flag over env over YAML
    assert s.engine.max_rank == 12  # env over YAML
    assert s.metrics_port == 7101 and s.max_new_tokens == 300 and s.engine.adapter_slots == 3  # YAML
    assert s.engine.base == "/yaml/base" and s.admin_tokens == ("a", "b")
    assert s.grace_seconds == ServeSettings().grace_seconds and s.engine.max_queue == EngineConfig().max_queue


def test_settings_problems_are_all_reported(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgumentError) as info:
        load_settings(
            {
                "port": "x",
                "max_rank": "0",
                "tls_cert": str(tmp_path / "none.pem"),
                "default_max_new_tokens": "0",
            },
            env={},
        )
    text = str(info.value)
    for needle in (
        "port: cannot read",
        "max_rank must be >= 1",
        "tls_cert and tls_key",
        "default_max_new_tokens",
    ):
        assert needle in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  nope: 1\nalso_nope: 2\n")
    with pytest.raises(errors.InvalidArgumentError, match="unknown keys"):
        load_settings(config_file=bad, env={})


def test_serve_help_documents_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from loraswap.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--max-concurrent-rpcs", "--admin-tokens", "--tls-client-ca", "--adapter-slots", "--config"):
        assert flag in out
    assert "one budget for both edges" in out
    assert "Adapters resident on the device at once" in out


def test_default_metrics_port_is_not_prometheus_own_and_deploy_files_agree() -> None:
    """9090 is the Prometheus server's own port; loraswap's metrics default to 9400, as the docs say."""
    import yaml

    port = ServeSettings().metrics_port
    assert port == 9400
    deploy = Path(__file__).resolve().parents[3] / "deploy"
    assert yaml.safe_load((deploy / "serve.example.yaml").read_text())["metrics_port"] == port
    [scrape] = yaml.safe_load((deploy / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    assert [t.rsplit(":", 1)[1] for c in scrape["static_configs"] for t in c["targets"]] == [str(port)]
    base = deploy / "kubernetes" / "base"
    deployment = yaml.safe_load((base / "deployment.yaml").read_text())
    service = yaml.safe_load((base / "service.yaml").read_text())
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    [container] = pod["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == port
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["metrics"] == port


def test_deploy_example_config_loads() -> None:
    example = Path(__file__).resolve().parents[3] / "deploy" / "serve.example.yaml"
    s = load_settings(config_file=example, env={})
    assert s.metrics_adapters == ("support-bot", "sql-helper") and s.engine.registry == "s3://adapters/prod"
    from loraswap.server.settings import ENGINE_FIELDS, SERVE_FIELDS

    text = example.read_text().lower()
    assert [name for name in [*SERVE_FIELDS, *ENGINE_FIELDS] if name not in text] == []  # every setting shown

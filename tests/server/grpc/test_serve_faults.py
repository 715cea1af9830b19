"""``loraswap serve`` as a real process with a registry that misbehaves (issue 23): misconfiguration
refuses to start with one line; a registry that accepts connections and never replies fails requests
within their deadlines, leaves the queue empty and the base serving; SIGTERM ends the process within its
grace period though a worker thread is still stuck in the registry."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from loraswap.devtools.launch import start_serve
from loraswap.errors import DeadlineExceededError
from loraswap.server.engine.api import SamplingParams
from loraswap.server.grpc.client import Client, ServerError, build_request

pytestmark = pytest.mark.slow
WAIT_S = 60  # a bound on waiting for something that must happen: far above any expected time


def _serve_command(tiny_base: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loraswap.cli", "serve", "--port", "0", "--metrics-port", "-1",
            "--base", str(tiny_base), "--quantization", "fp32", "--adapter-slots", "2", "--max-rank", "8",
            *extra]  # fmt: skip


def test_an_unknown_aws_profile_refuses_to_start(tiny_base: Path, tmp_path: Path) -> None:
    """Defect: an ``AWS_PROFILE`` naming a missing profile started the server, and then every adapter
    request waited forever (the error was raised where nothing caught it)."""
    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = us-east-1\n")
    env = {**os.environ, "AWS_PROFILE": "no-such-profile", "AWS_CONFIG_FILE": str(config),
           "AWS_SHARED_CREDENTIALS_FILE": str(config), "LORASWAP_HOME": str(tmp_path / "home")}  # fmt: skip
    done = subprocess.run(
        _serve_command(tiny_base, "--registry", "s3://adapters/prod"),
        env=env, capture_output=True, text=True, timeout=WAIT_S,
    )  # fmt: skip
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith("loraswap: error:")]
    assert len(lines) == 1 and "no-such-profile" in lines[0] and "s3://adapters/prod" in lines[0]
    assert "listening" not in done.stderr  # refused before anything was started


def test_a_missing_s3_extra_refuses_to_start(tiny_base: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['boto3'] = None; from loraswap.cli import main; "
        f"sys.exit(main({_serve_command(tiny_base, '--registry', 's3://adapters/prod')[3:]!r}))"
    )
    env = {**os.environ, "LORASWAP_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=WAIT_S
    )
    assert done.returncode == 1 and "pip install 'loraswap[s3]'" in done.stderr


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never replies (holding them open)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=WAIT_S).read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_silent_registry_fails_requests_in_time_and_sigterm_still_ends_the_process(
    tiny_base: Path, tmp_path: Path, silent_endpoint: str
) -> None:
    """Defects: with a registry that accepts connections and never replies, requests past their deadline
    or cancelled stayed queued while the engine idled; and a pool thread stuck in the registry held the
    process past SIGTERM's grace period (the interpreter joins pool threads at exit)."""
    env = {**os.environ, "LORASWAP_HOME": str(tmp_path / "home"), "LORASWAP_S3_ENDPOINT": silent_endpoint,
           "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
           "LORASWAP_S3_READ_TIMEOUT": "600", "LORASWAP_S3_MAX_ATTEMPTS": "1"}  # fmt: skip
    args = _serve_command(tiny_base, "--registry", "s3://adapters/prod", "--grace-seconds", "1")[4:]
    args[args.index("--metrics-port") + 1] = "0"
    server = start_serve(args, env, timeout=120)
    try:
        with Client(server.target, timeout=WAIT_S) as client:
            with pytest.raises(DeadlineExceededError):
                client.generate("hi", adapter="a:prod", sampling=SamplingParams(2), timeout=2)
            request = build_request("hi", "b", None, SamplingParams(2), "")
            future = client.inference.Generate.future(request, timeout=WAIT_S)
            future.cancel()
            answer = client.generate("hi", sampling=SamplingParams(2))  # the base still serves
            assert answer.completion_tokens == 2
            for _ in range(WAIT_S * 10):  # the idle engine drops both within a wake-up or two
                if _metric(server.metrics_url, "loraswap_queue_depth") == 0:
                    break
                threading.Event().wait(0.1)
            assert _metric(server.metrics_url, "loraswap_queue_depth") == 0
        server.proc.send_signal(signal.SIGTERM)  # a resolve worker is still inside a 600 s read
        assert server.wait(timeout=WAIT_S) == 0
    finally:
        server.kill()


def test_serve_exits_non_zero_when_its_engine_gives_up(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect: an engine whose steps all failed (or whose step thread died) left health SERVING and the
    process up, so Kubernetes never restarted it. Now health turns NOT_SERVING and ``serve`` returns
    :data:`ENGINE_FAILED_EXIT` (what ``loraswap serve`` exits with)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loraswap.server.engine import EngineConfig
    from loraswap.server.engine.forward import PackedForward
    from loraswap.server.grpc import server as grpc_server
    from loraswap.server.settings import ServeSettings

    def broken(self, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

    monkeypatch.setattr(PackedForward, "__call__", broken)
    healths: list[int] = []
    port: list[str] = []
    real_set_failed = grpc_server.GrpcServer.set_failed

    def set_failed(self) -> None:  # ask the real health service, as a probe would, before the drain
        real_set_failed(self)
        with grpc.insecure_channel(f"127.0.0.1:{port[0]}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            healths.append(check(health_pb2.HealthCheckRequest(), timeout=WAIT_S).status)

    monkeypatch.setattr(grpc_server.GrpcServer, "set_failed", set_failed)
    ports: list[str] = []
    monkeypatch.setattr(grpc_server, "_say", lambda message: ports.append(message))
    engine = EngineConfig(base=str(tiny_base), registry=str(tmp_path / "reg"), quantization="fp32",
                          adapter_slots=1, max_rank=8, max_batch_size=2, max_seq_len=64,
                          max_step_failures=1)  # fmt: skip
    settings = ServeSettings(engine=engine, port=0, metrics_port=-1, grace_seconds=1)
    stop = threading.Event()
    status: list[int] = []
    runner = threading.Thread(target=lambda: status.append(grpc_server.serve(settings, stop)))
    runner.start()
    try:
        for _ in range(WAIT_S * 10):
            if any(m.startswith("serving on") for m in ports):
                break
            threading.Event().wait(0.1)
        port.append(next(m for m in ports if m.startswith("serving on")).split(":")[1].split()[0])
        with Client(f"127.0.0.1:{port[0]}", timeout=WAIT_S) as client, pytest.raises(ServerError):
            client.generate("hi", sampling=SamplingParams(2))
        runner.join(WAIT_S)
        assert status == [grpc_server.ENGINE_FAILED_EXIT]
        assert healths == [health_pb2.HealthCheckResponse.NOT_SERVING]
        assert any("the engine stopped: 1 steps in a row failed" in m for m in ports)
    finally:
        stop.set()
        runner.join(WAIT_S)

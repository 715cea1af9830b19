"""``loraswap serve`` as a real process on the tiny model: settings from flags/env/YAML, drain on SIGTERM."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraswap.devtools.launch import start_serve
from loraswap.models import resolve_base
from loraswap.registry import open_registry
from loraswap.server.engine.api import SamplingParams
from loraswap.server.grpc.client import Client, ServerError

pytestmark = pytest.mark.slow


def test_serve_drains_in_flight_requests_on_sigterm(tiny_base: Path, make_adapter, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    open_registry(registry).push(
        make_adapter(r=4, seed=31), "bot", tags=["prod"], base=resolve_base(tiny_base)
    )
    config = tmp_path / "serve.yaml"
    config.write_text(f"port: 0\nmetrics_port: -1\nengine:\n  base: {tiny_base}\n  adapter_slots: 2\n")
    env = {**os.environ, "LORASWAP_HOME": str(tmp_path / "home"), "LORASWAP_MAX_RANK": "8"}
    env["LORASWAP_QUANTIZATION"] = "fp32"
    args = ["--config", str(config), "--registry", str(registry)]
    args += ["--max-seq-len", "1100", "--max-new-tokens", "1000", "--grace-seconds", "30"]
    server = start_serve(args, env, timeout=120)
    try:
        with Client(server.target, timeout=60) as client:
            info = client.info()
            assert info.max_rank == 8 and info.adapter_slots == 2 and info.quantization == "fp32"
            stream = client.stream(
                "The quick",
                adapter="bot:prod",
                sampling=SamplingParams(1000, ignore_eos=True),  # >= 0.8 s
            )
            first = next(stream)
            server.proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(client.channel)
            request = health_pb2.HealthCheckRequest()
            deadline = time.monotonic() + 5
            while health.Check(request, timeout=5).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "health still SERVING after SIGTERM"
                time.sleep(0.01)
            with pytest.raises(ServerError) as refused:
                client.generate("hi", sampling=SamplingParams(2))
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            rest = list(stream)
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()
    result = rest[-1].result
    assert result is not None and result.finish_reason == "length" and result.completion_tokens == 1000
    assert first.text + "".join(e.text for e in rest) == result.text
    log = "".join(server.log)
    assert "draining" in log and "stopped" in log
    assert "precision: fp32 (set by the quantization setting" in log

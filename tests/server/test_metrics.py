"""The metrics module on its own: observer hooks, bounded labels, a dedicated registry, HTTP, NVML."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client import REGISTRY

from loraswap.registry.names import ref_name
from loraswap.server.engine.api import GenerationResult, Timings
from loraswap.server.metrics import Metrics, NvmlUtilization


def value(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_adapter_labels_are_bounded() -> None:
    m = Metrics(tracked_adapters=["support"])
    assert ref_name("support@sha256:abc") == "support" and ref_name("support:prod") == "support"
    assert m.adapter_label("support:prod") == "support"
    assert m.adapter_label("anything-else:v2") == "other"
    assert m.adapter_label("") == "base"


def test_observer_hooks_feed_the_metrics() -> None:
    m = Metrics(tracked_adapters=["a"])
    m.track_methods(["/loraswap.v1.Inference/Generate"])
    m.on_cache_lookup("device", False)
    m.on_cache_lookup("host", True)
    m.on_adapter_load("registry", 0.05)
    m.on_eviction("device", "lru")
    m.on_load_failure("NotFoundError")
    m.on_step(batch_size=3, distinct_adapters=2, prefill_tokens=10, seconds=0.01)
    m.on_token("r", "a", None)
    m.on_token("r", "a", 0.02)
    m.on_call("/loraswap.v1.Inference/Generate", grpc.StatusCode.NOT_FOUND, 0.1)
    result = GenerationResult("xy", "length", 4, 2, "sha256:0", (1, 2), Timings(0.1, 0.2, 0.3))
    m.on_result("a:prod", result)
    m.on_result("zzz", result)
    assert value(m, "loraswap_adapter_cache_lookups_total", tier="device") == 1
    assert value(m, "loraswap_adapter_cache_hits_total", tier="device") == 0
    assert value(m, "loraswap_adapter_cache_hits_total", tier="host") == 1
    assert value(m, "loraswap_adapter_loads_total", source="registry") == 1
    assert value(m, "loraswap_adapter_load_duration_seconds_sum", source="registry") == 0.05
    assert value(m, "loraswap_adapter_evictions_total", tier="device", reason="lru") == 1
    assert value(m, "loraswap_adapter_load_failures_total", reason="NotFoundError") == 1
    assert value(m, "loraswap_batch_size_sum") == 3 and value(m, "loraswap_step_distinct_adapters_sum") == 2
    assert value(m, "loraswap_prefill_tokens_total") == 10
    assert value(m, "loraswap_inter_token_latency_seconds_count") == 1
    code = {"method": "/loraswap.v1.Inference/Generate", "code": "NOT_FOUND"}
    assert value(m, "loraswap_requests_total", **code) == 1
    assert value(m, "loraswap_rpc_duration_seconds_count", method="/loraswap.v1.Inference/Generate") == 1
    assert value(m, "loraswap_rpc_duration_seconds_sum", method="/loraswap.v1.Inference/Generate") == 0.1
    assert value(m, "loraswap_generated_tokens_total", adapter="a") == 2
    assert value(m, "loraswap_generated_tokens_total", adapter="other") == 2
    assert value(m, "loraswap_time_to_first_token_seconds_sum", adapter="a") == 0.2
    assert value(m, "loraswap_request_duration_seconds_count", adapter="other") == 1


def test_each_server_has_its_own_registry_and_endpoint() -> None:
    one, two = Metrics(), Metrics()
    one.on_load_failure("x")
    assert value(two, "loraswap_adapter_load_failures_total", reason="x") == 0
    assert REGISTRY.get_sample_value("loraswap_adapter_load_failures_total", {"reason": "x"}) is None
    port = one.serve_http("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert 'loraswap_adapter_load_failures_total{reason="x"} 1.0' in text
        assert "python_gc" not in text  # not the global registry's default collectors
    finally:
        one.stop_http()


def test_rpc_method_labels_are_bounded() -> None:
    m = Metrics()
    m.track_methods(["/loraswap.v1.Admin/ServerInfo"])
    m.on_call("/loraswap.v1.Admin/ServerInfo", grpc.StatusCode.OK, 0.5)
    for i in range(3):
        m.on_call(f"/made.Up/Method{i}", grpc.StatusCode.UNIMPLEMENTED, 0.25)
    assert value(m, "loraswap_rpc_duration_seconds_count", method="/loraswap.v1.Admin/ServerInfo") == 1
    assert value(m, "loraswap_rpc_duration_seconds_count", method="other") == 3
    assert value(m, "loraswap_requests_total", method="other", code="UNIMPLEMENTED") == 3
    methods = {
        s.labels["method"] for family in m.registry.collect() for s in family.samples if "method" in s.labels
    }
    assert methods == {"/loraswap.v1.Admin/ServerInfo", "other"}


def test_nvml_initialises_once_and_remembers_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ``nvmlInit`` runs (and, without a driver, fails) on the first read only."""
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py (which provides pynvml) is not installed")
    real_init, inits = pynvml.nvmlInit, []

    def counting_init(*args: object, **kwargs: object) -> None:
        inits.append(args)
        real_init(*args, **kwargs)

    monkeypatch.setattr(pynvml, "nvmlInit", counting_init)
    nvml = NvmlUtilization()
    readings = [nvml.read(0) for _ in range(4)]
    assert len(inits) == 1
    # no driver (this CI): every read is None; with one: every read is a ratio
    assert readings == [None] * 4 or all(r is not None and 0.0 <= r <= 1.0 for r in readings)

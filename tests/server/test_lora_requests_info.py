"""The gateways' LoRA gauge (``vllm:lora_requests_info``) against a real engine stepped by hand: its labels
name exactly the adapters whose requests run and wait, at every stage, over the /metrics endpoint too."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraswap.models import resolve_base
from loraswap.registry.registry import open_registry
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.api import GenerationRequest
from loraswap.server.metrics import LORA_INFO_METRIC, Metrics


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_base: Path, make_adapter):
    registry = open_registry(tmp_path_factory.mktemp("registry"))
    for seed, name in enumerate(("alpha", "beta")):
        registry.push(make_adapter(r=4, seed=40 + seed), name, base=resolve_base(tiny_base), tags=["prod"])
    return registry


def _sample(metrics: Metrics) -> tuple[dict[str, str], float]:
    """The gauge's one sample: its labels and value, as the scrape computes them now."""
    families = [f for f in metrics.registry.collect() if f.name == LORA_INFO_METRIC]
    assert len(families) == 1 and len(families[0].samples) == 1
    sample = families[0].samples[0]
    return sample.labels, sample.value


def _labels(metrics: Metrics) -> tuple[str, str, str]:
    labels, _ = _sample(metrics)
    return labels["running_lora_adapters"], labels["waiting_lora_adapters"], labels["max_lora"]


def _step(engine: Engine) -> None:
    engine.take_incoming()
    engine.step()


def _truth(handles: list, max_lora: int) -> tuple[str, str, str]:
    """The labels the engine's own request states call for: a request holding a KV row runs, one not yet
    admitted waits, one admitted that gave its row back has finished; base-model requests are not listed."""
    running, waiting = set(), set()
    for handle in handles:
        state = handle.state
        finished = state.admitted > 0 and state.row < 0
        if state.request.adapter and not finished:
            (running if state.row >= 0 else waiting).add(state.request.adapter)
    return ",".join(sorted(running)), ",".join(sorted(waiting)), str(max_lora)


def test_labels_follow_running_and_waiting_requests(tiny_base: Path, registry, greedy) -> None:
    config = EngineConfig(
        base=str(tiny_base), quantization="fp32", adapter_slots=2, max_rank=8, max_batch_size=1,
        max_seq_len=96,
    )  # fmt: skip
    engine = Engine(config, registry=registry)  # never started: each step is run here
    metrics = Metrics()
    metrics.attach_engine(engine)
    try:
        assert _labels(metrics) == ("", "", "2")
        handles = [
            engine.submit(GenerationRequest(adapter="alpha:prod", prompt="one", sampling=greedy(6))),
            engine.submit(GenerationRequest(adapter="beta", prompt="two", sampling=greedy(3))),
            engine.submit(GenerationRequest(prompt="three", sampling=greedy(2))),
        ]
        assert _labels(metrics) == ("", "alpha:prod,beta", "2")  # submitted; base requests are not listed
        for handle in handles[:2]:
            assert handle.state.adapter is not None
            handle.state.adapter.result(timeout=60)  # loaded in the background
        seen = set()
        while any(h.state.row >= 0 or not h.state.admitted for h in handles):  # one KV row: one at a time
            _step(engine)
            labels = _labels(metrics)
            assert labels == _truth(handles, 2)
            seen.add(labels)
            before = time.time()
            _, value = _sample(metrics)
            assert before <= value <= time.time()  # the scrape's Unix time, as vLLM's set_to_current_time()
        assert [h.result(timeout=10).completion_tokens for h in handles] == [6, 3, 2]
        assert ("alpha:prod", "beta", "2") in seen or (
            "beta",
            "alpha:prod",
            "2",
        ) in seen  # one ran, one waited
        assert _labels(metrics) == ("", "", "2")
    finally:
        engine.stop(drain_timeout=1)


def test_the_gauge_is_scraped_under_vllms_name(tiny_base: Path, registry, greedy) -> None:
    config = EngineConfig(
        base=str(tiny_base), quantization="fp32", adapter_slots=3, max_rank=8, max_seq_len=96
    )
    engine = Engine(config, registry=registry)
    metrics = Metrics()
    metrics.attach_engine(engine)
    port = metrics.serve_http("127.0.0.1", 0)
    try:
        handle = engine.submit(GenerationRequest(adapter="beta:prod", prompt="x", sampling=greedy(4)))
        assert handle.state.adapter is not None
        handle.state.adapter.result(timeout=60)
        _step(engine)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        (family,) = [f for f in text_string_to_metric_families(text) if f.name == LORA_INFO_METRIC]
        assert family.type == "gauge"
        (sample,) = family.samples
        assert sample.labels == {
            "running_lora_adapters": "beta:prod",
            "waiting_lora_adapters": "",
            "max_lora": "3",
        }
    finally:
        metrics.stop_http()
        engine.stop(drain_timeout=1)

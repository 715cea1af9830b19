"""A real Prometheus (the Debian binary) scraping a real ``loraswap serve`` on the tiny model, with the
recording rules and alerts of deploy/prometheus loaded: after mixed-adapter gRPC traffic, the adapter-cache
series per tier, every recording rule, every dashboard panel's query and the prometheus-adapter rule's
query return data through Prometheus' HTTP query API.

Queries are retried on the scrape interval, a bounded number of times (data appears after the next scrape
or rule evaluation); no assertion is made on how long anything takes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from loraswap.devtools.launch import ServeProcess, start_serve
from loraswap.models import resolve_base
from loraswap.registry import open_registry
from loraswap.server.engine.api import SamplingParams
from loraswap.server.grpc.client import Client

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="prometheus is not installed (Debian package: prometheus)"
    ),
]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULE_FILES = (DEPLOY / "prometheus" / "recording.yml", DEPLOY / "prometheus" / "alerts.yml")
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraswap.json"
ADAPTER_RULES = DEPLOY / "kubernetes" / "prometheus-adapter.yaml"
SCRAPE_INTERVAL_S = 1
ATTEMPTS = 60  # query retries, one scrape interval apart
TIERS = {"device", "host", "disk"}
ADAPTERS = ("a1", "a2", "a3", "a4")  # four adapters through two device slots: loads and evictions
CUDA_ONLY = re.compile(r"loraswap(_|:)device_(memory|utilization)")
"""Series the server publishes on CUDA only (device memory, NVML utilization), and rules built on them."""
DASHBOARD_VARS = {"$__rate_interval": "1m", "$instance": ".+"}


def recording_rules() -> list[str]:
    groups = yaml.safe_load(RULE_FILES[0].read_text())["groups"]
    return [rule["record"] for group in groups for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title / refId, expression) of every query of every panel."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(f"{p['title']} / {t['refId']}", t["expr"]) for p in panels for t in p.get("targets", ())]


def for_grafana(expr: str) -> str:
    for name, value in DASHBOARD_VARS.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a dashboard variable the test does not substitute: {expr}"
    return expr


def split(items: list, key) -> tuple[list, list]:
    """(CPU-served items, CUDA-only items)."""
    return [i for i in items if not CUDA_ONLY.search(key(i))], [i for i in items if CUDA_ONLY.search(key(i))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Live:
    url: str
    serve: ServeProcess

    def query(self, expr: str) -> list[dict]:
        params = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def data(self, expr: str) -> list[dict]:
        """The result of ``expr`` once it holds a finite sample; retried on the scrape interval."""
        result: list[dict] = []
        for _ in range(ATTEMPTS):
            result = self.query(expr)
            if any(math.isfinite(float(r["value"][1])) for r in result):
                return result
            time.sleep(SCRAPE_INTERVAL_S)
        pytest.fail(f"no finite sample after {ATTEMPTS} scrapes: {expr} -> {result}")


def _traffic(target: str, rounds: int, fresh: str) -> None:
    """Mixed requests: every adapter, the base (""), an unknown adapter, ``fresh`` (not loaded yet)."""
    refs = [*(f"{name}:prod" for name in ADAPTERS), "", "missing:prod", f"{fresh}:prod"]
    prompts = ("The quick brown fox", "Paris is the capital", "def add(a, b):")

    def one(i: int) -> None:
        with Client(target, timeout=60) as client:
            ref = refs[i % len(refs)]
            try:
                sampling = SamplingParams(4, ignore_eos=True)
                client.generate(prompts[i % len(prompts)], adapter=ref, sampling=sampling)
            except Exception:
                if ref != "missing:prod":  # an unknown adapter: NOT_FOUND and a counted load failure
                    raise

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(one, range(rounds * len(refs))))


@pytest.fixture(scope="module")
def live(tiny_base: Path, make_adapter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("prometheus-live")
    registry_root, base = tmp / "registry", resolve_base(tiny_base)
    registry = open_registry(registry_root)
    for i, name in enumerate((*ADAPTERS, "fresh1", "fresh2")):
        registry.push(make_adapter(r=4, seed=40 + i), name, tags=["prod"], base=base)
    env = {**os.environ, "LORASWAP_HOME": str(tmp / "home")}
    args = ["--base", str(tiny_base), "--registry", str(registry_root), "--port", "0", "--metrics-port", "0"]
    args += ["--quantization", "fp32", "--adapter-slots", "2", "--max-rank", "8"]
    args += ["--metrics-adapters", "a1,a2"]
    serve = start_serve(args, env, timeout=120)
    prometheus = None
    try:
        assert serve.metrics_url is not None
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
            },
            "rule_files": [str(p) for p in RULE_FILES],
            "scrape_configs": [
                {
                    "job_name": "loraswap",
                    "static_configs": [{"targets": [serve.metrics_url.split("/")[2]]}],
                }
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        prometheus = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp / "prometheus.log").open("w"),
        )
        live = Live(f"http://127.0.0.1:{port}", serve)
        for _ in range(ATTEMPTS):
            assert prometheus.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{live.url}/-/ready", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(SCRAPE_INTERVAL_S)
        live.data('up{job="loraswap"} == 1')
        # Two waves a scrape apart: the series exist before the second, so every rate has an increase
        # (each wave loads an adapter of its own: the load histograms move in the second wave too).
        _traffic(serve.target, rounds=2, fresh="fresh1")
        live.data("loraswap_time_to_first_token_seconds_count")
        seen = float(live.query("sum(loraswap_generated_tokens_total)")[0]["value"][1])
        _traffic(serve.target, rounds=2, fresh="fresh2")
        for _ in range(ATTEMPTS):
            if float(live.data("sum(loraswap_generated_tokens_total)")[0]["value"][1]) > seen:
                break
            time.sleep(SCRAPE_INTERVAL_S)
        yield live
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        serve.proc.terminate()
        serve.wait(timeout=60)


def test_adapter_cache_series_per_tier(live: Live) -> None:
    for metric in (
        "loraswap_adapter_cache_resident_adapters",
        "loraswap_adapter_cache_resident_bytes",
        "loraswap_adapter_cache_lookups_total",
    ):
        assert {r["metric"]["tier"] for r in live.data(metric)} == TIERS, metric
    device = live.data('loraswap_adapter_cache_resident_adapters{tier="device"}')
    assert [float(r["value"][1]) for r in device] == [2.0]  # both slots hold an adapter
    evictions = live.data('loraswap_adapter_evictions_total{tier="device"}')
    assert sum(float(r["value"][1]) for r in evictions) > 0
    failures = live.data("loraswap_adapter_load_failures_total")
    assert {r["metric"]["reason"] for r in failures} == {"NotFoundError"}


CPU_RULES, CUDA_RULES = split(recording_rules(), key=lambda name: name)


@pytest.mark.parametrize("record", CPU_RULES)
def test_recording_rule_has_data(live: Live, record: str) -> None:
    live.data(record)


CPU_QUERIES, CUDA_QUERIES = split(dashboard_queries(), key=lambda item: item[1])


@pytest.mark.parametrize(("panel", "expr"), CPU_QUERIES, ids=[p for p, _ in CPU_QUERIES])
def test_dashboard_query_has_data(live: Live, panel: str, expr: str) -> None:
    live.data(for_grafana(expr))


@pytest.mark.gpu
def test_cuda_only_rules_and_queries_have_data(live: Live) -> None:
    """Device memory and utilization exist on CUDA servers only (server/metrics.py: memory_metrics)."""
    assert CUDA_RULES and CUDA_QUERIES
    for record in CUDA_RULES:
        live.data(record)
    for _, expr in CUDA_QUERIES:
        live.data(for_grafana(expr))


def test_every_rule_evaluates_without_error(live: Live) -> None:
    expected = [
        rule.get("record") or rule.get("alert")
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]
    rules: dict[str, dict] = {}
    for _ in range(ATTEMPTS):  # until every rule has been evaluated once
        with urllib.request.urlopen(f"{live.url}/api/v1/rules", timeout=10) as response:
            groups = json.load(response)["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        if all(r["health"] != "unknown" for r in rules.values()):
            break
        time.sleep(SCRAPE_INTERVAL_S)
    assert sorted(rules) == sorted(expected)
    assert {name: r.get("lastError", "") for name, r in rules.items() if r["health"] != "ok"} == {}


def test_prometheus_adapter_rule_query_has_data(live: Live) -> None:
    """The HPA's metric: the adapter rule's metricsQuery, filled in as prometheus-adapter does."""
    [rule] = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    series = rule["seriesQuery"].split("{", 1)[0]
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'job="loraswap"')
        .replace("<<.GroupBy>>", "instance")
    )
    assert "<<" not in query
    [sample] = live.data(query)
    assert sample["metric"]["instance"] == live.serve.metrics_url.split("/")[2]

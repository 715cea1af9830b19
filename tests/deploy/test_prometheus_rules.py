"""deploy/prometheus: ``promtool check`` of the config and rules, ``promtool test rules`` of the alert unit
tests, and every metric the rules, the dashboard and the prometheus-adapter rule name is one the server
declares (server/metrics.py). The same rules against live data: test_prometheus_live.py."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = (PROMETHEUS / "recording.yml", PROMETHEUS / "alerts.yml")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
SUFFIXES = ("", "_total", "_created", "_bucket", "_sum", "_count", "_info")


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=PROMETHEUS, timeout=120)


@needs_promtool
def test_promtool_checks_rules_and_config() -> None:
    out = promtool("check", "rules", *(p.name for p in RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_alert_unit_tests_pass() -> None:
    tests = sorted((PROMETHEUS / "tests").glob("*_test.yml"))
    assert tests
    out = promtool("test", "rules", *(str(t.relative_to(PROMETHEUS)) for t in tests))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_unit_test() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES[1].read_text())["groups"] for r in g["rules"]}
    tested = {
        t["alertname"]
        for f in (PROMETHEUS / "tests").glob("*_test.yml")
        for case in yaml.safe_load(f.read_text())["tests"]
        for t in case.get("alert_rule_test", ())
        if t.get("exp_alerts")
    }
    assert alerts == tested
    assert {
        "LoraswapAdapterLoadFailures",
        "LoraswapAdapterEvictionStorm",
        "LoraswapDeviceMemoryNearFull",
    } <= alerts
    assert {"LoraswapQueueSaturated", "LoraswapSlowTimeToFirstToken", "LoraswapReplicaNotServing"} <= alerts


def test_queue_alert_threshold_follows_max_queue() -> None:
    """max_queue is not a metric: the alert's constant is 80% of the max_queue the manifests set."""
    [rule] = [
        r for g in yaml.safe_load(RULES[1].read_text())["groups"] for r in g["rules"]
        if r.get("alert") == "LoraswapQueueSaturated"
    ]  # fmt: skip
    threshold = int(re.search(r">= (\d+)", rule["expr"]).group(1))
    configs = [*ROOT.glob("deploy/kubernetes/**/serve.yaml"), ROOT / "deploy" / "serve.example.yaml"]
    assert len(configs) == 3
    for serve in configs:
        max_queue = yaml.safe_load(serve.read_text())["engine"]["max_queue"]
        assert threshold == math.ceil(0.8 * max_queue), serve


def declared_metrics() -> set[str]:
    """Every exposition name of the metrics declared in server/metrics.py."""
    source = (ROOT / "server" / "metrics.py").read_text()
    names = set(re.findall(r'"(loraswap_[a-z_]+)"', source))
    return {n + s for n in names for s in SUFFIXES}


def used_metrics() -> dict[str, set[str]]:
    """File → raw metric names (not recording-rule names, which hold colons) in its expressions."""

    def names(expr: str) -> set[str]:
        return set(re.findall(r"(?<![:\w])(loraswap_[a-z_]+)(?![:\w])", expr))

    out: dict[str, set[str]] = {}
    for path in RULES:
        rules = [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]
        out[path.name] = set().union(*(names(r["expr"]) for r in rules))
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "loraswap.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    out["loraswap.json"] = set().union(*(names(e) for e in exprs))
    adapter = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "prometheus-adapter.yaml").read_text())
    out["prometheus-adapter.yaml"] = set().union(
        *(names(r["seriesQuery"]) for r in adapter["rules"]["custom"])
    )
    return out


def test_rules_dashboard_and_adapter_use_declared_metrics() -> None:
    declared = declared_metrics()
    assert "loraswap_device_memory_used_bytes" in declared and "loraswap_requests_total" in declared
    used = used_metrics()
    assert all(used.values())
    assert {f: sorted(n - declared) for f, n in used.items() if n - declared} == {}


def test_recording_rules_named_in_expressions_exist() -> None:
    records = {r["record"] for g in yaml.safe_load(RULES[0].read_text())["groups"] for r in g["rules"]}
    alerts = [r for g in yaml.safe_load(RULES[1].read_text())["groups"] for r in g["rules"]]
    referenced = set().union(*(re.findall(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", a["expr"]) for a in alerts))
    assert referenced and referenced <= records

"""deploy/grafana: the dashboard's structure and its provisioning for deploy/compose.yaml. Every panel's
query returning data from a live server: test_prometheus_live.py."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "loraswap.json").read_text())


def test_dashboard_covers_throughput_latency_cache_memory_and_queue() -> None:
    rows = [p["title"] for p in DASHBOARD["panels"] if p["type"] == "row"]
    assert rows == ["Throughput", "Latency", "Adapter cache", "Memory", "Queue and batching"]
    exprs = " ".join(t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", ()))
    for metric in (
        "loraswap_generated_tokens_total",
        "loraswap_time_to_first_token_seconds_bucket",
        "loraswap_adapter_cache_resident_adapters",
        "loraswap_adapter_cache_hits_total",
        "loraswap_device_memory_used_bytes",
        "loraswap_queue_depth",
    ):
        assert metric in exprs, metric


def test_panels_are_well_formed() -> None:
    panels = DASHBOARD["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"], p["title"]
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
        assert p["fieldConfig"]["defaults"]["unit"], p["title"]
    # No two panels overlap on the 24-column grid.
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine


def test_provisioning_matches_the_compose_stack() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = {
        v.split(":")[1]: (ROOT / "deploy" / v.split(":")[0]).resolve()
        for v in grafana["volumes"]
        if v.startswith("./")
    }
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    [provider] = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "loraswap.yaml").read_text())[
        "providers"
    ]
    assert mounts[provider["options"]["path"]] == (GRAFANA / "dashboards").resolve()
    [source] = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/loraswap.json"

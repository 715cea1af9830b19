"""deploy/compose.yaml: the one-host stack (server, S3-compatible store, Prometheus, Grafana). Its
wiring is checked here; ``docker compose config`` validates it where the compose plugin exists."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from loraswap.server.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
ENV = {"S3_SECRET_KEY": "test-only", "GRAFANA_ADMIN_PASSWORD": "test-only"}


def compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    out = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0


def test_stack_has_server_store_prometheus_grafana() -> None:
    assert {"loraswap", "s3", "registry-init", "prometheus", "grafana"} == set(SERVICES)
    for name, service in SERVICES.items():
        if "build" not in service:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", service["image"]) and not service["image"].endswith(
                ":latest"
            ), name
        for port in service.get("ports", ()):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_registry_points_at_the_store() -> None:
    env = SERVICES["loraswap"]["environment"]
    assert env["LORASWAP_REGISTRY"].startswith("s3://")
    bucket = env["LORASWAP_REGISTRY"].removeprefix("s3://").split("/")[0]
    assert env["LORASWAP_S3_ENDPOINT"] == "http://s3:9000"
    assert "--address" in SERVICES["s3"]["command"] and ":9000" in SERVICES["s3"]["command"]
    assert f'Bucket="{bucket}"' in SERVICES["registry-init"]["command"][0]
    assert SERVICES["registry-init"]["environment"]["LORASWAP_S3_ENDPOINT"] == env["LORASWAP_S3_ENDPOINT"]
    assert SERVICES["loraswap"]["depends_on"]["registry-init"] == {
        "condition": "service_completed_successfully"
    }
    for dockerfile in {s["build"]["dockerfile"] for s in SERVICES.values() if "build" in s}:
        assert (DEPLOY / SERVICES["loraswap"]["build"]["context"] / dockerfile).is_file()


def test_prometheus_scrapes_the_server_and_loads_the_rules() -> None:
    prometheus = SERVICES["prometheus"]
    [mount] = [v for v in prometheus["volumes"] if v.startswith("./")]
    host, target = mount.split(":")[:2]
    assert (DEPLOY / host).resolve() == (DEPLOY / "prometheus").resolve()
    config_path = next(a for a in prometheus["command"] if a.startswith("--config.file=")).split("=", 1)[1]
    config = yaml.safe_load((DEPLOY / "prometheus" / Path(config_path).relative_to(target)).read_text())
    assert [(DEPLOY / "prometheus" / f).is_file() for f in config["rule_files"]] == [True, True]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "loraswap"  # the rules' and the alerts' job
    [targets] = [c["targets"] for c in job["static_configs"]]
    assert targets == [f"loraswap:{ServeSettings().metrics_port}"]
    ports = [p.rsplit(":", 1)[1] for p in SERVICES["loraswap"]["ports"]]
    assert str(ServeSettings().metrics_port) in ports and str(ServeSettings().port) in ports


def test_stop_grace_outlasts_the_drain() -> None:
    server = SERVICES["loraswap"]
    grace = float(server["environment"]["LORASWAP_GRACE_SECONDS"])
    assert float(server["stop_grace_period"].removesuffix("s")) > grace + 5


@pytest.mark.skipif(not compose_plugin(), reason="the docker compose plugin is not installed")
def test_docker_compose_config_validates() -> None:
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]):
        args = [a for f in files for a in ("-f", str(DEPLOY / f))]
        out = subprocess.run(
            ["docker", "compose", *args, "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **ENV},
        )
        assert out.returncode == 0, out.stderr

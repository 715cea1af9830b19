"""Routes in a real ``loraswap serve`` on 127.0.0.1: ``--route`` at start, the admin RPCs, the metrics,
and a route that cannot be served refusing the start."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from loraswap.devtools.launch import start_serve
from loraswap.errors import LoraswapError
from loraswap.merge.builder import merge_adapters
from loraswap.merge.sources import AdapterSource
from loraswap.models import resolve_base
from loraswap.registry import open_registry
from loraswap.server.engine.api import SamplingParams
from loraswap.server.grpc.client import Client

ADMIN, INFERENCE = "adm-r", "inf-r"
PROMPT = "The quick brown fox"


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def sample(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_serve_with_a_route_and_promotion_over_grpc(tiny_base: Path, make_adapter, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    registry, base = open_registry(root), resolve_base(tiny_base)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    bot = registry.push(make_adapter(r=4, target_modules=targets, seed=71), "bot", tags=["prod"], base=base)
    helper = registry.push(make_adapter(r=4, target_modules=targets, seed=72), "helper", base=base)
    merged = tmp_path / "bot-merged"
    merge_adapters(base, [AdapterSource.from_registry(registry, "bot:prod")], merged, dtype="fp32")
    env = {**os.environ, "LORASWAP_HOME": str(tmp_path / "home")}
    args = ["--port", "0", "--metrics-port", "0", "--base", str(tiny_base), "--registry", str(root)]
    args += ["--quantization", "fp32", "--adapter-slots", "2", "--max-rank", "8", "--max-seq-len", "128"]
    args += ["--route", f"bot:prod={merged}", "--route-max-batch-size", "2"]
    args += ["--admin-tokens", ADMIN, "--inference-tokens", INFERENCE]
    server = start_serve(args, env, timeout=120)
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    try:
        with Client(server.target, token=ADMIN, timeout=120) as client:
            (route,) = client.routes()
            assert (route.adapter, route.model, route.adapter_digest) == ("bot:prod", str(merged), bot.digest)
            assert route.state == "serving" and not route.promoted and route.kv_cache_bytes > 0
            routed = client.generate(PROMPT, adapter="bot:prod", sampling=greedy)
            assert routed.adapter_digest == bot.digest
            assert client.routed_to() == {}  # the shared base never loaded bot: it is not in its tables
            unrouted = client.generate(PROMPT, adapter="helper", sampling=greedy)
            assert client.routed_to() == {}

            promoted = client.promote("helper", timeout=300)
            assert promoted.adapter_digest == helper.digest and promoted.promoted
            assert client.routed_to() == {helper.digest: promoted.model}
            again = client.generate(PROMPT, adapter="helper", sampling=greedy)
            assert again.token_ids == unrouted.token_ids and again.adapter_digest == helper.digest
            listed = subprocess.run(
                [sys.executable, "-m", "loraswap.cli", "routes", "--target", server.target, "--token", ADMIN],
                capture_output=True, text=True, timeout=120, check=True,
            ).stdout  # fmt: skip
            assert "bot:prod" in listed and "helper" in listed and "yes" in listed
            metrics = scrape(server.metrics_url)
            assert sample(metrics, 'loraswap_routes{state="serving"}') == 2
            assert sample(metrics, 'loraswap_route_promotions_total{outcome="ok"}') == 1
            assert sample(metrics, 'loraswap_route_memory_bytes{kind="weights"}') > 0

            freed = client.demote("helper")
            assert freed == promoted.weights_bytes + promoted.kv_cache_bytes
            assert [r.adapter for r in client.routes()] == ["bot:prod"]
            assert sample(scrape(server.metrics_url), 'loraswap_routes{state="serving"}') == 1
            with pytest.raises(LoraswapError, match="has no route"):
                client.demote("helper")
            with pytest.raises(LoraswapError, match="not found"):
                client.promote("no-such-adapter")
        with Client(server.target, token=INFERENCE, timeout=60) as client, pytest.raises(LoraswapError):
            client.promote("helper")  # admin only
    finally:
        server.kill()


def test_serve_refuses_a_route_it_cannot_serve(tiny_base: Path, tmp_path: Path) -> None:
    env = {**os.environ, "LORASWAP_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "loraswap.cli", "serve", "--port", "0", "--metrics-port", "-1"]
    command += ["--base", str(tiny_base), "--quantization", "fp32", "--registry", str(tmp_path / "reg")]
    command += ["--route", f"bot:prod={tmp_path / 'missing'}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "merged model folder" in done.stderr and "does not exist" in done.stderr
    bad = subprocess.run(
        [*command[:-2], "--route", "no-equals-sign"], env=env, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "a route is REF=MODEL" in bad.stderr

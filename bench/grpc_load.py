"""gRPC load test: thousands of mixed-adapter requests from many concurrent clients on ``loraswap serve``.

The server runs as a real subprocess (``loraswap serve``) on the tiny random Llama by default (or the
embedded SmolLM2 with ``--base default``), with more adapters than device slots so that requests keep
swapping adapters. Each client has its own channel and sends requests back to back; a share of them
stream. Reports failures by status code, throughput, client-side latency percentiles, the longest wait
for admission (server queue time), server TTFT, cache counters from the metrics endpoint, and the
server's RSS before and after.

``--slots`` and ``--policy`` take comma-separated lists: every combination runs in turn on the same
adapters and workload, one server at a time (``--repeat`` cycles through them again), and the figures
end with the ratios: fewer slots against the most slots, per policy, and adapter-aware against FIFO
admission, per slot count (medians over the repeats).

Run: ``python -m bench.grpc_load [--requests 3000] [--clients 64] [--base default]
[--adapters 16 --slots 8,32 --policy adapter-aware,fifo]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from bench.adapters import write_adapter
from loraswap.devtools.launch import start_serve
from loraswap.models import resolve_base
from loraswap.registry import open_registry
from loraswap.server.engine.api import SamplingParams
from loraswap.server.grpc.client import AsyncClient

PROMPTS = [
    "The quick brown fox",
    "Paris is the capital of",
    "def add(a, b):",
    "Adapters are small low-rank updates",
    "Write a short note about the sea.",
]
TARGETS = ("q_proj", "v_proj", "o_proj")


def prepare(work: Path, base_spec: str, n_adapters: int) -> tuple[Path, Path]:
    """A base folder and a registry with ``n_adapters`` adapters pushed for it."""
    if base_spec == "tiny":
        from loraswap.devtools.tiny import build_tiny_llama

        base_dir = build_tiny_llama(work / "tiny")
    else:
        base_dir = resolve_base(base_spec).path
    base = resolve_base(base_dir)
    registry = open_registry(work / "registry")
    for i in range(n_adapters):
        folder = write_adapter(work / f"adapter-{i}", base_dir, seed=i, rank=4 << (i % 3), targets=TARGETS)
        registry.push(folder, f"bot-{i}", tags=["prod"], base=base)
    return base_dir, work / "registry"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def start_server(
    base_dir: Path, registry: Path, home: Path, slots: int, batch: int, policy: str = "adapter-aware"
) -> tuple[subprocess.Popen, str, str]:
    env = {**os.environ, "LORASWAP_HOME": str(home)}
    args = ["--base", str(base_dir), "--registry", str(registry), "--port", "0", "--metrics-port", "0"]
    args += ["--adapter-slots", str(slots), "--max-rank", "16", "--max-batch-size", str(batch)]
    args += ["--max-seq-len", "256", "--max-queue", "1024", "--admission-policy", policy]
    server = start_serve(args, env)
    return server.proc, server.target, server.metrics_url


async def client_loop(
    target: str, jobs: asyncio.Queue, results: list, n_adapters: int, new_tokens: int, stream_share: float
) -> None:
    async with AsyncClient(target, timeout=120) as client:
        while True:
            try:
                i = jobs.get_nowait()
            except asyncio.QueueEmpty:
                return
            rnd = random.Random(i)
            k = rnd.randrange(n_adapters + 1)
            adapter = "" if k == n_adapters else f"bot-{k}" + (":prod" if i % 2 else "")
            params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            prompt = PROMPTS[i % len(PROMPTS)]
            start = time.perf_counter()
            try:
                if rnd.random() < stream_share:
                    result = [e async for e in client.stream(prompt, adapter=adapter, sampling=params)][
                        -1
                    ].result
                else:
                    result = await client.generate(prompt, adapter=adapter, sampling=params)
                results.append(("OK", time.perf_counter() - start, result))
            except Exception as exc:
                results.append((getattr(getattr(exc, "code", None), "name", type(exc).__name__), 0.0, None))


async def run_load(
    target: str, n: int, clients: int, n_adapters: int, new_tokens: int, stream_share: float
) -> tuple:
    jobs: asyncio.Queue = asyncio.Queue()
    for i in range(n):
        jobs.put_nowait(i)
    results: list = []
    start = time.perf_counter()
    await asyncio.gather(
        *(client_loop(target, jobs, results, n_adapters, new_tokens, stream_share) for _ in range(clients))
    )
    return results, time.perf_counter() - start


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + (
                "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else ""
            )
            out[key] += s.value
            out[s.name] += s.value if s.labels else 0
    return dict(out)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _ms(seconds: list[float], q: float) -> float:
    return round(1000 * percentile(seconds, q), 1)


def measure(
    args: argparse.Namespace, base_dir: Path, registry: Path, home: Path, slots: int, policy: str
) -> dict:
    """One server (``slots`` device slots, ``policy`` admission) under the load; its figures."""
    proc, target, metrics_url = start_server(base_dir, registry, home, slots, args.batch, policy)
    try:
        rss_before = rss_bytes(proc.pid)
        warm = asyncio.run(run_load(target, 2 * args.clients, args.clients, args.adapters, 2, 0.0))
        rss_warm = rss_bytes(proc.pid)
        before = scrape(metrics_url)
        results, wall = asyncio.run(
            run_load(target, args.requests, args.clients, args.adapters, args.new_tokens, args.stream_share)
        )
        after = scrape(metrics_url)
        rss_after = rss_bytes(proc.pid)
        rss_rounds, extra = [], []
        for _ in range(args.extra_rounds):  # the same load again: does RSS keep growing?
            more = args.requests, args.clients, args.adapters, args.new_tokens, args.stream_share
            extra += asyncio.run(run_load(target, *more))[0]
            rss_rounds.append(rss_bytes(proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=120)

    codes = Counter(code for code, _, _ in results + extra)
    ok = [(lat, r) for code, lat, r in results if code == "OK"]
    latencies = [lat for lat, _ in ok]
    ttfts = [r.timings.ttft_s for _, r in ok]
    queued = [r.timings.queue_s for _, r in ok]  # submission to admission, on the server
    tokens = sum(r.completion_tokens for _, r in ok)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    return {
        "base": args.base,
        "policy": policy,
        "torch_threads": torch.get_num_threads(),
        "requests": len(results),
        "extra_round_requests": len(extra),
        "clients": args.clients,
        "adapters": args.adapters,
        "slots": slots,
        "new_tokens": args.new_tokens,
        "failures": {k: v for k, v in codes.items() if k != "OK"},
        "warmup_failures": sum(1 for c, _, _ in warm[0] if c != "OK"),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 1),
        "tokens_per_s": round(tokens / wall, 1),
        "latency_ms": {q: _ms(latencies, p) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "latency_max_ms": round(1000 * max(latencies, default=float("nan")), 1),
        "queue_ms": {"p50": _ms(queued, 0.5), "p99": _ms(queued, 0.99)},
        "longest_wait_ms": round(1000 * max(queued, default=float("nan")), 1),
        "server_ttft_ms": {q: _ms(ttfts, p) for q, p in (("p50", 0.5), ("p99", 0.99))},
        "adapter_loads": delta("loraswap_adapter_loads_total"),
        "device_lookups": delta("loraswap_adapter_cache_lookups_total{tier=device}"),
        "device_hits": delta("loraswap_adapter_cache_hits_total{tier=device}"),
        "mean_batch_size": round(
            delta("loraswap_batch_size_sum") / max(1.0, delta("loraswap_batch_size_count")), 2
        ),
        "server_rss_mib": {
            "before": round(rss_before / 2**20, 1),
            "after_warmup": round(rss_warm / 2**20, 1),
            "after": round(rss_after / 2**20, 1),
            "after_each_extra_round": [round(r / 2**20, 1) for r in rss_rounds],
        },
        "server_exit_code": exit_code,
    }


def ratios(runs: list[dict]) -> dict[str, float]:
    """Median req/s ratios: each slot count against the most slots (per policy), and adapter-aware
    against FIFO (per slot count)."""
    median: dict[tuple[int, str], float] = {}
    for key in {(r["slots"], r["policy"]) for r in runs}:
        median[key] = statistics.median(r["requests_per_s"] for r in runs if (r["slots"], r["policy"]) == key)
    out = {}
    most = max(slots for slots, _ in median)
    for (slots, policy), value in sorted(median.items()):
        if slots != most and (most, policy) in median:
            out[f"{policy}: {slots} vs {most} slots"] = round(value / median[most, policy], 3)
        if policy == "adapter-aware" and (slots, "fifo") in median:
            out[f"{slots} slots: adapter-aware vs fifo"] = round(value / median[slots, "fifo"], 3)
    return out


def _csv(kind: type) -> Callable[[str], list]:
    return lambda text: [kind(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16, help="distinct adapters (plus the base model)")
    parser.add_argument(
        "--slots", type=_csv(int), default=[8], help="device adapter slots; a list (8,32) runs each in turn"
    )
    parser.add_argument(
        "--policy",
        type=_csv(str),
        default=["adapter-aware"],
        help="admission policy: adapter-aware, fifo, or both (adapter-aware,fifo) to run each in turn",
    )
    parser.add_argument("--repeat", type=int, default=1, help="cycle through the configurations this often")
    parser.add_argument("--batch", type=int, default=32, help="engine max batch size")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--stream-share", type=float, default=0.3, help="fraction of requests that stream")
    parser.add_argument(
        "--base", default="tiny", help="'tiny' (random tiny Llama) or a base spec, e.g. default"
    )
    parser.add_argument(
        "--extra-rounds", type=int, default=0, help="repeat the load, recording RSS each time"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    unknown = [p for p in args.policy if p not in ("adapter-aware", "fifo")]
    if unknown or not args.policy or not args.slots or min(args.slots) < 1 or args.repeat < 1:
        parser.error("--policy takes adapter-aware and/or fifo; --slots and --repeat need values >= 1")

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["LORASWAP_HOME"] = str(work / "home")
        base_dir, registry = prepare(work, args.base, args.adapters)
        configs = [(slots, policy) for slots in args.slots for policy in args.policy] * args.repeat
        for i, (slots, policy) in enumerate(configs):  # one server at a time, each with a fresh cache
            runs.append(measure(args, base_dir, registry, work / f"home-{i}", slots, policy))
            print(f"# {policy}, {slots} slots: {runs[-1]['requests_per_s']} req/s", file=sys.stderr)

    figures: dict = runs[0] if len(runs) == 1 else {"runs": runs, "ratios": ratios(runs)}
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    healthy = all(not r["failures"] and r["server_exit_code"] == 0 for r in runs)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())

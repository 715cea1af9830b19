"""The same mixed-adapter requests over the OpenAI-compatible HTTP API and over gRPC, in one run.

One ``loraswap serve`` process (tiny random Llama by default, ``--base default`` for SmolLM2) with both
listeners; ``--requests`` concurrent streaming requests, greedy, spread over the adapters and the base,
over gRPC (the project's async client), over HTTP with a thin client (``httpx2`` + ``json``, the
client-side work of the gRPC client) and over HTTP with the ``openai`` SDK (which parses every chunk into
pydantic models). Each protocol keeps one client for a warm-up round and the measured round (its
connections open, as a long-lived client's are); the protocols alternate their order over ``--repeat``
runs. Reports tokens/s, client-side time to first token (median, p90), and the server's and the client's
CPU seconds over each round (both share this machine's cores), then the median ratios to gRPC.

Run: ``python -m bench.http_vs_grpc [--requests 32] [--new-tokens 64] [--base default] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.grpc_load import PROMPTS, percentile, prepare
from bench.peer import workload
from loraswap.devtools.launch import start_serve
from loraswap.server.engine.api import SamplingParams
from loraswap.server.grpc.client import AsyncClient


def job(i: int, n_adapters: int) -> tuple[str, str]:
    k = i % (n_adapters + 1)
    return ("" if k == n_adapters else f"bot-{k}:prod"), PROMPTS[i % len(PROMPTS)]


async def grpc_one(client: AsyncClient, i: int, n_adapters: int, new_tokens: int, base: str) -> tuple:
    adapter, prompt = job(i, n_adapters)
    start, ttft = time.perf_counter(), None
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    async for event in client.stream(prompt, adapter=adapter, sampling=params):
        ttft = ttft if ttft is not None else time.perf_counter() - start
        last = event
    assert last.result is not None
    return ttft or 0.0, last.result.completion_tokens


async def sdk_one(client: Any, i: int, n_adapters: int, new_tokens: int, base: str) -> tuple:
    adapter, prompt = job(i, n_adapters)
    start, ttft, tokens = time.perf_counter(), None, 0
    stream = await client.completions.create(
        model=adapter or base, prompt=prompt, max_tokens=new_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in stream:
        ttft = ttft if ttft is not None else time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return ttft or 0.0, tokens


async def sse_one(client: Any, i: int, n_adapters: int, new_tokens: int, base: str) -> tuple:
    """A thin HTTP client (:func:`bench.peer.workload.one`), so the client's own cost stays out of the
    server's figures."""
    adapter, prompt = job(i, n_adapters)
    return await workload.one(client, adapter or base, prompt, new_tokens, ignore_eos=False)


def clients(target: str, url: str, n: int) -> dict[str, tuple[Callable[[], Any], Callable]]:
    """Per protocol: how to open its client and one request over it."""
    import httpx2
    import openai

    limits = httpx2.Limits(max_connections=n, max_keepalive_connections=n)
    return {
        "grpc": (lambda: AsyncClient(target, timeout=300), grpc_one),
        "http": (lambda: httpx2.AsyncClient(base_url=f"{url}/v1", timeout=300, limits=limits), sse_one),
        "http-sdk": (
            lambda: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=300),
            sdk_one,
        ),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_protocol(open_client: Callable[[], Any], one: Callable, pid: int, n: int, *args: Any) -> tuple:
    """A warm-up round, then the measured round on the same client (its connections open, as a long-lived
    client's are): seconds, TTFTs, tokens, and the server's and this client's CPU seconds over it."""
    async with open_client() as client:
        await asyncio.gather(*(one(client, i, *args) for i in range(n)))
        server0, client0, start = cpu_seconds(pid), time.process_time(), time.perf_counter()
        out = await asyncio.gather(*(one(client, i, *args) for i in range(n)))
        seconds = time.perf_counter() - start
        cpu = (cpu_seconds(pid) - server0, time.process_time() - client0)
    return seconds, [t for t, _ in out], sum(c for _, c in out), *cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--base", default="tiny")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of the three protocols, order alternating"
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="loraswap-http-bench-"))
    base_dir, registry = prepare(work, args.base, args.adapters)
    env = {**os.environ, "LORASWAP_HOME": str(work / "home")}
    flags = ["--base", str(base_dir), "--registry", str(registry), "--port", "0", "--http-port", "0"]
    flags += ["--metrics-port", "-1", "--adapter-slots", str(args.slots), "--max-rank", "16"]
    flags += ["--max-batch-size", str(args.requests), "--max-seq-len", "256", "--max-queue", "1024"]
    server = start_serve(flags, env)
    assert server.http_url is not None
    try:
        import openai

        base = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="-").models.list().data[0].id
        n, k, t = args.requests, args.adapters, args.new_tokens
        protocols = clients(server.target, server.http_url, n)
        runs: list[dict[str, tuple]] = []
        for r in range(args.repeat):  # the protocols alternate their order from one repeat to the next
            order = list(protocols) if r % 2 == 0 else list(reversed(protocols))
            runs.append({name: asyncio.run(run_protocol(*protocols[name], server.proc.pid, n, k, t, base))
                         for name in order})  # fmt: skip
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    print(f"{n} streaming requests x {t} new tokens, {k} adapters + base, base {args.base}; clients warm")
    head = f"{'run':<4}{'protocol':<9}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'TTFT p50 ms':>13}"
    print(head + f"{'TTFT p90 ms':>13}{'server CPU s':>14}{'client CPU s':>14}")
    ratios, added = {"http": [], "http-sdk": []}, {"http": [], "http-sdk": []}
    for r, rows in enumerate(runs):
        for name in protocols:
            seconds, ttfts, tokens, server_cpu, client_cpu = rows[name]
            p50, p90 = statistics.median(ttfts) * 1e3, percentile(ttfts, 0.9) * 1e3
            line = (
                f"{r:<4}{name:<9}{tokens:>8}{seconds:>9.2f}{tokens / seconds:>10.1f}{p50:>13.1f}{p90:>13.1f}"
            )
            print(line + f"{server_cpu:>14.2f}{client_cpu:>14.2f}")
        g_s, g_ttft, g_tok, *_ = rows["grpc"]
        for name in ratios:
            h_s, h_ttft, h_tok, *_ = rows[name]
            ratios[name].append((h_tok / h_s) / (g_tok / g_s))
            added[name].append((statistics.median(h_ttft) - statistics.median(g_ttft)) * 1e3)
    for name in ratios:
        spread = ", ".join(f"{x:.2f}" for x in ratios[name])
        print(
            f"{name}/gRPC tokens/s: median {statistics.median(ratios[name]):.2f}x ({spread}); "
            f"added TTFT p50: median {statistics.median(added[name]):+.1f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

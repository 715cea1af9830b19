"""The same mixed-adapter requests over the OpenAI-compatible HTTP API and over gRPC, in one run.

One ``loraswap serve`` process (tiny random Llama by default, ``--base default`` for SmolLM2) with both
listeners; ``--requests`` concurrent streaming requests, greedy, spread over the adapters and the base,
sent first over gRPC and then over HTTP (``openai.AsyncOpenAI``), after one warm-up round of each.
Reports tokens/s over the round and the client-side time to first token (median and p90) per protocol.

Run: ``python -m bench.http_vs_grpc [--requests 32] [--new-tokens 64] [--base default]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from bench.grpc_load import PROMPTS, percentile, prepare
from loraswap.devtools.launch import start_serve
from loraswap.server.engine.api import SamplingParams
from loraswap.server.grpc.client import AsyncClient


def job(i: int, n_adapters: int) -> tuple[str, str]:
    k = i % (n_adapters + 1)
    return ("" if k == n_adapters else f"bot-{k}:prod"), PROMPTS[i % len(PROMPTS)]


async def grpc_round(target: str, n: int, n_adapters: int, new_tokens: int) -> tuple[float, list[float], int]:
    async with AsyncClient(target, timeout=300) as client:

        async def one(i: int) -> tuple[float, int]:
            adapter, prompt = job(i, n_adapters)
            start, ttft = time.perf_counter(), None
            params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
            async for event in client.stream(prompt, adapter=adapter, sampling=params):
                ttft = ttft if ttft is not None else time.perf_counter() - start
                last = event
            assert last.result is not None
            return ttft or 0.0, last.result.completion_tokens

        start = time.perf_counter()
        out = await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - start, [t for t, _ in out], sum(c for _, c in out)


async def http_round(url: str, n: int, n_adapters: int, new_tokens: int, base: str) -> tuple:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=300)

    async def one(i: int) -> tuple[float, int]:
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

    start = time.perf_counter()
    out = await asyncio.gather(*(one(i) for i in range(n)))
    await client.close()
    return time.perf_counter() - start, [t for t, _ in out], sum(c for _, c in out)


async def sse_round(url: str, n: int, n_adapters: int, new_tokens: int, base: str) -> tuple:
    """The HTTP round with a thin client: ``httpx2`` (the openai SDK's own transport) streaming, each ``data:`` line parsed with ``json``
    (the work the gRPC client does per message), so the client's own cost stays out of the server's."""
    import httpx2 as httpx

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=f"{url}/v1", timeout=300, limits=limits) as client:

        async def one(i: int) -> tuple[float, int]:
            adapter, prompt = job(i, n_adapters)
            body = {"model": adapter or base, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            start, ttft, tokens = time.perf_counter(), None, 0
            async with client.stream("POST", "/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            return ttft or 0.0, tokens

        start = time.perf_counter()
        out = await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - start, [t for t, _ in out], sum(c for _, c in out)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, run) -> tuple:
    """``run()``'s result plus the server's and this client's CPU seconds over it."""
    server0, client0 = cpu_seconds(pid), time.process_time()
    out = run()
    return (*out, cpu_seconds(pid) - server0, time.process_time() - client0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--base", default="tiny")
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
        asyncio.run(grpc_round(server.target, n, k, t))  # warm-up: adapters loaded, kernels compiled
        asyncio.run(http_round(server.http_url, n, k, t, base))
        asyncio.run(sse_round(server.http_url, n, k, t, base))
        pid = server.proc.pid
        rows = {
            "grpc": measured(pid, lambda: asyncio.run(grpc_round(server.target, n, k, t))),
            "http": measured(pid, lambda: asyncio.run(sse_round(server.http_url, n, k, t, base))),
            "http-sdk": measured(pid, lambda: asyncio.run(http_round(server.http_url, n, k, t, base))),
        }
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    print(f"{n} streaming requests x {t} new tokens, {k} adapters + base, base {args.base}")
    head = f"{'protocol':<9}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'TTFT p50 ms':>13}{'TTFT p90 ms':>13}"
    print(head + f"{'server CPU s':>14}{'client CPU s':>14}")
    for name, (seconds, ttfts, tokens, server_cpu, client_cpu) in rows.items():
        p50, p90 = statistics.median(ttfts) * 1e3, percentile(ttfts, 0.9) * 1e3
        line = f"{name:<9}{tokens:>8}{seconds:>9.2f}{tokens / seconds:>10.1f}{p50:>13.1f}{p90:>13.1f}"
        print(line + f"{server_cpu:>14.2f}{client_cpu:>14.2f}")
    (g_s, g_ttft, g_tok, *_), (h_s, h_ttft, h_tok, *_) = rows["grpc"], rows["http"]
    ratio = (h_tok / h_s) / (g_tok / g_s)
    added = (statistics.median(h_ttft) - statistics.median(g_ttft)) * 1e3
    print(f"HTTP/gRPC tokens/s: {ratio:.2f}x; HTTP added TTFT (p50): {added:+.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

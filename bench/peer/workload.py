"""The requests both servers get, over the same thin OpenAI client (``httpx2`` streaming, ``json`` per
chunk), greedy with ``ignore_eos`` so that every request generates exactly its token count on both.

Prompts are made unique per round (a round never reuses an earlier round's prompt), so a prefix cache
has nothing to reuse between the warm-up and the measured round.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import httpx2

PROMPTS = (
    "Write a short story about a lighthouse keeper",
    "Explain how a refrigerator works",
    "List five uses for a paperclip",
    "Describe the water cycle to a child",
    "Summarise the plot of a heist film",
    "Give advice to a first-time gardener",
    "Compare trains and planes for travel",
    "Write a poem about the sea at night",
)


@dataclass
class Round:
    """One round of concurrent requests.

    Attributes:
        seconds: Wall time from the first request sent to the last one done.
        tokens: Completion tokens over all requests.
        ttfts: Each request's time to its first token, seconds.
    """

    seconds: float
    tokens: int
    ttfts: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def prompt(round_id: str, i: int) -> str:
    return f"{PROMPTS[i % len(PROMPTS)]} (request {round_id}-{i})."


async def one(
    client: httpx2.AsyncClient,
    model: str,
    text: str,
    max_tokens: int,
    first: asyncio.Event | None = None,
    ignore_eos: bool = True,
) -> tuple[float, int]:
    """One greedy streaming completion: (time to first token, completion tokens); ``first`` is set at the
    first token. The thin client of the HTTP benches: ``httpx2`` streaming, each ``data:`` line parsed
    with ``json`` (the work the gRPC client does per message)."""
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    if ignore_eos:
        body["ignore_eos"] = True
    start, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - start
                if first is not None:
                    first.set()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, tokens


def client(url: str, n: int) -> httpx2.AsyncClient:
    limits = httpx2.Limits(max_connections=n, max_keepalive_connections=n)
    return httpx2.AsyncClient(base_url=f"{url}/v1", timeout=600, limits=limits)


async def concurrent_round(
    url: str, models: list[str], max_tokens: int, round_id: str, warm: bool = True
) -> Round:
    """``len(models)`` requests at once, request i on ``models[i]``; with ``warm``, after a warm-up round of
    the same shape on the same client (connections open, adapters loaded)."""
    async with client(url, len(models)) as http:
        if warm:
            warmup = (one(http, m, prompt(f"{round_id}w", i), max_tokens) for i, m in enumerate(models))
            await asyncio.gather(*warmup)
        start = time.perf_counter()
        out = await asyncio.gather(
            *(one(http, m, prompt(round_id, i), max_tokens) for i, m in enumerate(models))
        )
        seconds = time.perf_counter() - start
    return Round(seconds, sum(t for _, t in out), [t for t, _ in out])


async def ttft_idle_and_loaded(
    url: str, background: list[str], probe: str, probes: int, round_id: str, load_tokens: int
) -> tuple[float, float]:
    """Median time to first token of a 1-token ``probe`` request, alone, and while ``background`` requests
    (one per entry) are all decoding (each has its first token; they run long enough to outlast the probes
    and are then cancelled)."""
    async with client(url, len(background) + 1) as http:
        await one(http, probe, prompt(f"{round_id}w", 0), 1)
        idle = [(await one(http, probe, prompt(f"{round_id}i", k), 1))[0] for k in range(probes)]
        started = [asyncio.Event() for _ in background]
        load = [
            asyncio.ensure_future(one(http, m, prompt(f"{round_id}b", i), load_tokens, started[i]))
            for i, m in enumerate(background)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=600)
        loaded = []
        for k in range(probes):  # each probe arrives at another point of the running step
            await asyncio.sleep(0.03 + 0.02 * k)
            loaded.append((await one(http, probe, prompt(f"{round_id}l", k), 1))[0])
        done = [t for t in load if t.done()]
        for task in load:
            task.cancel()
        await asyncio.gather(*load, return_exceptions=True)
    if done:
        raise RuntimeError(f"{len(done)} background requests ended before the probes did: raise load_tokens")
    return statistics.median(idle), statistics.median(loaded)

"""The chaos soak's load: closed-loop gRPC clients with a deadline and a watchdog on every request, the
server's RSS sampled by request count, and what is left inside the server at the end.

A client that gets UNAVAILABLE (the server down, restarting) waits before its next request, doubling
the wait up to :data:`MAX_BACKOFF_S` (as a real client backs off); the failed request is counted, never
retried.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.chaos_check import HUNG, OK, Outcome
from bench.chaos_control import FaultController
from bench.chaos_faults import ServerSupervisor
from loraswap import errors
from loraswap.server.engine.api import GenerationResult, SamplingParams
from loraswap.server.grpc import status
from loraswap.server.grpc.client import AsyncClient, ServerError

CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
MAX_BACKOFF_S = 4.0
POLL_S = 0.005


def code_of(exc: BaseException) -> str:
    """The gRPC status code name a client error stands for (the client raises a domain error class per
    code: :mod:`loraswap.server.grpc.status`), or the error's class name when it stands for none."""
    if isinstance(exc, ServerError):
        return exc.code.name
    for cls, code in status.STATUS_TABLE:
        if isinstance(exc, cls):
            return code.name
    return type(exc).__name__


@dataclass
class LoadSettings:
    """How the clients send.

    Attributes:
        clients: Concurrent clients, one channel each.
        deadline_s: Every request's gRPC deadline.
        margin_s: Past the deadline by this much without an outcome, a request is hung.
        new_tokens: ``max_new_tokens`` (greedy, EOS ignored).
        rate: Requests per second over all clients (0: as fast as they answer).
    """

    clients: int
    deadline_s: float
    margin_s: float
    new_tokens: int
    rate: float


class Load:
    """Hands out the requests (waiting at a fault's place until it started) and runs the clients.

    Args:
        target: The server's ``host:port``.
        jobs: The requests (filled in as outcomes).
        settings: How to send.
        controller: The faults (told how many requests were handed out).
        clock: Seconds since the load began.
    """

    def __init__(
        self,
        target: str,
        jobs: list[Outcome],
        settings: LoadSettings,
        controller: FaultController,
        clock: Callable[[], float],
    ) -> None:
        self.target, self.jobs, self.settings = target, jobs, settings
        self.controller, self.clock = controller, clock
        self.completed = 0
        self._next = 0

    def run(self) -> list[Outcome]:
        """Send every request; the outcomes in request order."""
        asyncio.run(self._clients())
        return self.jobs

    async def _clients(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(self.settings.clients)))

    async def _client(self) -> None:
        backoff = 0.0
        async with AsyncClient(
            self.target, timeout=self.settings.deadline_s, options=CHANNEL_OPTIONS
        ) as client:
            while (job := await self._take()) is not None:
                await self._send(client, job)
                self.completed += 1
                backoff = min(MAX_BACKOFF_S, max(0.25, 2 * backoff)) if job.code == "UNAVAILABLE" else 0.0
                await asyncio.sleep(backoff)

    async def _take(self) -> Outcome | None:
        while self._next < len(self.jobs):
            i = self._next
            early = self.settings.rate and self.clock() < i / self.settings.rate
            if self.controller.blocks(i) or early:
                await asyncio.sleep(POLL_S)
                continue
            self._next = self.controller.issued = i + 1
            return self.jobs[i]
        return None

    async def _send(self, client: AsyncClient, job: Outcome) -> None:
        job.started_s = self.clock()
        limit = self.settings.deadline_s + self.settings.margin_s
        try:
            result = await asyncio.wait_for(self._call(client, job), timeout=limit)
        except TimeoutError:
            job.code, job.detail = HUNG, f"no answer nor status after {limit:.0f} s"
        except errors.LoraswapError as exc:
            job.code, job.detail = code_of(exc), str(exc)[:500]
        except Exception as exc:  # every outcome is counted: an error the client should
            job.code, job.detail = type(exc).__name__, str(exc)[:500]  # not raise is kept by its class
        else:
            if result is None:
                job.code, job.detail = "NO_RESULT", "the stream ended without a result"
            else:
                job.code, job.digest = OK, result.adapter_digest
                job.token_ids, job.prompt_tokens = tuple(result.token_ids), result.prompt_tokens
        job.seconds = round(self.clock() - job.started_s, 3)
        job.started_s = round(job.started_s, 3)

    async def _call(self, client: AsyncClient, job: Outcome) -> GenerationResult | None:
        params = SamplingParams(max_new_tokens=self.settings.new_tokens, ignore_eos=True)
        if not job.stream:
            return await client.generate(job.prompt, adapter=job.ref, sampling=params)
        result = None
        async for event in client.stream(job.prompt, adapter=job.ref, sampling=params):
            result = event.result or result
        return result


class RssSampler:
    """Samples the server's RSS each time another ``every`` requests have completed (waiting for the
    server when it is down), plus once before the load.

    Args:
        server: The server's supervisor.
        every: Requests between samples.
        completed: How many requests have completed.
    """

    def __init__(self, server: ServerSupervisor, every: int, completed: Callable[[], int]) -> None:
        self.server, self.every, self.completed = server, every, completed
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-rss", daemon=True)

    def start(self) -> None:
        self._take(0)
        self._thread.start()

    def stop(self) -> None:
        """Stop; a last sample is taken if the final mark was reached."""
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        mark = self.every
        while True:
            if self.completed() >= mark:
                if self._take(mark):
                    mark += self.every
                    continue
            elif self._stop.is_set():
                return
            time.sleep(0.05)

    def _take(self, mark: int) -> bool:
        rss = self.server.rss_mib()
        if rss is None:
            return False
        self.samples.append({"requests": mark, "rss_mib": round(rss, 1), "server": self.server.starts})
        print(f"# {mark} requests: server RSS {rss:.0f} MiB", file=sys.stderr, flush=True)
        return True


def stuck_at_end(metrics_url: str, wait_s: float) -> int:
    """Requests still queued or running in the server, after waiting up to ``wait_s`` for them to go
    (the load is over: anything left is stuck). Counts queued requests, plus one per adapter listed as
    running or waiting by ``vllm:lora_requests_info``; -1 when the metrics cannot be read (unknown)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            left = requests_in_server(urllib.request.urlopen(metrics_url, timeout=10).read().decode())
        except OSError:
            left = -1
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def requests_in_server(metrics: str) -> int:
    """Requests queued in the server, plus one per adapter ``vllm:lora_requests_info`` lists as running or
    waiting, from the text of its metrics endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    left = 0
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "loraswap_queue_depth":
                left += int(sample.value)
            elif sample.name == "vllm:lora_requests_info":
                for label in ("running_lora_adapters", "waiting_lora_adapters"):
                    left += len([a for a in sample.labels.get(label, "").split(",") if a])
    return left

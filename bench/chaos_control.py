"""The chaos soak's fault controller: injects the faults of a schedule, one at a time, as the request
count reaches each one's place (:mod:`bench.chaos_faults` describes the kinds).

The load waits at a fault's place until the fault has started, so every fault happens with requests
in flight around it however fast the load runs.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.chaos_faults import WEIGHTS_FILE, Catalog, Churn, ServerSupervisor, corrupt_cache
from bench.chaos_net import FaultProxy, MotoServer
from loraswap.errors import LoraswapError
from loraswap.server.grpc.client import Client

DOWNLOAD_S = 1.5  # how long the throttled download of the server-kill fault takes
POLL_S = 0.005


@dataclass
class FaultRecord:
    """One injected fault.

    Attributes:
        kind: Its kind (:data:`bench.chaos_faults.KINDS`).
        at_request: The request count it was scheduled at.
        started_s: When it started (seconds since the load began).
        ended_s: When everything was back (the same clock).
        detail: What was done (kind-specific).
    """

    kind: str
    at_request: int
    started_s: float
    ended_s: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rig:
    """What the faults act on.

    Attributes:
        proxy: The proxy in front of moto (the server and the writers talk to it).
        moto: The S3 server.
        bucket: The registry's bucket.
        server: The server's supervisor.
        churn: The registry writers (paused while moto's objects are copied).
        catalog: The adapter versions.
        window_s: How long an outage lasts.
        deadline_s: The requests' deadline (also the server-kill's ``LoadAdapter`` call's).
    """

    proxy: FaultProxy
    moto: MotoServer
    bucket: str
    server: ServerSupervisor
    churn: Churn
    catalog: Catalog
    window_s: float
    deadline_s: float


def schedule(
    kinds: list[str], requests: int, first: float = 0.04, last: float = 0.9
) -> list[tuple[int, str]]:
    """``kinds`` spread evenly over the requests between fractions ``first`` and ``last`` of the run."""
    if len(kinds) == 1:
        return [(int(first * requests), kinds[0])]
    step = (last - first) / (len(kinds) - 1)
    return [(int((first + i * step) * requests), kind) for i, kind in enumerate(kinds)]


class FaultController:
    """Runs ``plan`` (``(request count, kind)`` pairs, in order) on a thread of its own.

    Args:
        rig: What the faults act on.
        plan: The schedule.
        seed: Seeds the choices (which cached file, when exactly to kill).
        clock: Seconds since the load began.
    """

    def __init__(self, rig: Rig, plan: list[tuple[int, str]], seed: int, clock: Callable[[], float]) -> None:
        self.rig, self.plan, self.clock = rig, sorted(plan), clock
        self.rnd = random.Random(seed)
        self.records: list[FaultRecord] = []
        self.issued = 0  # requests handed to clients so far (written by the load)
        self._started = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-faults", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        """Let the remaining faults run (each with what load is left) and wait for the last to end."""
        self._thread.join()

    def blocks(self, index: int) -> bool:
        """Whether request ``index`` must wait: a fault placed at or before it has not started yet."""
        return self._started < len(self.plan) and self.plan[self._started][0] <= index

    def _run(self) -> None:
        for at, kind in self.plan:
            while self.issued < at and not self._stop.is_set():
                time.sleep(POLL_S)
            record = FaultRecord(kind, at, round(self.clock(), 3))
            self.records.append(record)
            self._started += 1
            print(f"# {record.started_s:7.1f} s: {kind} at request {at}", file=sys.stderr, flush=True)
            record.detail = self._inject(kind)
            record.ended_s = round(self.clock(), 3)
            print(f"# {record.ended_s:7.1f} s: {kind} over: {record.detail}", file=sys.stderr, flush=True)

    def _inject(self, kind: str) -> dict[str, Any]:
        group, _, what = kind.partition("-")
        if kind == "s3-kill":
            return self._kill_s3()
        if kind == "server-kill":
            return self._kill_server()
        if group == "s3":
            return self._proxy_window(what)
        return corrupt_cache(self.rig.server.cache, what, self.rnd)

    def _proxy_window(self, mode: str) -> dict[str, Any]:
        proxy = self.rig.proxy
        accepted = proxy.accepted
        proxy.set_mode(mode)
        time.sleep(self.rig.window_s)
        proxy.set_mode("pass")
        return {
            "mode": mode,
            "window_s": self.rig.window_s,
            "connections_in_window": proxy.accepted - accepted,
        }

    def _kill_s3(self) -> dict[str, Any]:
        rig = self.rig
        with rig.churn.gate:  # nothing is written between the copy and the restore
            objects = rig.moto.snapshot(rig.bucket)
            rig.moto.kill()
            killed = time.monotonic()
            time.sleep(rig.window_s)
            rig.moto.start()
            rig.moto.restore(rig.bucket, objects)
            rig.proxy.upstream_port = rig.moto.port  # until now: connection refused, then reset
        return {"objects_kept": len(objects), "down_s": round(time.monotonic() - killed, 1)}

    def _kill_server(self) -> dict[str, Any]:
        rig = self.rig
        name, digest = rig.catalog.cold.pop(0) if rig.catalog.cold else ("", "")
        detail: dict[str, Any] = {"adapter": f"{name}@{digest}"}
        if name:
            size = (rig.catalog.folders[digest] / WEIGHTS_FILE).stat().st_size
            rig.proxy.throttle_bytes_s = max(1024, int(size / DOWNLOAD_S))
            rig.proxy.set_mode("throttle")
            outcome: dict[str, str] = {}
            loader = threading.Thread(target=self._load, args=(f"{name}@{digest}", outcome), daemon=True)
            loader.start()
            detail["download_in_progress"] = self._wait_for_download()
        rig.server.kill()
        rig.proxy.set_mode("pass")
        if name:
            loader.join(timeout=rig.deadline_s + 10)
            detail["load_outcome"] = outcome.get("outcome", "no answer")
        detail["unseen_corruption"] = corrupt_cache(rig.server.cache, "unseen", self.rnd)
        rig.server.start()
        detail["restart_s"] = rig.server.startup_s[-1]
        return detail

    def _load(self, ref: str, outcome: dict[str, str]) -> None:
        with Client(self.rig.server.server.target, timeout=self.rig.deadline_s) as client:  # type: ignore[union-attr]
            try:
                client.load_adapter(ref, "host")
                outcome["outcome"] = "OK"
            except LoraswapError as exc:
                outcome["outcome"] = type(exc).__name__

    def _wait_for_download(self) -> bool:
        """Wait (at most the download's length) for a download folder in the server's cache, then a
        random part of the download's length; whether one is there at the end."""
        cache = self.rig.server.cache
        deadline = time.monotonic() + DOWNLOAD_S * 2
        while time.monotonic() < deadline and not any(cache.glob(".tmp-*")):
            time.sleep(POLL_S)
        time.sleep(self.rnd.uniform(0.0, DOWNLOAD_S / 3))
        return any(cache.glob(".tmp-*"))

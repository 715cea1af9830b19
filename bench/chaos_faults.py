"""The chaos soak's faults: the server under a supervisor, disk-cache corruption, registry churn, and the
controller that injects the faults on a schedule (by request count).

Fault kinds (:data:`KINDS`):

* ``s3-stall``, ``s3-refuse``, ``s3-reset``, ``s3-blackhole``: the proxy in front of the S3 endpoint in
  that mode for one window (:mod:`bench.chaos_net`);
* ``s3-kill``: moto SIGKILLed, down for one window, started again with its objects put back (registry
  writers paused meanwhile, so nothing written is lost: an outage, not a store that forgot);
* ``server-kill``: the server SIGKILLed while it downloads an adapter (a never-requested version, asked
  for with ``LoadAdapter`` while the proxy throttles, so the download is provably in progress); while
  it is down one cached file is damaged in a way its stat marker cannot see (size, mtime and inode
  kept); then it is started again;
* ``cache-overwrite``, ``cache-truncate``, ``cache-replace``: a file of the running server's disk cache
  overwritten in place with random bytes, cut to half, or replaced (by rename) with random bytes.

Registry churn (:class:`Churn`) runs all along: a tag mover, a pusher and ``rm`` + ``gc`` of scratch
names.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraswap.devtools.launch import ServeProcess, start_serve
from loraswap.errors import LoraswapError, NotFoundError

KINDS = (
    "s3-stall",
    "s3-refuse",
    "s3-reset",
    "s3-blackhole",
    "s3-kill",
    "server-kill",
    "cache-overwrite",
    "cache-truncate",
    "cache-replace",
)
WEIGHTS_FILE = "adapter_model.safetensors"
PROD = "prod"


@dataclass
class Catalog:
    """Every adapter version the bench made, and what clients may ask for.

    Attributes:
        served: Name → its versions' digests (clients ask for these; never removed).
        scratch: Name → folders the pusher pushes and the remover removes.
        cold: (name, digest) of versions no client asks for (each server kill loads one).
        folders: Digest → the folder pushed as that version.
        names: Digest → its name.
    """

    served: dict[str, list[str]] = field(default_factory=dict)
    scratch: dict[str, list[Path]] = field(default_factory=dict)
    cold: list[tuple[str, str]] = field(default_factory=list)
    folders: dict[str, Path] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, name: str, digest: str, folder: Path) -> None:
        with self.lock:
            self.folders[digest] = folder
            self.names[digest] = name


class ServerSupervisor:
    """``loraswap serve`` on fixed ports, killed and started again on demand; an exit nobody asked for
    is recorded as a crash and the server is started again.

    Args:
        args: ``serve`` arguments (fixed ``--port`` and ``--metrics-port``).
        env: Its environment.
        home: Its ``LORASWAP_HOME`` (the disk cache is ``home/adapters``).
        logs: Folder that receives each process's stderr (``server-<n>.log``).
    """

    def __init__(self, args: list[str], env: dict[str, str], home: Path, logs: Path) -> None:
        self.args, self.env, self.home, self.logs = args, env, home, logs
        self.server: ServeProcess | None = None
        self.starts = 0
        self.kills = 0
        self.crashes: list[dict[str, Any]] = []
        self.startup_s: list[float] = []
        self._expected_down = True
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="chaos-supervisor", daemon=True)

    @property
    def cache(self) -> Path:
        return self.home / "adapters"

    def start(self) -> None:
        """Start the server; return once it serves."""
        with self._lock:
            started = time.monotonic()
            self.server = start_serve(self.args, self.env, timeout=600)
            self.startup_s.append(round(time.monotonic() - started, 2))
            self.starts += 1
            self._expected_down = False
        if not self._monitor.is_alive():
            self._monitor.start()

    def kill(self) -> None:
        """SIGKILL the server."""
        with self._lock:
            self._expected_down = True
            if self.server is not None:
                self.server.kill()
                self._save_log()
                self.kills += 1

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM the server and wait for it; its exit code (None if it had to be killed)."""
        self._stop.set()
        with self._lock:
            self._expected_down = True
            if self.server is None:
                return None
            self.server.proc.terminate()
            try:
                code: int | None = self.server.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.server.kill()
                code = None
            self._save_log()
            return code

    def rss_mib(self) -> float | None:
        """Resident set size of the running server, MiB (None while it is down)."""
        server = self.server
        if server is None or server.proc.poll() is not None:
            return None
        try:
            for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                server = self.server
                if self._expected_down or server is None or server.proc.poll() is None:
                    continue
                code = server.wait(timeout=10)
                self._save_log()
                tail = "".join(server.log[-20:])
                self.crashes.append({"exit_code": code, "at_s": time.monotonic(), "log_tail": tail})
                self.start()

    def _save_log(self) -> None:
        if self.server is not None:
            self.logs.mkdir(parents=True, exist_ok=True)
            (self.logs / f"server-{self.starts}.log").write_text("".join(self.server.log))


def corrupt_cache(cache: Path, how: str, rnd: random.Random) -> dict[str, Any]:
    """Damage the weights file of one cached adapter version under ``cache``.

    Args:
        cache: An adapter disk cache (``<LORASWAP_HOME>/adapters``).
        how: ``overwrite`` (random bytes over part of the tensor data, in place), ``unseen`` (the same,
            then the mtime put back: size, mtime and inode unchanged, so a stat check cannot see it),
            ``truncate`` (cut to half its size) or ``replace`` (a file of random bytes renamed over it).
        rnd: Picks the version and the bytes.

    Returns:
        What was done: the version's digest, ``how`` and the byte range (empty when nothing is cached).
    """
    folders = sorted(p for p in cache.glob("[0-9a-f]" * 8 + "*") if (p / WEIGHTS_FILE).is_file())
    if not folders:
        return {}
    path = rnd.choice(folders) / WEIGHTS_FILE
    before = path.stat()
    with open(path, "rb") as handle:
        (header,) = struct.unpack("<Q", handle.read(8))
    data_start, size = 8 + header, before.st_size
    begin = rnd.randrange(data_start, max(data_start + 1, size - 64))
    if how in ("overwrite", "unseen"):
        with open(path, "r+b") as handle:
            handle.seek(begin)
            handle.write(rnd.randbytes(min(64, size - begin)))
        if how == "unseen":
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    elif how == "truncate":
        begin = size // 2
        os.truncate(path, begin)
    elif how == "replace":
        begin = 0
        temp = path.with_name(f".chaos-{rnd.getrandbits(32):08x}")
        temp.write_bytes(rnd.randbytes(size))
        os.replace(temp, path)
    else:
        raise ValueError(f"unknown corruption {how!r}")
    return {"digest": "sha256:" + path.parent.name, "how": how, "from_byte": begin, "size": size}


class Churn:
    """Registry writers beside the load: a tag mover, a pusher and a remover (``rm`` + ``gc``).

    Each operation runs under :attr:`gate`, so holding the gate pauses them all (the moto kill does,
    while it copies the bucket). Failures are counted by error class, never retried.

    Args:
        registry: The writers' registry (through the proxy).
        catalog: The versions; pushes record theirs in it.
        base: The base every push names (as the first pushes did, so a push again is the same version).
        period_s: Seconds between two tag moves (pushes every 2, removals every 3 periods).
        gc_grace_s: ``gc``'s grace period (longer than any push under the faults).
        seed: Seeds the choices.
    """

    def __init__(
        self, registry: Any, catalog: Catalog, base: Any, period_s: float, gc_grace_s: float, seed: int
    ) -> None:
        self.registry, self.catalog, self.base = registry, catalog, base
        self.period_s, self.gc_grace_s = period_s, gc_grace_s
        self.rnd = random.Random(seed)
        self.gate = threading.Lock()
        self.done: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self._stop = threading.Event()
        jobs = ((self.move_tag, 1), (self.push, 2), (self.remove, 3))
        self._threads = [
            threading.Thread(target=self._loop, args=(job, every), name=f"chaos-{job.__name__}", daemon=True)
            for job, every in jobs
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join(timeout=120)

    def _loop(self, job: Callable[[], str], every: int) -> None:
        while not self._stop.wait(self.period_s * every):
            with self.gate:
                self.run(job)

    def run(self, job: Callable[[], str]) -> None:
        """Run one operation, counting its outcome (a loraswap error by class; anything else is an
        error the registry should not let escape, kept with its message)."""
        try:
            self.done[job()] += 1
        except LoraswapError as exc:
            self.errors[f"{job.__name__}: {type(exc).__name__}"] += 1
        except Exception as exc:  # the registry API let a foreign error out: a finding
            self.errors[f"{job.__name__}: unexpected {type(exc).__name__}"] += 1
            self.unexpected.append(f"{job.__name__}: {type(exc).__name__}: {exc}"[:500])

    def move_tag(self) -> str:
        """Point ``prod`` of a served name with several versions at another of them."""
        with self.catalog.lock:
            names = sorted(n for n, digests in self.catalog.served.items() if len(digests) > 1)
        if not names:
            return "tag move skipped"
        name = self.rnd.choice(names)
        digest = self.rnd.choice(self.catalog.served[name])
        self.registry.tag(f"{name}@{digest}", PROD)
        return "tag moves"

    def push(self) -> str:
        """Push a scratch version (tagged ``prod``), or push a served version again (moves ``latest``)."""
        if self.rnd.random() < 0.5 and self.catalog.scratch:
            name = self.rnd.choice(sorted(self.catalog.scratch))
            folder = self.rnd.choice(self.catalog.scratch[name])
            manifest = self.registry.push(folder, name, tags=[PROD], base=self.base)
            self.catalog.record(name, manifest.digest, folder)
            return "scratch pushes"
        name = self.rnd.choice(sorted(self.catalog.served))
        folder = self.catalog.folders[self.rnd.choice(self.catalog.served[name])]
        manifest = self.registry.push(folder, name, base=self.base)
        self.catalog.record(name, manifest.digest, folder)  # the same digest: it is the same content
        return "served re-pushes"

    def remove(self) -> str:
        """``rm --force`` the versions of a scratch name, then ``gc``."""
        if self.catalog.scratch:
            name = self.rnd.choice(sorted(self.catalog.scratch))
            try:
                entries = self.registry.list(name)
            except NotFoundError:  # none pushed since the last removal
                entries = []
            for entry in entries:
                self.registry.rm(f"{name}@{entry.manifest.digest}", force=True)
                self.done["rm"] += 1
        report = self.registry.gc(grace_seconds=self.gc_grace_s)
        self.done["gc blobs removed"] += len(report.removed)
        return "gc"

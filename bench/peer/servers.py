"""The two servers under test, each started the same way: spawned, then ready once ``/v1/models`` answers.

Both serve the same base folder and the same 16 PEFT adapter folders over the OpenAI API; loraswap reads
the adapters from a registry they were pushed to. Memory is the proportional set size (PSS) summed over
the server's process tree (vLLM runs an API server, an engine core and a worker process; PSS counts
pages they share once).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from loraswap.devtools.launch import start_serve
from loraswap.precision import default_precision


@dataclass
class Running:
    """A started server.

    Attributes:
        name: ``vllm`` or ``loraswap``.
        proc: Its root process.
        url: Base URL of its OpenAI API (``http://127.0.0.1:PORT``).
        base_model: The model id that means "no adapter".
        startup_s: Seconds from spawn to the first answer of ``/v1/models``.
        log: Where its output goes (vLLM), for a failed start.
    """

    name: str
    proc: subprocess.Popen
    url: str
    base_model: str
    startup_s: float
    log: Path | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> str:
    """Poll ``/v1/models`` until it answers; the first model id (the base)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as answer:
                return json.loads(answer.read())["data"][0]["id"]
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{url} was not ready within {timeout} s")


def start_vllm(
    vllm: Path, base_dir: Path, adapters: dict[str, Path], work: Path, rank: int, batch: int, seq_len: int,
    cores: str,
) -> Running:  # fmt: skip
    """``vllm serve`` with LoRA on, every adapter registered at start. ``cores``: ``both`` binds its
    compute threads to both cores; ``default`` leaves vLLM's own choice (one core kept for its front end)."""
    port = free_port()
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    if cores == "both":
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{os.cpu_count() - 1}"
    modules = [f"{name}={folder}" for name, folder in adapters.items()]
    dtype = str(default_precision(torch.device("cpu")).dtype).removeprefix("torch.")  # as loraswap's
    args = [str(vllm), "serve", str(base_dir), "--served-model-name", "base", "--dtype", dtype]
    args += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(seq_len)]
    args += ["--max-num-seqs", str(batch), "--enable-lora", "--max-loras", str(len(adapters))]
    args += ["--max-cpu-loras", str(len(adapters)), "--max-lora-rank", str(rank), "--lora-modules", *modules]
    log = work / f"vllm-{port}.log"
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    base = wait_ready(url, proc, timeout=600, log=log)
    return Running("vllm", proc, url, base, time.monotonic() - start, log)


def start_loraswap(
    base_dir: Path, registry: Path, home: Path, slots: int, rank: int, batch: int, seq_len: int
) -> Running:
    """``loraswap serve`` with its HTTP listener (gRPC beside it, metrics off)."""
    env = {**os.environ, "LORASWAP_HOME": str(home)}
    args = ["--base", str(base_dir), "--registry", str(registry), "--port", "0", "--http-port", "0"]
    args += ["--metrics-port", "-1", "--adapter-slots", str(slots), "--max-rank", str(rank)]
    args += ["--max-batch-size", str(batch), "--max-seq-len", str(seq_len), "--max-queue", "1024"]
    start = time.monotonic()
    served = start_serve(args, env)
    assert served.http_url is not None
    base = wait_ready(served.http_url, served.proc, timeout=60)
    return Running("loraswap", served.proc, served.http_url, base, time.monotonic() - start)


def tree_pids(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def pss_bytes(root: int) -> int:
    """Proportional set size of ``root``'s process tree (``/proc/PID/smaps_rollup``)."""
    total = 0
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def stop(server: Running) -> None:
    """SIGTERM the server's process group (vLLM's children with it), SIGKILL after 60 s."""
    pids = tree_pids(server.proc.pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(timeout=60)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.proc.wait()

"""Running ``loraswap serve`` as a child process (demo, load bench, tests): start, wait, read its ports."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class ServeProcess:
    """A ``loraswap serve`` child process that reported ``serving on``.

    Attributes:
        proc: The process (its stderr is drained into ``log`` by a reader thread).
        target: ``127.0.0.1:<port>`` of its gRPC listener.
        metrics_url: Its ``/metrics`` URL, or None when the endpoint is disabled.
        http_url: Base URL (``http://127.0.0.1:<port>``) of its OpenAI-compatible API, or None when off.
        log: Every stderr line so far.
        reader: The thread draining stderr into ``log``.
    """

    proc: subprocess.Popen
    target: str
    metrics_url: str | None
    http_url: str | None = None
    log: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit and for its last stderr lines to reach ``log``; its exit code."""
        code = self.proc.wait(timeout=timeout)
        if self.reader is not None:
            self.reader.join(timeout=10)
        return code

    def kill(self) -> None:
        """Kill the process if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_serve(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 600
) -> ServeProcess:
    """Run ``loraswap serve ARGS``; return once it serves (``--port 0`` works: the port is read back).

    Raises:
        RuntimeError: the server did not report ``serving on`` within ``timeout`` seconds (it is killed).
    """
    command = [sys.executable, "-m", "loraswap.cli", "serve", *args]
    proc = subprocess.Popen(
        command, env=None if env is None else dict(env), stderr=subprocess.PIPE, text=True
    )
    log: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for line in proc.stderr or ():
            log.append(line)
            if "serving on" in line:
                ready.set()
        if proc.stderr is not None:
            proc.stderr.close()  # the process exited: nothing more comes through the pipe
        ready.set()  # exited: stop waiting

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    text = "".join(log) if ready.wait(timeout) else ""
    port = re.search(r"serving on [\d.]+:(\d+)", text)
    if port is None:
        proc.kill()
        raise RuntimeError("loraswap serve did not start:\n" + "".join(log))
    metrics = re.search(r"metrics: (\d+)", text)
    metrics_url = f"http://127.0.0.1:{metrics.group(1)}/metrics" if metrics else None
    http = re.search(r"serving on [\d.]+:\d+ \(http: (\d+)\)", text)
    http_url = f"http://127.0.0.1:{http.group(1)}" if http else None
    return ServeProcess(proc, f"127.0.0.1:{port.group(1)}", metrics_url, http_url, log, reader)

"""``start_serve``: a real ``loraswap serve`` child on the tiny model, and what it leaves behind."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from loraswap.devtools.launch import start_serve

pytestmark = pytest.mark.slow


def test_the_stderr_pipe_is_closed_once_the_server_has_exited(tiny_base: Path, tmp_path: Path) -> None:
    env = {**os.environ, "LORASWAP_HOME": str(tmp_path / "home")}
    args = ["--port", "0", "--metrics-port", "-1", "--base", str(tiny_base), "--quantization", "fp32"]
    server = start_serve([*args, "--max-seq-len", "64"], env, timeout=120)
    try:
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()
    assert any("stopped" in line for line in server.log)
    assert server.proc.stderr is not None and server.proc.stderr.closed  # no unclosed-file ResourceWarning

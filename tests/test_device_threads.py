"""``serial_torch_thread``: a thread that calls it runs its torch ops without an OpenMP team of its own,
and the rest of the process keeps torch's thread count. Run in a fresh interpreter, whose threads and
OpenMP teams this test alone decides."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = r"""
import json, os, threading, torch
from loraswap.device import _openmp_runtime, serial_torch_thread

torch.set_num_threads(2)
tasks = lambda: len(os.listdir("/proc/self/task"))
out = {"runtime": _openmp_runtime() is not None}

def run(name, serial):
    if serial:
        serial_torch_thread()
    before = tasks()
    torch.randn(1 << 22).mul_(2)  # far past torch's grain size: parallel wherever the thread may be
    out[name] = {"new_tasks": tasks() - before, "threads": torch.get_num_threads()}

for name, serial in (("serial", True), ("default", False)):
    thread = threading.Thread(target=run, args=(name, serial))
    thread.start()
    thread.join()
out["main_threads"] = torch.get_num_threads()
print(json.dumps(out))
"""


def test_a_serial_thread_makes_no_openmp_team_and_leaves_the_others_parallel() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if not out["runtime"]:
        pytest.skip("no OpenMP runtime found in this torch build (or no /proc)")
    assert out["serial"] == {"new_tasks": 0, "threads": 1}
    assert out["default"]["threads"] == 2 and out["default"]["new_tasks"] >= 1  # its own team's worker
    assert out["main_threads"] == 2


def test_the_engines_adapter_loads_run_serially(tiny_base) -> None:
    import torch

    from loraswap.device import _openmp_runtime
    from loraswap.server.engine import Engine, EngineConfig

    if _openmp_runtime() is None:
        pytest.skip("no OpenMP runtime found in this torch build (or no /proc)")
    mine = torch.get_num_threads()
    engine = Engine(EngineConfig(base=str(tiny_base), quantization="fp32", adapter_slots=1, max_seq_len=32))
    try:
        assert engine.adapters._load_pool.submit(torch.get_num_threads).result(timeout=60) == 1
        assert torch.get_num_threads() == mine  # the thread that built the engine keeps its own setting
    finally:
        engine.stop(drain_timeout=0)

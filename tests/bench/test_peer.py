"""The peer bench's loraswap half on the tiny model: its client rounds and probes against a real server,
its process-tree memory reading and its stop. (vLLM's half needs its own multi-GB virtualenv and runs only
in ``python -m bench.peer``.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.peer import servers, workload
from bench.peer.__main__ import report
from loraswap.models import resolve_base
from loraswap.registry import open_registry


def test_rounds_probes_memory_and_stop_on_a_real_server(
    tiny_base: Path, make_adapter, tmp_path: Path
) -> None:
    registry, base = open_registry(tmp_path / "registry"), resolve_base(tiny_base)
    for i in range(2):
        registry.push(
            make_adapter(r=4, target_modules=("q_proj", "v_proj"), seed=90 + i), f"bot-{i}", base=base
        )
    server = servers.start_loraswap(tiny_base, tmp_path / "registry", tmp_path / "home", 2, 8, 8, 128)
    try:
        assert server.startup_s > 0 and server.base_model
        models = [server.base_model, "bot-0", "bot-1", "bot-1"]
        r = asyncio.run(workload.concurrent_round(server.url, models, 6, "t"))
        assert r.tokens == 4 * 6 and len(r.ttfts) == 4 and all(t > 0 for t in r.ttfts) and r.seconds > 0
        idle, loaded = asyncio.run(
            workload.ttft_idle_and_loaded(server.url, ["bot-0"] * 3, "bot-1", 2, "p", 100)
        )
        assert idle > 0 and loaded > 0
        assert servers.pss_bytes(server.proc.pid) > 2**20
    finally:
        servers.stop(server)
    assert server.proc.poll() is not None
    assert servers.tree_pids(server.proc.pid) == [server.proc.pid]  # nothing of its tree is left


def test_report_states_each_target_from_the_runs(capsys) -> None:
    def side(tok: float, idle: float, loaded: float) -> dict:
        cases = {c: {"tokens_per_s": tok} for c in ("base", "one", "mixed")}
        return {**cases, "ttft_idle_s": idle, "ttft_loaded_s": loaded, "startup_s": 1.0, "pss_bytes": 2**30}

    class Args:
        adapters, rank, requests, new_tokens, vllm_cores = 16, 8, 16, 48, "both"

    runs = [{"vllm": side(100, 0.1, 0.3), "loraswap": side(160, 0.1, 0.12)}] * 3
    report(runs, Args())
    out = capsys.readouterr().out
    assert "target base only >= vLLM in every run: met" in out
    assert "target mixed adapters >= 1.5x vLLM (median): met" in out
    assert "loraswap/vLLM mixed  tok/s: median 1.60" in out
    runs[1] = {"vllm": side(100, 0.1, 0.3), "loraswap": side(90, 0.1, 0.2)}
    report(runs, Args())
    assert "target base only >= vLLM in every run: NOT met" in capsys.readouterr().out

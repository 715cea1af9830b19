"""loraswap against vLLM's CPU build on this machine: the same base, adapters and requests, one server at a
time, the two alternating over ``--runs`` runs.

Each run starts each server fresh (start-up time: spawn to the first ``/v1/models`` answer), then measures
over the OpenAI API with one thin client (:mod:`bench.peer.workload`):

- ``base``: ``--requests`` concurrent greedy requests of ``--new-tokens`` tokens on the base model;
- ``one``: the same, every request on one adapter;
- ``mixed``: the same, request i on adapter ``i % --adapters``;
- time to first token of a 1-token request alone and while ``--requests - 1`` others decode, each on its
  own adapter;
- memory: PSS of the server's process tree after the cases.

Every case has a warm-up round, then ``--rounds`` measured rounds with the cases interleaved (base, one,
mixed, base, ...); a case's figure is the median of its rounds. Adapters are rank ``--rank`` on q_proj and
v_proj of SmolLM2-135M-Instruct (both servers in the precision loraswap picks on this CPU: bf16 where it is
native, else fp32); vLLM registers them all at start
(``--lora-modules``), loraswap reads them from a registry into ``--adapters`` slots. vLLM's compute
threads are bound to both cores (``--vllm-cores both``) or left to vLLM's default (one core kept for its
front end). vLLM runs from its own virtualenv (:mod:`bench.peer.vllm_env`), made at the first run.

Run: ``python -m bench.peer [--runs 3] [--vllm-cores both|default]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.adapters import write_adapter
from bench.peer import servers, workload
from bench.peer.vllm_env import VLLM_VERSION, ensure_vllm
from loraswap.models import resolve_base
from loraswap.precision import default_precision
from loraswap.registry import open_registry

CASES = ("base", "one", "mixed")


def prepare(work: Path, n_adapters: int, rank: int) -> tuple[Path, dict[str, Path], Path]:
    base_dir = resolve_base("default").path
    base = resolve_base(base_dir)
    registry = open_registry(work / "registry")
    folders = {}
    for i in range(n_adapters):
        name = f"bot-{i}"
        folders[name] = write_adapter(work / name, base_dir, seed=i, rank=rank, targets=("q_proj", "v_proj"))
        registry.push(folders[name], name, base=base)
    return base_dir, folders, work / "registry"


def measure(server: servers.Running, args: argparse.Namespace, run: int) -> dict:
    n, k = args.requests, args.adapters
    models = {
        "base": [server.base_model] * n,
        "one": ["bot-0"] * n,
        "mixed": [f"bot-{i % k}" for i in range(n)],
    }
    out: dict = {"startup_s": server.startup_s}
    rounds: dict[str, list[workload.Round]] = {case: [] for case in CASES}
    for case in CASES:  # warm-up rounds, then the measured rounds with the cases interleaved
        asyncio.run(workload.concurrent_round(server.url, models[case], args.new_tokens, f"{run}{case}w"))
    for k in range(args.rounds):
        for case in CASES:
            round_id = f"{run}{case}{k}"
            r = asyncio.run(
                workload.concurrent_round(server.url, models[case], args.new_tokens, round_id, False)
            )
            if r.tokens != n * args.new_tokens:
                raise RuntimeError(f"{server.name} {case}: {r.tokens} tokens, expected {n * args.new_tokens}")
            rounds[case].append(r)
    for case, done in rounds.items():
        rates = [r.tokens_per_s for r in done]
        out[case] = {"tokens_per_s": statistics.median(rates), "rounds_tokens_per_s": rates,
                     "ttft_p50_s": statistics.median(t for r in done for t in r.ttfts)}  # fmt: skip
    background = [f"bot-{i % k}" for i in range(n - 1)]
    idle, loaded = asyncio.run(
        workload.ttft_idle_and_loaded(
            server.url, background, f"bot-{(n - 1) % k}", args.probes, f"{run}t", args.load_tokens
        )
    )
    out["ttft_idle_s"], out["ttft_loaded_s"] = idle, loaded
    out["pss_bytes"] = servers.pss_bytes(server.proc.pid)
    return out


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})"


def report(runs: list[dict[str, dict]], args: argparse.Namespace) -> None:
    chosen = default_precision(torch.device("cpu")).name
    print(f"\nSmolLM2-135M {chosen}, {args.adapters} adapters r{args.rank} q,v; {args.requests} concurrent x "
          f"{args.new_tokens} tokens; vLLM {VLLM_VERSION} cores={args.vllm_cores}")  # fmt: skip
    head = f"{'run':<4}{'server':<10}" + "".join(f"{c + ' tok/s':>12}" for c in CASES)
    print(head + f"{'TTFT idle ms':>14}{'TTFT load ms':>14}{'start s':>9}{'PSS GiB':>9}")
    for r, run in enumerate(runs):
        for name in ("vllm", "loraswap"):
            m = run[name]
            line = f"{r:<4}{name:<10}" + "".join(f"{m[c]['tokens_per_s']:>12.1f}" for c in CASES)
            line += f"{m['ttft_idle_s'] * 1e3:>14.1f}{m['ttft_loaded_s'] * 1e3:>14.1f}"
            print(line + f"{m['startup_s']:>9.1f}{m['pss_bytes'] / 2**30:>9.2f}")

    def ratio(case: str) -> list[float]:
        return [run["loraswap"][case]["tokens_per_s"] / run["vllm"][case]["tokens_per_s"] for run in runs]

    def own(name: str, a: str, b: str) -> list[float]:
        return [run[name][a]["tokens_per_s"] / run[name][b]["tokens_per_s"] for run in runs]

    def ttft(name: str) -> list[float]:
        return [run[name]["ttft_loaded_s"] / run[name]["ttft_idle_s"] for run in runs]

    print()
    for case in CASES:
        print(f"loraswap/vLLM {case:<6} tok/s: {spread(ratio(case))}")
    for name in ("loraswap", "vllm"):
        print(f"{name:<9} mixed/one: {spread(own(name, 'mixed', 'one'))}; "
              f"TTFT loaded/idle: {spread(ttft(name))}")  # fmt: skip
    targets = {
        "base only >= vLLM in every run": min(ratio("base")) >= 1.0,
        "mixed adapters >= 1.5x vLLM (median)": statistics.median(ratio("mixed")) >= 1.5,
        "mixed vs one adapter >= 0.9 (median)": statistics.median(own("loraswap", "mixed", "one")) >= 0.9,
        "TTFT under load <= 1.5x idle (median)": statistics.median(ttft("loraswap")) <= 1.5,
    }
    for text, met in targets.items():
        print(f"target {text}: {'met' if met else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs; the servers' order alternates")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per case (median reported)")
    parser.add_argument("--probes", type=int, default=5, help="time-to-first-token probes per phase")
    parser.add_argument("--load-tokens", type=int, default=400, help="tokens of each background request")
    parser.add_argument("--vllm-cores", choices=("both", "default"), default="both")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    vllm = ensure_vllm()
    work = Path(tempfile.mkdtemp(prefix="loraswap-peer-"))
    base_dir, folders, registry = prepare(work, args.adapters, args.rank)
    batch, seq_len = 2 * args.requests, 512

    def start(name: str, run: int) -> servers.Running:
        if name == "vllm":
            return servers.start_vllm(
                vllm, base_dir, folders, work, args.rank, batch, seq_len, args.vllm_cores
            )
        home = work / f"home-{run}"
        return servers.start_loraswap(base_dir, registry, home, args.adapters, args.rank, batch, seq_len)

    runs: list[dict[str, dict]] = []
    for r in range(args.runs):
        order = ("vllm", "loraswap") if r % 2 == 0 else ("loraswap", "vllm")
        run: dict[str, dict] = {}
        for name in order:
            began = time.monotonic()
            server = start(name, r)
            try:
                run[name] = measure(server, args, r)
            finally:
                servers.stop(server)
            print(f"run {r} {name}: {time.monotonic() - began:.0f} s", flush=True)
        runs.append(run)
    report(runs, args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

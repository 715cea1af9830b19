"""Serving throughput of the default precision against each explicit one, side by side in one run.

The target (``bench/RESULTS.md``, "Precision chosen by the hardware"): on any CPU, the default ``serve``
throughput is at least 0.95x the best explicit precision's, for the base alone, one adapter and 16
adapters. Each (round, variant) runs in a fresh process, as ``serve`` would: its main thread loads the
model serially, a started engine steps on its own thread (one OpenMP team), the cases run one after
another after a warm-up, and the process exits. Rounds alternate the variants (``default``, ``fp32``,
``bf16`` by default), so drift on a shared machine hits them alike; a case's figure is the median of its
rounds. Adapters are random PEFT-format ones (``bench/adapters.py``; ``--rank``, ``--targets``, rank 16 on
q/k/v/o by default) stored in the default precision's dtype, as this machine's trainer writes them.

Run: ``python -m bench.precision_ab [--rounds 3] [--requests 16] [--new-tokens 32] [--variants ...]
[--rank 16 --targets q_proj,k_proj,v_proj,o_proj]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.adapters import write_adapter
from loraswap.models import resolve_base
from loraswap.precision import cpu_bf16_support, default_precision
from loraswap.registry import open_registry

PROMPTS = ("Write a short note about the sea.", "List three uses of a paperclip.", "Explain LoRA.")
VARIANTS = ("default", "fp32", "bf16")


def cases(adapters: int, requests: int) -> dict[str, list[str]]:
    """Case name → the adapter of each concurrent request (``""``: the base)."""
    names = [f"bot-{i}" for i in range(adapters)]
    return {
        "base": [""] * requests,
        "1 adapter": [names[0]] * requests,
        f"{adapters} adapters": [names[i % adapters] for i in range(requests)],
    }


def run_variant(variant: str, base: str, registry: str, adapters: int, requests: int, tokens: int) -> dict:
    """Load an engine at ``variant`` (``default``: no quantization given) and time every case once after
    a warm-up; tokens per second of ``requests`` concurrent greedy requests of ``tokens`` tokens."""
    from loraswap.device import serial_torch_thread
    from loraswap.server.engine import Engine, EngineConfig
    from loraswap.server.engine.api import GenerationRequest, SamplingParams

    serial_torch_thread()  # as serve's main thread: the engine's step thread is the one OpenMP team
    quantization = None if variant == "default" else variant
    config = EngineConfig(
        base=base, registry=registry, quantization=quantization, adapter_slots=adapters, max_rank=16,
        max_batch_size=requests, max_seq_len=256,
    )  # fmt: skip
    engine = Engine(config)
    engine.start()
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    out = {"quantization": engine.loaded.quantization, "precision": engine.loaded.precision.describe()}
    try:
        for case, refs in cases(adapters, requests).items():
            reqs = [
                GenerationRequest(adapter=a, prompt=PROMPTS[i % len(PROMPTS)], sampling=params)
                for i, a in enumerate(refs)
            ]
            warm = [
                dataclasses.replace(r, sampling=dataclasses.replace(params, max_new_tokens=2)) for r in reqs
            ]
            for h in [engine.submit(r) for r in warm]:  # a warm-up: adapter loads, first-use allocations
                h.result(timeout=1800)
            start = time.perf_counter()
            results = [h.result(timeout=1800) for h in [engine.submit(r) for r in reqs]]
            out[case] = sum(r.completion_tokens for r in results) / (time.perf_counter() - start)
    finally:
        engine.stop(drain_timeout=5)
    return out


def prepare(work: Path, base_spec: str, adapters: int, rank: int, targets: tuple[str, ...]) -> Path:
    """A registry of ``adapters`` random adapters of ``rank`` on ``targets`` for ``base_spec``."""
    base = resolve_base(base_spec)
    registry = open_registry(work / "registry")
    dtype = default_precision(torch.device("cpu")).dtype
    for i in range(adapters):
        folder = write_adapter(work / f"a{i}", base.path, seed=i, rank=rank, targets=targets, dtype=dtype)
        registry.push(folder, f"bot-{i}", base=base)
    return work / "registry"


def child(variant: str, args: argparse.Namespace, registry: Path) -> dict:
    """:func:`run_variant` in a fresh interpreter (its JSON on the last stdout line)."""
    command = [sys.executable, "-m", "bench.precision_ab", "--child", variant, "--registry", str(registry)]
    command += ["--base", args.base, "--adapters", str(args.adapters), "--requests", str(args.requests)]
    command += ["--new-tokens", str(args.new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(rounds: list[dict[str, dict]], variants: list[str]) -> dict:
    """Median tok/s per (variant, case), and per case the default's ratio to the best explicit variant
    (the median of per-round ratios)."""
    case_names = [k for k in rounds[0][variants[0]] if k not in ("quantization", "precision")]
    medians = {v: {c: statistics.median(r[v][c] for r in rounds) for c in case_names} for v in variants}
    explicit = [v for v in variants if v != "default"]
    ratios = {}
    if "default" in variants and explicit:
        for c in case_names:
            per_round = [r["default"][c] / max(r[v][c] for v in explicit) for r in rounds]
            ratios[c] = statistics.median(per_round)
    return {"tok_s": medians, "default_vs_best_explicit": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="default")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, from " + str(VARIANTS)
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16, help="adapter rank (at most 16)")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="adapted projections")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--registry", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = run_variant(
            args.child, args.base, args.registry, args.adapters, args.requests, args.new_tokens
        )
        print(json.dumps(result))
        return 0
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    work = Path(tempfile.mkdtemp(prefix="loraswap-precision-"))
    registry = prepare(work, args.base, args.adapters, args.rank, tuple(args.targets.split(",")))
    native, why = cpu_bf16_support()
    print(f"CPU: {why}; capability {torch.backends.cpu.get_cpu_capability()}; "
          f"{default_precision(torch.device('cpu')).describe()}", flush=True)  # fmt: skip
    rounds = []
    for r in range(args.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]  # who goes first rotates
        rounds.append({v: child(v, args, registry) for v in order})
        print(f"round {r + 1}: " + "; ".join(
            f"{v} " + ", ".join(f"{c} {t:.1f}" for c, t in res.items() if isinstance(t, float))
            for v, res in rounds[-1].items()
        ), flush=True)  # fmt: skip
    report = summarize(rounds, variants)
    report.update(cpu=why, native_bf16=native, rounds=rounds)
    print(f"\n{args.requests} concurrent x {args.new_tokens} tokens, median tok/s of {args.rounds} rounds")
    for v, by_case in report["tok_s"].items():
        print(f"  {v:<8}" + "".join(f"{c}: {t:7.1f}   " for c, t in by_case.items()))
    for c, ratio in report["default_vs_best_explicit"].items():
        print(f"  default vs best explicit, {c}: {ratio:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

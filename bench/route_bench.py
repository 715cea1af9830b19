"""A merged model on a route vs the base alone vs the same adapter through the shared base, in one run.

One process holds three engines over the same base (one steps at a time; the others sit idle): the base
alone with no LoRA layers (``adapter_slots=0``: the physical limit a route can reach), the shared
multi-LoRA engine, and a route to the model merged from one adapter, reached through the router with
the adapter's reference (so the route lookup is in the measured path). For each concurrency (batch-1
and 32 at once by default) each configuration runs greedy requests of ``--new-tokens`` tokens; the three
alternate in order (ABC, CBA, ...) over ``--repeat`` rounds and the medians are reported: tokens/s,
time per output token (decode time / tokens after the first) and time to first token. It also times the
merge itself against a bare read of the base's tensors into fp32 (both after one warm read: the page
cache is hot).

Run: ``python -m bench.route_bench [--base default|tiny] [--new-tokens 64] [--concurrency 1,32]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.adapters import write_adapter
from loraswap.merge.builder import merge_adapters
from loraswap.merge.sources import AdapterSource
from loraswap.models import resolve_base
from loraswap.models.weight_files import weight_files
from loraswap.registry import open_registry
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.api import GenerationRequest, SamplingParams
from loraswap.server.routes.route import RouteSpec
from loraswap.server.routes.router import Router

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = (
    "Summarise the plot of a detective story in two sentences.",
    "Write a short note to a colleague about tomorrow's meeting.",
    "List three ways to keep a small garden healthy in summer.",
    "Explain what a hash function is to a new programmer.",
)


def bare_read(folder: Path) -> float:
    """Seconds to read every tensor of the base's safetensors into memory as fp32 (the least a merge in
    fp32 does per tensor; a plain ``get_tensor`` only maps the file)."""
    from safetensors import safe_open

    start = time.perf_counter()
    for shard in weight_files(folder):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                handle.get_tensor(name).float()
    return time.perf_counter() - start


def round_of(target, adapter: str, n: int, new_tokens: int) -> dict[str, float]:
    """``n`` requests submitted at once; tokens/s over the round, medians of TPOT and TTFT."""
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    handles = [
        target.submit(GenerationRequest(adapter=adapter, prompt=PROMPTS[i % len(PROMPTS)], sampling=sampling))
        for i in range(n)
    ]
    results = [h.result(timeout=600) for h in handles]
    seconds = time.perf_counter() - start
    tokens = sum(r.completion_tokens for r in results)
    tpot = [(r.timings.total_s - r.timings.ttft_s) / max(r.completion_tokens - 1, 1) for r in results]
    return {
        "tok_s": tokens / seconds,
        "tpot_ms": statistics.median(tpot) * 1e3,
        "ttft_ms": statistics.median(r.timings.ttft_s for r in results) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="default", help="default (SmolLM2) or tiny (random test Llama)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,32", help="comma list of requests submitted at once")
    parser.add_argument("--repeat", type=int, default=4, help="rounds per configuration and concurrency")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="loraswap-route-bench-"))
    if args.base == "tiny":
        from loraswap.devtools.tiny import build_tiny_llama

        base = resolve_base(build_tiny_llama(work / "tiny"))
    else:
        base = resolve_base(args.base)
    registry = open_registry(work / "registry")
    adapter = write_adapter(work / "adapter", base.path, seed=5, rank=args.rank, targets=TARGETS)
    registry.push(adapter, "bot", tags=["prod"], base=base)

    bare_read(base.path)  # warm the page cache for both timings
    read_s = bare_read(base.path)
    start = time.perf_counter()
    source = AdapterSource.from_registry(registry, "bot:prod")
    merge_adapters(base, [source], work / "merged")
    merge_s = time.perf_counter() - start

    concurrency = [int(c) for c in args.concurrency.split(",")]
    rows = max(concurrency)
    common = dict(registry=str(work / "registry"), max_batch_size=rows, max_seq_len=256, max_rank=args.rank)
    alone = Engine(EngineConfig(base=str(base.path), adapter_slots=0, **common))
    shared = Engine(EngineConfig(base=str(base.path), adapter_slots=4, **common))
    for engine in (alone, shared):
        engine.start()
    router = Router(shared)
    router.add_configured([RouteSpec("bot:prod", str(work / "merged"))])
    # The adapter through the shared base: submitted to the shared engine itself (the router would route it).
    configs = {
        "base alone": (alone, ""),
        "route (merged)": (router, "bot:prod"),
        "shared + adapter": (shared, "bot:prod"),
    }
    names = list(configs)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for n in concurrency:
            for name in names:  # warm-up: adapter loaded, kernels and caches warm
                target, ref = configs[name]
                round_of(target, ref, n, 8)
            for r in range(args.repeat):
                for name in names if r % 2 == 0 else reversed(names):
                    target, ref = configs[name]
                    results.setdefault((name, n), []).append(round_of(target, ref, n, args.new_tokens))
    finally:
        router.stop(drain_timeout=0)
        alone.stop(drain_timeout=0)
    quantization = shared.loaded.quantization
    print(f"base {base.model_id} ({quantization}); adapter rank {args.rank} on {len(TARGETS)} projections;")
    print(f"{args.new_tokens} new tokens, medians of {args.repeat} rounds, configurations alternating")
    head = f"{'configuration':<18}{'requests':>9}{'tok/s':>9}{'TPOT ms':>9}{'TTFT ms':>9}{'vs base':>9}"
    print(head + f"{'per round':>12}")
    for n in concurrency:
        base_tok = statistics.median(x["tok_s"] for x in results[("base alone", n)])
        for name in names:
            runs = results[(name, n)]
            tok = statistics.median(x["tok_s"] for x in runs)
            tpot = statistics.median(x["tpot_ms"] for x in runs)
            ttft = statistics.median(x["ttft_ms"] for x in runs)
            pairs = zip(runs, results[("base alone", n)], strict=True)
            ratios = sorted(x["tok_s"] / b["tok_s"] for x, b in pairs)
            spread = f"{ratios[0]:.2f}-{ratios[-1]:.2f}"
            print(f"{name:<18}{n:>9}{tok:>9.1f}{tpot:>9.2f}{ttft:>9.1f}{tok / base_tok:>8.2f}x{spread:>12}")
    print(f"merge: {merge_s:.2f} s; bare read of the base: {read_s:.2f} s ({merge_s / read_s:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

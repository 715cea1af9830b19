"""Engine benchmark on the embedded SmolLM2: every figure of issue 3 measured side by side in one run.

Run: ``python -m bench.engine_bench [--quick]`` (``make bench`` runs it). Prints a table of ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.adapters import write_adapter
from loraswap.models import resolve_base
from loraswap.registry.registry import open_registry
from loraswap.server.api import GenerationRequest, SamplingParams
from loraswap.server.config import EngineConfig
from loraswap.server.engine import Engine

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [
    "Write a short note about the sea.",
    "List three uses of a paperclip.",
    "Explain what a LoRA adapter is.",
    "Give me a haiku about autumn.",
]


def requests(adapters: list[str], new_tokens: int) -> list[GenerationRequest]:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [
        GenerationRequest(adapter=a, prompt=PROMPTS[i % len(PROMPTS)], sampling=params)
        for i, a in enumerate(adapters)
    ]


def throughput(engine: Engine, reqs: list[GenerationRequest]) -> float:
    """Generated tokens per second for ``reqs`` submitted at once."""
    start = time.perf_counter()
    results = [h.result(timeout=1800) for h in [engine.submit(r) for r in reqs]]
    return sum(r.completion_tokens for r in results) / (time.perf_counter() - start)


def peft_one_at_a_time(
    base_dir: Path, folders: dict[str, Path], reqs: list[GenerationRequest], dtype
) -> float:
    """Naive PEFT serving: set the request's adapter, generate, next request."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    names = list(folders)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), folders[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    model.eval()
    tokens = 0
    start = time.perf_counter()
    for req in reqs:
        model.set_adapter(req.adapter)
        ids = tokenizer(req.prompt, return_tensors="pt")["input_ids"]
        n = req.sampling.max_new_tokens
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        tokens += out.shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - start)


def ttft_idle_vs_busy(engine: Engine, adapters: list[str], new_tokens: int) -> tuple[float, float]:
    """Median time to first token of a probe on an idle engine, and while the others all decode."""
    probe = requests([adapters[0]], 4)[0]
    idle = statistics.median(engine.generate(probe).timings.ttft_s for _ in range(5))
    handles = [engine.submit(r) for r in requests(adapters[1:], new_tokens * 8)]
    for handle in handles:
        next(handle.events(timeout=600))  # every one of them is decoding now
    busy = []
    for _ in range(5):
        busy.append(engine.generate(probe).timings.ttft_s)
        time.sleep(0.05)  # arrive at a different point of the running step each time
    for handle in handles:
        handle.cancel()
    return idle, statistics.median(busy)


def activation_times(engine: Engine, registry, names: list[str]) -> dict[str, float]:
    """Median cold (local disk → slot) and warm (host → slot) activation vs a bare safetensors read."""
    bare, cold, warm = [], [], []
    kept = []  # bare reads stay in memory, as the host tier keeps what it reads (fresh pages for both)
    for name in names:
        folder = registry.pull(name)  # on local disk, not yet in host or device tiers
        start = time.perf_counter()
        kept.append(load_file(str(folder / "adapter_model.safetensors")))
        bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.load_adapter(name, "device")
        cold.append(time.perf_counter() - start)
        digest = registry.resolve(name).digest
        with engine.step_lock:
            engine.adapters.slots.remove(digest)  # keep the host copy: the next activation is warm
        start = time.perf_counter()
        engine.load_adapter(name, "device")
        warm.append(time.perf_counter() - start)
    med = statistics.median
    return {"bare_read_s": med(bare), "cold_s": med(cold), "warm_s": med(warm)}


def memory_per_adapter(engine: Engine, registry, name: str) -> dict[str, int]:
    digest = registry.resolve(name).digest
    host = engine.adapters.host.peek(digest)
    slot_bytes = sum(layer.slot_bytes() for layer in engine.adapters.layers.values())
    return {"file_bytes": host.file_bytes, "host_bytes": host.nbytes, "device_slot_bytes": slot_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="default")
    parser.add_argument("--quantization", default=None, help="default: nf4 on CUDA, bf16 on CPU")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--registered", type=int, default=1000, help="adapters in the registry for item 5")
    parser.add_argument("--in-flight", type=int, default=100, help="distinct adapters in flight for item 5")
    parser.add_argument("--peft-requests", type=int, default=8, help="requests timed through naive PEFT")
    args = parser.parse_args(argv)
    base = resolve_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="loraswap-bench-"))
    registry = open_registry(work / "registry")
    n = args.requests
    folders = {}
    for i in range(n + 5):
        folders[f"task{i}"] = write_adapter(work / f"task{i}", base.path, seed=i, rank=16, targets=ALL)
        registry.push(folders[f"task{i}"], f"task{i}", base=base)
    config = EngineConfig(
        base=args.base, quantization=args.quantization, adapter_slots=n, max_rank=16, max_batch_size=n,
        max_seq_len=512, max_queue=4 * args.in_flight, host_cache_bytes=8 << 30,
    )  # fmt: skip
    engine = Engine(config, registry=registry)
    engine.start()
    report: dict[str, object] = {"device": str(engine.device), "quantization": engine.loaded.quantization}
    activation = activation_times(engine, registry, [f"task{n + i}" for i in range(5)])
    report["memory"] = memory_per_adapter(engine, registry, f"task{n}")
    mixed = [f"task{i}" for i in range(n)]
    for name in mixed:
        engine.load_adapter(name, "device")
    throughput(engine, requests(mixed[:4], 4))  # warm-up
    tps_mixed = throughput(engine, requests(mixed, args.new_tokens))
    tps_single = throughput(engine, requests(["task0"] * n, args.new_tokens))
    tps_base = throughput(engine, requests([""] * n, args.new_tokens))
    idle, busy = ttft_idle_vs_busy(engine, mixed, args.new_tokens)
    engine.stop(drain_timeout=5)
    tps_peft = peft_one_at_a_time(
        base.path,
        {k: folders[k] for k in mixed},
        requests(mixed, args.new_tokens),
        engine.loaded.compute_dtype,
    )
    report.update(
        mixed_tps=tps_mixed, single_tps=tps_single, base_tps=tps_base, peft_naive_tps=tps_peft,
        ttft_idle_s=idle, ttft_busy_s=busy, **activation,
    )  # fmt: skip
    report.update(many_adapters(args, base, work))
    print_report(report)
    return 0


def many_adapters(args: argparse.Namespace, base, work: Path) -> dict[str, float]:
    """Item 5: many registered adapters, ``in_flight`` distinct ones in flight, vs one adapter."""
    registry = open_registry(work / "registry-many")
    for i in range(args.registered):
        folder = write_adapter(
            work / f"many{i}", base.path, seed=1000 + i, rank=8, targets=("q_proj", "v_proj")
        )
        registry.push(folder, f"m{i}")
    config = EngineConfig(
        base=args.base, quantization=args.quantization, adapter_slots=args.requests, max_rank=8,
        max_batch_size=args.requests, max_seq_len=512, max_queue=4 * args.in_flight, host_cache_bytes=8 << 30,
    )  # fmt: skip
    engine = Engine(config, registry=registry)
    engine.start()
    throughput(engine, requests(["m0"] * 4, 4))  # warm-up
    one = throughput(engine, requests(["m0"] * args.in_flight, args.new_tokens))
    print(f"{args.in_flight} requests on one adapter: {one:.1f} tok/s", flush=True)
    names = [f"m{i}" for i in range(0, args.registered, max(1, args.registered // args.in_flight))][
        : args.in_flight
    ]
    cold = throughput(engine, requests(names, args.new_tokens))
    warm = throughput(engine, requests(names, args.new_tokens))
    engine.stop(drain_timeout=5)
    return {"many_one_tps": one, "many_cold_tps": cold, "many_warm_tps": warm}


def print_report(r: dict) -> None:
    m = r["memory"]
    rows = [
        ("device / quantization", f"{r['device']} / {r['quantization']}", ""),
        ("1. mixed 32 adapters vs 1 adapter", f"{r['mixed_tps']:.1f} vs {r['single_tps']:.1f} tok/s",
         f"{r['mixed_tps'] / r['single_tps']:.2f}x (target >= 0.9)"),
        ("1. mixed 32 adapters vs base only", f"{r['mixed_tps']:.1f} vs {r['base_tps']:.1f} tok/s",
         f"{r['mixed_tps'] / r['base_tps']:.2f}x (target >= 0.8)"),
        ("2. engine mixed vs naive PEFT", f"{r['mixed_tps']:.1f} vs {r['peft_naive_tps']:.1f} tok/s",
         f"{r['mixed_tps'] / r['peft_naive_tps']:.2f}x (target >= 5)"),
        ("3. TTFT, 31 decoding vs idle", f"{r['ttft_busy_s'] * 1e3:.0f} vs {r['ttft_idle_s'] * 1e3:.0f} ms",
         f"{r['ttft_busy_s'] / r['ttft_idle_s']:.2f}x (target <= 2)"),
        ("4. cold activation vs bare read", f"{r['cold_s'] * 1e3:.1f} vs {r['bare_read_s'] * 1e3:.1f} ms",
         f"{r['cold_s'] / r['bare_read_s']:.2f}x (target <= 1.5)"),
        ("4. warm activation (host -> slot), r16", f"{r['warm_s'] * 1e3:.2f} ms", ""),
        ("5. 100 of 1000 (cold) vs 1 adapter", f"{r['many_cold_tps']:.1f} vs {r['many_one_tps']:.1f} tok/s",
         f"{r['many_cold_tps'] / r['many_one_tps']:.2f}x (target >= 0.8)"),
        ("5. 100 of 1000 (warm) vs 1 adapter", f"{r['many_warm_tps']:.1f} vs {r['many_one_tps']:.1f} tok/s",
         f"{r['many_warm_tps'] / r['many_one_tps']:.2f}x (target >= 0.8)"),
        ("memory: host copy vs file", f"{m['host_bytes']} vs {m['file_bytes']} B",
         f"{m['host_bytes'] / m['file_bytes']:.3f}x"),
        ("memory: device slot vs file", f"{m['device_slot_bytes']} vs {m['file_bytes']} B",
         f"{m['device_slot_bytes'] / m['file_bytes']:.3f}x"),
    ]  # fmt: skip
    width = max(len(a) for a, _, _ in rows)
    for a, b, c in rows:
        print(f"{a:<{width}}  {b:<32} {c}")


if __name__ == "__main__":
    raise SystemExit(main())

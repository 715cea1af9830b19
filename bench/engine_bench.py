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
from loraswap.cli import quiet_third_party_notices
from loraswap.models import resolve_base
from loraswap.registry.registry import open_registry
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.api import GenerationRequest, SamplingParams

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Adapter shapes item 1 runs with (rank, targets): PEFT's LoraConfig() default for Llama models, this
# project's trainer default, and every projection (the most adapter bytes per token).
PROFILES = {
    "peft-default r8 q,v": (8, ("q_proj", "v_proj")),
    "trainer-default r16 q,k,v,o": (16, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "all-projections r16": (16, ALL),
}
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
    for k in range(7):
        busy.append(engine.generate(probe).timings.ttft_s)
        time.sleep(0.03 + 0.02 * k)  # arrive at a different point of the running step each time
    for handle in handles:
        handle.cancel()
    return idle, statistics.median(busy)


def activation_times(engine: Engine, registry, names: list[str]) -> dict[str, float]:
    """Median cold (local disk → slot) and warm (host → slot) activation vs a bare safetensors read."""
    bare, cold, warm = [], [], []
    kept = []  # bare reads stay in memory (each gets fresh pages), as the host tier keeps what it loads
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
            engine.adapters.unload(digest, keep_host=True)  # the next activation is warm
        start = time.perf_counter()
        engine.load_adapter(name, "device")
        warm.append(time.perf_counter() - start)
    med = statistics.median
    return {"bare_read_s": med(bare), "cold_s": med(cold), "warm_s": med(warm)}


def slot_fill_ab(engine: Engine, registry, name: str, rounds: int = 20) -> dict[str, float]:
    """Median warm slot fill of one all-projection adapter through the numpy-bits path (CPU slots) and
    through torch copies, alternated on the same adapter and slot (the A/B that keeps the bits path)."""
    from loraswap.server.lora.layer import fill_slot_bits, fill_slot_torch

    digest = registry.resolve(name).digest
    engine.load_adapter(name, "device")
    adapter = engine.adapters.host.peek(digest)
    layers = engine.adapters.layers
    if next(iter(layers.values())).a.device.type != "cpu":
        return {}
    tensors = [
        (layer, *adapter.modules.get(m, (None, None)), adapter.scales.get(m, 1.0))
        for m, layer in layers.items()
    ]
    bits = adapter.cpu_bits()
    arrays = [(layer, *bits.get(m, (None, None)), adapter.scales.get(m, 1.0)) for m, layer in layers.items()]
    times: dict[str, list[float]] = {"fill_bits_s": [], "fill_torch_s": []}
    with engine.step_lock:
        slot = engine.adapters.slots.slot_of(digest)
        for _ in range(rounds):
            for key, fill, parts in (
                ("fill_bits_s", fill_slot_bits, arrays),
                ("fill_torch_s", fill_slot_torch, tensors),
            ):
                start = time.perf_counter()
                fill(slot, parts)
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def memory_per_adapter(engine: Engine, registry, name: str) -> dict[str, int]:
    digest = registry.resolve(name).digest
    host = engine.adapters.host.peek(digest)
    slot_bytes = sum(layer.slot_bytes() for layer in engine.adapters.layers.values())
    return {"file_bytes": host.file_bytes, "host_bytes": host.nbytes, "device_slot_bytes": slot_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="default")
    parser.add_argument(
        "--quantization", default=None, help="default: nf4 on CUDA; on CPU bf16 where it is native, else fp32"
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (best of, interleaved)")
    parser.add_argument("--registered", type=int, default=1000, help="adapters in the registry for item 5")
    parser.add_argument("--in-flight", type=int, default=100, help="distinct adapters in flight for item 5")
    parser.add_argument("--peft-requests", type=int, default=8, help="requests timed through naive PEFT")
    args = parser.parse_args(argv)
    quiet_third_party_notices()  # the naive-PEFT side imports peft (and through it bitsandbytes)
    base = resolve_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="loraswap-bench-"))
    registry = open_registry(work / "registry")
    n = args.requests
    folders = {}
    for p, (rank, targets) in enumerate(PROFILES.values()):
        for i in range(n + (10 if p == len(PROFILES) - 1 else 0)):
            name = f"p{p}-task{i}"
            folder = write_adapter(work / name, base.path, seed=100 * p + i, rank=rank, targets=targets)
            folders[name] = folder
            registry.push(folders[name], name, base=base)
    heavy = len(PROFILES) - 1
    config = EngineConfig(
        base=args.base, quantization=args.quantization, adapter_slots=n, max_rank=16, max_batch_size=n,
        max_seq_len=512, max_queue=4 * args.in_flight, host_cache_bytes=8 << 30,
    )  # fmt: skip
    engine = Engine(config, registry=registry)
    engine.start()
    report: dict[str, object] = {"device": str(engine.device), "quantization": engine.loaded.quantization}
    report.update(activation_times(engine, registry, [f"p{heavy}-task{n + i}" for i in range(10)]))
    report["memory"] = memory_per_adapter(engine, registry, f"p{heavy}-task{n}")
    report.update(slot_fill_ab(engine, registry, f"p{heavy}-task{n}"))
    report["profiles"] = {}
    for p, label in enumerate(PROFILES):
        mixed = [f"p{p}-task{i}" for i in range(n)]
        for name in mixed:
            engine.load_adapter(name, "device")
        throughput(engine, requests(mixed[:4], 4))  # warm-up
        runs = {
            "mixed": requests(mixed, args.new_tokens),
            "single": requests([mixed[0]] * n, args.new_tokens),
            "base": requests([""] * n, args.new_tokens),
        }
        best = {k: 0.0 for k in runs}
        for _ in range(args.rounds):
            for key, reqs in runs.items():
                best[key] = max(best[key], throughput(engine, reqs))
        idle, busy = ttft_idle_vs_busy(engine, mixed, args.new_tokens)
        report["profiles"][label] = {**best, "ttft_idle_s": idle, "ttft_busy_s": busy}
        print(f"{label}: {best} ttft {idle * 1e3:.0f} / {busy * 1e3:.0f} ms", flush=True)
    engine.stop(drain_timeout=5)
    peft_names = [f"p{heavy}-task{i}" for i in range(args.peft_requests)]
    report["peft_naive_tps"] = peft_one_at_a_time(
        base.path, {k: folders[k] for k in peft_names}, requests(peft_names, args.new_tokens),
        engine.loaded.compute_dtype,
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
    heavy = r["profiles"][list(PROFILES)[-1]]
    rows = [("device / quantization", f"{r['device']} / {r['quantization']}", "")]
    for label, p in r["profiles"].items():
        rows += [
            (f"1. [{label}] mixed vs 1 adapter", f"{p['mixed']:.1f} vs {p['single']:.1f} tok/s",
             f"{p['mixed'] / p['single']:.2f}x (target >= 0.9)"),
            (f"1. [{label}] mixed vs base only", f"{p['mixed']:.1f} vs {p['base']:.1f} tok/s",
             f"{p['mixed'] / p['base']:.2f}x (target >= 0.8)"),
            (f"3. [{label}] TTFT 31 decoding vs idle",
             f"{p['ttft_busy_s'] * 1e3:.0f} vs {p['ttft_idle_s'] * 1e3:.0f} ms",
             f"{p['ttft_busy_s'] / p['ttft_idle_s']:.2f}x (target <= 2)"),
        ]  # fmt: skip
    rows += [
        ("2. [all-projections] mixed vs naive PEFT",
         f"{heavy['mixed']:.1f} vs {r['peft_naive_tps']:.1f} tok/s",
         f"{heavy['mixed'] / r['peft_naive_tps']:.2f}x (target >= 5)"),
        ("4. cold activation vs bare read", f"{r['cold_s'] * 1e3:.1f} vs {r['bare_read_s'] * 1e3:.1f} ms",
         f"{r['cold_s'] / r['bare_read_s']:.2f}x (target <= 1.5)"),
        ("4. warm activation (host -> slot), r16", f"{r['warm_s'] * 1e3:.2f} ms", ""),
        *([("4. slot fill r16 all-proj: numpy bits vs torch copies",
            f"{r['fill_bits_s'] * 1e3:.2f} vs {r['fill_torch_s'] * 1e3:.2f} ms",
            f"{r['fill_bits_s'] / r['fill_torch_s']:.2f}x")] if "fill_bits_s" in r else []),
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

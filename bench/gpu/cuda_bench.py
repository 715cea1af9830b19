"""The measurements of the GPU check, one subcommand per step, each writing one JSON file.

``python -m bench.gpu.cuda_bench probe|model|ops|engine --json FILE [...]`` (``bench.gpu.check`` runs
them with the right arguments). The JSON file is rewritten after every figure, so a step stopped at its
time limit keeps what it had measured. Every timing synchronises the device around it, warms up first
and reports a median; on CUDA the per-call times come from CUDA events. The same code runs on CPU with
the ``tiny`` model (the check's smoke run), where the figures mean nothing but every path is exercised.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a random-weight Llama built for the bench.

    Attributes:
        hidden_size: Model width.
        intermediate_size: MLP width.
        num_layers: Decoder layers.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads.
        vocab_size: Embedding rows (0: the tokenizer's size).
        tie_word_embeddings: Whether the LM head shares the embedding matrix.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool


MODELS = {
    "llama-1b": ModelShape(2048, 8192, 16, 32, 8, 128256, True),  # the layout of Llama-3.2-1B
    "tiny": ModelShape(64, 128, 2, 4, 2, 0, False),
}


def llama_config(shape: ModelShape, tokenizer=None, vocab_size: int | None = None):
    """A ``LlamaConfig`` of ``shape``; special token ids from ``tokenizer`` (bos 1, eos 2, pad 0 without)."""
    from transformers import LlamaConfig

    vocab = vocab_size or shape.vocab_size or (len(tokenizer) if tokenizer is not None else 512)
    if tokenizer is not None and vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} is below the tokenizer's {len(tokenizer)} tokens")
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if tokenizer else (1, 2, 0)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=ids[0],
        eos_token_id=ids[1],
        pad_token_id=ids[2],
        tie_word_embeddings=shape.tie_word_embeddings,
    )


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of every LoRA-targetable projection of one decoder layer of ``config``."""
    from loraswap.server.engine.kv_cache import head_dim, kv_heads

    size = head_dim(config)
    h, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * size, kv_heads(config) * size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def distinct_shapes(shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """One entry per distinct ``(in, out)``, named by the projections sharing it (``q_proj/o_proj``)."""
    names: dict[tuple[int, int], list[str]] = {}
    for name, shape in shapes.items():
        names.setdefault(shape, []).append(name)
    return {"/".join(n): shape for shape, n in names.items()}


class Results:
    """A JSON object on disk, rewritten (atomically) after every :meth:`put`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.data: dict[str, object] = {}

    def put(self, key: str, value: object) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call_s(
    fn: Callable[[], object], device: torch.device, inner: int = 20, repeats: int = 5, warmup: int = 3
) -> float:
    """Median over ``repeats`` of the time of ``inner`` back-to-back calls, divided by ``inner``
    (CUDA events on CUDA: device time, which equals host time when launches are the bottleneck)."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            started = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - started) / inner)
    return statistics.median(samples)


def wall_s(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 3) -> float:
    """Median wall time of one call, the device synchronised before and after each."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


# -- probe ------------------------------------------------------------------------------------------


def probe(device: torch.device) -> dict[str, object]:
    """Versions, the device, and three small CUDA paths: a bitsandbytes NF4 linear, the staged
    host → device slot fill (exact), and the NVML utilization metric."""
    from importlib import metadata

    out: dict[str, object] = {"python": sys.version.split()[0], "device": str(device)}
    versions = {}
    for dist in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "triton",
        "safetensors",
        "grpcio",
        "protobuf",
        "prometheus-client",
        "numpy",
        "pytest",
        "nvidia-ml-py",
        "loraswap",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    out["versions"] = versions
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
        }
        out["nf4_linear"] = _try(lambda: _nf4_linear(device))
        out["nvml_metrics"] = _try(lambda: _nvml_metrics(str(device)))
    import loraswap

    out["loraswap_file"] = loraswap.__file__
    out["staged_fill"] = _try(lambda: _staged_fill(device))
    return out


def probe_problems(found: dict) -> list[str]:
    """What the probe found broken: no CUDA on a CUDA run, a sub-check that raised or came out wrong."""
    problems = []
    if found["device"].startswith("cuda") and not found["cuda_available"]:
        problems.append("torch sees no CUDA device")
    for key in ("nf4_linear", "nvml_metrics", "staged_fill"):
        if key in found and not found[key]["ok"]:
            problems.append(f"{key}: {found[key]['error']}")
    checks = (("nf4_linear", "finite"), ("nvml_metrics", "utilization"), ("staged_fill", "exact"))
    problems += [f"{key}: {flag} is false" for key, flag in checks if found.get(key, {}).get(flag) is False]
    return problems


def _try(fn: Callable[[], dict]) -> dict:
    try:
        return {"ok": True, **fn()}
    except Exception as error:  # a probe reports what broke and goes on
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}


def _nf4_linear(device: torch.device) -> dict:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(256, 128, compute_dtype=torch.bfloat16, quant_type="nf4").to(device)
    x = torch.randn(4, 256, dtype=torch.bfloat16, device=device)
    y = layer(x)
    sync(device)
    return {
        "bitsandbytes": bnb.__version__,
        "finite": bool(torch.isfinite(y).all()),
        "weight": type(layer.weight).__name__,
    }


def _nvml_metrics(device: str) -> dict:
    from loraswap.server.metrics import memory_metrics

    names = [family.name for family in memory_metrics(device)]
    return {"names": names, "utilization": "loraswap_device_utilization_ratio" in names}


def _staged_fill(device: torch.device) -> dict:
    """Fill a slot of a LoRA layer on ``device`` from host views of one storage; compare exactly."""
    from torch import nn

    from loraswap.server.lora.context import LoraContext
    from loraswap.server.lora.layer import BatchedLoraLinear, fill_slot

    rank, n_in, n_out = 4, 64, 32
    layer = BatchedLoraLinear(
        nn.Linear(n_in, n_out).to(device), 2, 8, LoraContext(max_rank=8), torch.bfloat16
    )
    host = torch.randn(rank * (n_in + n_out), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    a, bt = host[: rank * n_in].view(rank, n_in), host[rank * n_in :].view(rank, n_out)
    fill_slot(1, [(layer, a, bt, 2.0)])
    sync(device)
    exact = torch.equal(layer.a[1, :rank].cpu(), a) and torch.equal(layer.bt[1, :rank].cpu(), bt * 2.0)
    untouched = not layer.a[0].any() and not layer.a[1, rank:].any()
    return {"exact": bool(exact and untouched), "slot_device": str(layer.a.device)}


# -- model ------------------------------------------------------------------------------------------


def build_base(out_dir: Path, shape: ModelShape, device: torch.device, vocab_size: int | None = None) -> dict:
    """Write a random-weight Llama of ``shape`` (bf16 safetensors, initialised on ``device``) with the
    tiny test tokenizer; return its size figures."""
    from transformers import LlamaForCausalLM

    from loraswap.devtools.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = llama_config(shape, tokenizer, vocab_size)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.config.name_or_path = f"random-llama-{shape.hidden_size}x{shape.num_layers}"
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    files = sum(f.stat().st_size for f in Path(out_dir).glob("*.safetensors"))
    return {"params": params, "weights_file_bytes": files, "vocab_size": config.vocab_size}


def write_registry(
    work: Path, base_dir: Path, profile: str, mixed: int, activation: int
) -> dict[str, object]:
    """Random adapters of ``profile`` (a ``bench.engine_bench.PROFILES`` label) for ``base_dir`` in a local
    registry at ``work / "registry"``: ``mix0..`` for the mixed batch, ``act0..`` for cold activation."""
    from bench.adapters import write_adapter
    from bench.engine_bench import PROFILES
    from loraswap.models import resolve_base
    from loraswap.registry.registry import open_registry

    rank, targets = PROFILES[profile]
    registry = open_registry(work / "registry")
    base = resolve_base(base_dir)
    names = [f"mix{i}" for i in range(mixed)] + [f"act{i}" for i in range(activation)]
    file_bytes = 0
    for i, name in enumerate(names):
        folder = write_adapter(work / "adapters" / name, base_dir, seed=i, rank=rank, targets=targets)
        file_bytes = (folder / "adapter_model.safetensors").stat().st_size
        registry.push(folder, name, base=base)
    return {"profile": profile, "rank": rank, "targets": list(targets), "mixed": mixed,
            "activation": activation, "adapter_file_bytes": file_bytes}  # fmt: skip


# -- the LoRA op alone ------------------------------------------------------------------------------


def op_bench(
    shapes: dict[str, tuple[int, int]],
    batch_sizes: list[int],
    modes: list[str],
    device: torch.device,
    dtype: torch.dtype,
    slots: int,
    rank: int,
    on_result: Callable[[dict], None] | None = None,
) -> dict[str, object]:
    """Time each op's ``apply`` alone, every token from its own adapter (slot t for token t, the
    decode case), for each ``(in, out)`` of ``shapes`` and each batch size: microseconds per call.

    ``modes`` are names of ``loraswap.server.lora.ops.OPS`` or ``auto`` (the engine's per-batch choice,
    through :meth:`LoraContext.set_batch`). Also times ``set_batch`` itself (host work once per step).
    """
    from loraswap.server.lora.context import LoraContext

    if max(batch_sizes) > slots:
        raise ValueError(f"batch size {max(batch_sizes)} needs that many slots; only {slots} given")
    ranks = dict.fromkeys(range(slots), rank)
    out: dict[str, object] = {"rank": rank, "slots": slots, "dtype": str(dtype), "us": {}, "set_batch_us": {}}
    gen = torch.Generator(device=device).manual_seed(0)
    for label, (n_in, n_out) in shapes.items():
        a = torch.randn(slots, rank, n_in, generator=gen, device=device, dtype=dtype) * 0.02
        bt = torch.randn(slots, rank, n_out, generator=gen, device=device, dtype=dtype) * 0.02
        for mode in modes:  # one untimed pass first: library handles, kernel choices, allocator pools
            for t in batch_sizes:
                ctx = LoraContext(max_rank=rank)
                ctx.set_batch(list(range(t)), ranks, device, mode)
                x = torch.randn(t, n_in, generator=gen, device=device, dtype=dtype)
                ctx.op.apply(torch.zeros(t, n_out, device=device, dtype=dtype), x, a, bt, ctx)
        table: dict[str, dict[str, float]] = {}
        for mode in modes:
            row: dict[str, float] = {}
            for t in batch_sizes:
                ctx = LoraContext(max_rank=rank)
                ctx.set_batch(list(range(t)), ranks, device, mode)
                x = torch.randn(t, n_in, generator=gen, device=device, dtype=dtype)
                y = torch.zeros(t, n_out, device=device, dtype=dtype)
                call = functools.partial(ctx.op.apply, y, x, a, bt, ctx)
                row[str(t)] = per_call_s(call, device) * 1e6
            table[mode] = row
            out["us"][label] = table  # type: ignore[index]
            if on_result:
                on_result(out)
        del a, bt
    for t in batch_sizes:
        ctx = LoraContext(max_rank=rank)
        slot_list = list(range(t))
        out["set_batch_us"][str(t)] = (
            wall_s(  # type: ignore[index]
                lambda ctx=ctx, s=slot_list: ctx.set_batch(s, ranks, device, "auto"), device
            )
            * 1e6
        )
    if on_result:
        on_result(out)
    return out


# -- the engine -------------------------------------------------------------------------------------


def device_memory(engine, allocated_before: int) -> dict[str, int]:
    """Bytes of the engine's base weights, KV cache and LoRA slot buffers, and of one slot."""
    layers = list(engine.adapters.layers.values())
    slot_buffers = sum((layer.a.numel() + layer.bt.numel()) * layer.a.element_size() for layer in layers)
    lora_ids = {id(t) for layer in layers for t in (layer.a, layer.bt)}
    tensors = [*engine.loaded.model.parameters(), *engine.loaded.model.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors if id(t) not in lora_ids)
    out = {
        "weights_bytes": weights,
        "kv_cache_bytes": engine.kv.nbytes,
        "slot_buffers_bytes": slot_buffers,
        "per_slot_bytes": sum(layer.slot_bytes() for layer in layers),
        "slots": engine.config.adapter_slots,
    }
    if engine.device.type == "cuda":
        out["allocated_bytes"] = torch.cuda.memory_allocated(engine.device) - allocated_before
    return out


def slot_fill_staged_ab(engine, registry, name: str, rounds: int = 10) -> dict[str, float]:
    """Median host → slot fill of one adapter through ``fill_slot_torch``: its host matrices as views of
    one storage (staged: one transfer, then device copies) vs the same matrices as separate tensors (one
    transfer per matrix), alternated on the same slot."""
    from loraswap.server.lora.layer import fill_slot_torch

    digest = registry.resolve(name).digest
    engine.load_adapter(name, "device")
    adapter = engine.adapters.host.peek(digest)
    layers = engine.adapters.layers
    staged = [
        (layer, *adapter.modules.get(m, (None, None)), adapter.scales.get(m, 1.0))
        for m, layer in layers.items()
    ]
    separate = [
        (layer, None if a is None else a.clone(), None if bt is None else bt.clone(), s)
        for layer, a, bt, s in staged
    ]
    times: dict[str, list[float]] = {"staged_s": [], "per_matrix_s": []}
    with engine.step_lock:
        slot = engine.adapters.slots.slot_of(digest)
        for _ in range(rounds):
            for key, parts in (("staged_s", staged), ("per_matrix_s", separate)):
                sync(engine.device)
                started = time.perf_counter()
                fill_slot_torch(slot, parts)
                sync(engine.device)
                times[key].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in times.items()}


def decode_steps(
    engine, registry, names: list[str], context: int, profile_to: Path | None = None
) -> dict[str, float | str]:
    """One decode step of ``len(names)`` sequences at position ``context``: every sequence on its own
    adapter (mixed), all on the first adapter (one), and with no adapter (base, where the LoRA layers
    skip their ops). Median wall time and CUDA-event time of each; optionally a profiler table of two
    mixed steps written to ``profile_to``."""
    from loraswap.server.engine.forward import SeqChunk

    slots = [engine.adapters.slots.slot_of(registry.resolve(n).digest) for n in names]
    if any(s is None for s in slots):
        raise RuntimeError("every adapter of the decode step must be resident on the device")
    token = engine.tokenizer("a")["input_ids"][-1]
    device = engine.device
    out: dict[str, float | str] = {}
    with engine.step_lock:
        rows = [engine.kv.allocate() for _ in names]
        try:
            cases = {
                "mixed": [SeqChunk(r, [token], context, s, True) for r, s in zip(rows, slots, strict=True)],
                "one": [SeqChunk(r, [token], context, slots[0], True) for r in rows],
                "base": [SeqChunk(r, [token], context, -1, True) for r in rows],
            }
            for key, chunks in cases.items():
                out[f"{key}_wall_s"] = wall_s(lambda c=chunks: engine.forward(c), device)
                out[f"{key}_device_s"] = per_call_s(
                    lambda c=chunks: engine.forward(c), device, inner=5, repeats=5
                )
            out["lora_share"] = (out["mixed_wall_s"] - out["base_wall_s"]) / out["mixed_wall_s"]
            if profile_to is not None and device.type == "cuda":
                try:
                    out["profile"] = _profile(lambda: engine.forward(cases["mixed"]), device, profile_to)
                except Exception as error:  # the timings above stand without the profile
                    out["profile"] = f"failed: {type(error).__name__}: {error}"
        finally:
            for row in rows:
                engine.kv.release(row)
    return out


def _profile(fn: Callable[[], object], device: torch.device, path: Path) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            fn()
        sync(device)
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total", "cpu_time_total"):
        try:
            table = averages.table(sort_by=key, row_limit=30)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    else:
        table = str(averages)
    path.write_text(f"torch.profiler, two mixed decode steps, sorted by {key}\n{table}\n")
    return path.name


def engine_bench(args: argparse.Namespace, results: Results) -> list[str]:
    """Every engine figure of one quantization on the built base, each saved as soon as measured; a
    measurement that raises is saved as its error and the next one runs. Returns the failed keys."""
    from bench.engine_bench import activation_times, memory_per_adapter, requests, throughput
    from loraswap.registry.registry import open_registry
    from loraswap.server.engine import Engine, EngineConfig

    device = torch.device(args.device)
    registry = open_registry(Path(args.work) / "registry")
    mixed = [f"mix{i}" for i in range(args.adapters)]
    cold = [f"act{i}" for i in range(args.activation)]
    failed: list[str] = []

    def measure(key: str, fn: Callable[[], object]) -> None:
        try:
            results.put(key, fn())
        except Exception as error:
            traceback.print_exc()
            results.put(key, {"error": f"{type(error).__name__}: {error}"})
            failed.append(key)

    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    started = time.perf_counter()
    config = EngineConfig(
        base=str(Path(args.work) / "base"), quantization=args.quantization, device=args.device,
        adapter_slots=args.adapters, max_rank=args.rank, max_batch_size=args.requests,
        max_seq_len=args.max_seq_len, max_queue=4 * args.requests, host_cache_bytes=8 << 30,
    )  # fmt: skip
    engine = Engine(config, registry=registry)
    results.put("load_s", time.perf_counter() - started)
    results.put("quantization", engine.loaded.quantization)
    results.put("device", str(engine.device))
    measure("memory", lambda: device_memory(engine, before))
    engine.start()
    try:
        measure("activation", lambda: activation_times(engine, registry, cold))
        measure("adapter_memory", lambda: memory_per_adapter(engine, registry, cold[0]))
        measure("slot_fill", lambda: slot_fill_staged_ab(engine, registry, cold[0]))
        for name in mixed:
            engine.load_adapter(name, "device")
        throughput(engine, requests(mixed[: min(4, len(mixed))], 4))  # warm-up
        runs = {
            "mixed": requests(mixed, args.new_tokens),
            "one": requests([mixed[0]] * args.requests, args.new_tokens),
            "base": requests([""] * args.requests, args.new_tokens),
        }
        best: dict[str, float] = {}
        for _ in range(args.rounds):  # interleaved rounds, best of each
            for key, reqs in runs.items():
                best[key] = max(best.get(key, 0.0), throughput(engine, reqs))
                results.put("tok_s", best)
        profile_to = Path(args.profile) if args.profile else None
        measure(
            "decode_step",
            lambda: decode_steps(engine, registry, mixed[: args.requests], args.context, profile_to),
        )
        if device.type == "cuda":
            results.put("peak_allocated_bytes", torch.cuda.max_memory_allocated(device) - before)
    finally:
        engine.stop(drain_timeout=5)
    return failed


# -- command line -----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """The command line of every subcommand (the check's dry run parses its planned steps with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("probe", "model", "ops", "engine"))
    parser.add_argument("--json", required=True, help="the JSON file this step writes")
    parser.add_argument("--work", default="/tmp/loraswap-gpu-check", help="where the model and registry go")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="llama-1b", choices=sorted(MODELS))
    parser.add_argument("--vocab", type=int, default=0, help="embedding rows (0: the model's)")
    parser.add_argument(
        "--profile-name", default="all-projections r16", help="adapter shape (engine_bench.PROFILES)"
    )
    parser.add_argument("--adapters", type=int, default=32, help="mixed adapters = slots")
    parser.add_argument("--activation", type=int, default=10, help="adapters timed for cold activation")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64", help="batch sizes of the op bench")
    parser.add_argument("--op-slots", type=int, default=64)
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--rank", type=int, default=16, help="slot rank (max_rank)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--context", type=int, default=128, help="KV positions before the timed decode step")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--profile", default="", help="write a torch.profiler table of a decode step here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    results = Results(Path(args.json))
    device = torch.device(args.device)
    if args.what == "probe":
        found = probe(device)
        for key, value in found.items():
            results.put(key, value)
        problems = probe_problems(found)
        if problems:
            print(f"RuntimeError: {'; '.join(problems)}", file=sys.stderr)
        return 1 if problems else 0
    shape = MODELS[args.model]
    work = Path(args.work)
    if args.what == "model":
        started = time.perf_counter()
        results.put(
            "model", {"name": args.model, **build_base(work / "base", shape, device, args.vocab or None)}
        )
        results.put("build_s", time.perf_counter() - started)
        started = time.perf_counter()
        adapters = write_registry(work, work / "base", args.profile_name, args.adapters, args.activation)
        results.put("adapters", adapters)
        results.put("adapters_s", time.perf_counter() - started)
        return 0
    if args.what == "ops":
        config = llama_config(shape, vocab_size=args.vocab or None)
        shapes = distinct_shapes(projection_shapes(config))
        results.put("shapes", {k: list(v) for k, v in shapes.items()})
        results.put("layers", config.num_hidden_layers)
        modes = ["auto", *[name for name in _op_names() if name != "reference"]]
        batches = [int(b) for b in args.batches.split(",")]
        op_bench(
            shapes,
            batches,
            modes,
            device,
            torch.bfloat16,
            args.op_slots,
            args.rank,
            on_result=lambda r: results.put("ops", r),
        )
        return 0
    failed = engine_bench(args, results)
    if failed:
        print(f"RuntimeError: measurements failed: {', '.join(failed)} (tracebacks above)", file=sys.stderr)
    return 1 if failed else 0


def _op_names() -> list[str]:
    from loraswap.server.lora.ops import OPS

    return list(OPS)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())

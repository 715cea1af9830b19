"""The op table of ``bench/quantized_cpu.py``: one matmul per weight format at the base's projection
shapes, for as many rows as the engine decodes at once, and the CPU it ran on.

It shows, before the engine runs, what each format costs where the time goes: a decoder layer's seven
projections and ``lm_head``. The int8 weight-only kernel on fp32 activations is in it (and not run in the
engine) because on x86 it is a scalar loop: the engine would take minutes per variant.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.int8_weight_only import int8_linear, quantize_int8
from loraswap.precision import cpu_bf16_support
from loraswap.server.engine.kv_cache import head_dim, kv_heads
from loraswap.server.engine.packed import pack, packed_linear, packing_supported
from loraswap.server.engine.weight_only import half_linear, half_weights_supported, pack_half


def cpu_description() -> dict[str, str]:
    """The CPU's model name, its flags that decide the formats' speed, and torch's CPU capability."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16")
    return {
        "model": name,
        "flags": " ".join(f for f in wanted if f in flags) or "none of " + ",".join(wanted),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_bf16_support()[1],
    }


def shapes(base_dir: Path) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of a decoder layer's projections and of ``lm_head``, from ``config.json``."""
    c = json.loads((base_dir / "config.json").read_text())
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = kv_heads(c) * head_dim(c)
    return {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h),
            "down": (h, i), "lm_head": (c["vocab_size"], h)}  # fmt: skip


def best_us(fn: Callable[[], object], budget_s: float = 0.3) -> float:
    """The best of a few timed calls of ``fn``, in µs (more calls where one is quick)."""
    fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e6


def formats(weight: torch.Tensor, rows: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each measurable format's matmul over ``weight`` (fp32 ``[out, in]``), taking fp32 ``x``."""
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"fp32 F.linear": lambda x: F.linear(x, weight)}
    cpu = torch.device("cpu")
    if packing_supported(torch.float32, cpu):
        packed = pack(weight, rows)
        out["fp32 packed"] = lambda x: packed_linear(x, packed)
    if packing_supported(torch.bfloat16, cpu):
        packed16 = pack(weight.bfloat16(), rows)
        out["bf16 packed"] = lambda x: packed_linear(x.bfloat16(), packed16)
    q, scales = quantize_int8(weight)
    out["int8wo fp32 act"] = lambda x: int8_linear(x, q, scales, torch.float32)
    out["int8wo bf16 act"] = lambda x: int8_linear(x, q, scales, torch.bfloat16)
    if half_weights_supported():
        half = pack_half(weight)
        out["fp16w"] = lambda x: half_linear(x, half)
    return out


def op_table(base_dir: Path, rows: int, threads: int | None = None) -> dict:
    """µs per matmul for every format and shape (``rows`` input rows), the layer's sum, and the CPU."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        table: dict[str, dict[str, float]] = {}
        for name, (out_f, in_f) in shapes(base_dir).items():
            weight = torch.randn(out_f, in_f, generator=gen) * in_f**-0.5
            x = torch.randn(rows, in_f, generator=gen)
            with torch.inference_mode():
                table[name] = {
                    fmt: best_us(lambda f=f, x=x: f(x)) for fmt, f in formats(weight, rows).items()
                }
    finally:
        torch.set_num_threads(saved)
    layer = {fmt: sum(table[p][fmt] for p in table if p != "lm_head") for fmt in table["q"]}
    return {
        "cpu": cpu_description(),
        "threads": threads or saved,
        "rows": rows,
        "shapes": table,
        "layer": layer,
    }


def print_op_table(ops: dict, rows: int) -> None:
    cpu = ops["cpu"]
    print(f"CPU: {cpu['model']}; flags: {cpu['flags']}; torch: {cpu['torch_capability']}")
    print(f"precision: {cpu['native_bf16']}")
    print(f"one matmul, {rows} rows, {ops['threads']} threads, µs (best of several):")
    fmts = list(ops["layer"])
    print("  " + "shape".ljust(22) + "".join(f.rjust(17) for f in fmts))
    lines = [("decoder layer (7 proj.)", ops["layer"]), ("lm_head", ops["shapes"]["lm_head"])]
    for label, values in lines:
        print("  " + label.ljust(22) + "".join(f"{values[f]:17.0f}" for f in fmts))

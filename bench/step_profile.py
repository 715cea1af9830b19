"""Where a decode step's time goes, against the machine's floor for the same work.

The engine is stepped by hand on the embedded SmolLM2 (CPU, in the precision it picks by default):
``--batch`` sequences are prefilled, then ``--steps`` decode steps run under ``torch.profiler`` (base
only, and with every sequence on one of ``--adapters`` distinct adapters). The report groups the
profiled operators (dense matmuls, attention, LoRA, norms and element-wise ops, sampling) and gives the
rest of the wall time as host overhead (Python, dispatch, synchronisation). The floor is measured in the
same run: the step's dense matmuls as plain ``torch`` ops (same precision) in a loop over the real
weights (the compute floor on this CPU), and the bytes of weights a step must read at least once
divided by this machine's copy bandwidth (the memory floor).

Each case runs with the defaults (fused q/k/v and gate/up projections, prepacked oneDNN weights), with
plain weights (``pack_weights=False``) and with the projections one by one (``fuse_projections=False``).
A case's three engines are built side by side; after one profiled run each, their unprofiled steps
alternate round by round (``--rounds``), and the ratios come from those rounds. The matmul floor is
measured after each round (its median is used).

Run: ``python -m bench.step_profile [--batch 32] [--steps 8] [--adapters 8] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.adapters import write_adapter
from loraswap.models import resolve_base
from loraswap.models.fingerprint import weight_shapes
from loraswap.precision import default_precision
from loraswap.registry import open_registry
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.api import GenerationRequest, SamplingParams
from loraswap.server.engine.packed import pack, packed_linear, packing_supported

ELEMENTWISE = "aten::softmax aten::_softmax aten::mul aten::add aten::pow aten::mean aten::rsqrt aten::silu"
COPIES = "aten::copy_ aten::index aten::index_select aten::gather aten::index_copy_ aten::embedding aten::to"
GROUPS = (
    (
        "dense matmul",
        ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "mkldnn::_linear_pointwise"),
    ),
    ("batched matmul (attention, LoRA)", ("aten::bmm", "aten::baddbmm")),
    (
        "softmax / norms / element-wise",
        (*ELEMENTWISE.split(), "aten::neg", "aten::cat", "aten::div", "aten::exp"),
    ),
    ("copies / gathers / indexing", (*COPIES.split(), "aten::_to_copy", "aten::clone", "aten::index_put_")),
    ("sampling", ("aten::argmax", "aten::topk", "aten::sort", "aten::multinomial", "aten::max")),
)


def group_of(name: str) -> str:
    for group, names in GROUPS:
        if name in names:
            return group
    return "other operators"


def decoding_engine(
    base_dir: Path, registry: Path, batch: int, adapters: list[str], fuse: bool, pack: bool
) -> Engine:
    """An engine (not started) with ``batch`` sequences prefilled and decoding."""
    engine = Engine(
        EngineConfig(
            base=str(base_dir), registry=str(registry), adapter_slots=max(len(adapters), 1), max_rank=16,
            max_batch_size=batch, max_seq_len=512, prefill_between_layers=False, fuse_projections=fuse,
            pack_weights=pack,
        )
    )  # fmt: skip
    sampling = SamplingParams(max_new_tokens=400, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        adapter = adapters[i % len(adapters)] if adapters else ""
        engine.submit(
            GenerationRequest(adapter=adapter, prompt=f"Story {i}: once upon a time", sampling=sampling)
        )
    while len(engine._running) < batch or any(not s.output_ids for s in engine._running):
        with engine.step_lock:
            engine.take_incoming()
            engine.step()
    return engine


def profile_steps(engine: Engine, steps: int) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """Median wall ms of a decode step, ms per step by operator group (self CPU time), and the largest
    operators outside the groups."""
    for _ in range(2):
        engine.step()
    walls = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - start)
    groups: dict[str, float] = defaultdict(float)
    others: dict[str, float] = {}
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / steps
        groups[group_of(event.key)] += ms
        if group_of(event.key) == "other operators":
            others[event.key] = ms
    top = sorted(others.items(), key=lambda kv: -kv[1])[:4]
    groups["other operators"] = groups.get("other operators", 0.0)
    return statistics.median(walls) * 1e3, dict(groups), top


def linear_shapes(base_dir: Path) -> list[tuple[int, int]]:
    """``(out, in)`` of every dense matmul of a step: the projections and the logits (read from the
    checkpoint's headers; a tied ``lm_head`` is the embedding's shape)."""
    shapes = weight_shapes(base_dir)
    out = [tuple(s) for name, s in shapes.items() if name.endswith("proj.weight") and len(s) == 2]
    head = shapes.get("lm_head.weight") or shapes["model.embed_tokens.weight"]
    return [*out, tuple(head)]


def timed_steps(engine: Engine, steps: int) -> float:
    """Median wall ms of ``steps`` unprofiled decode steps."""
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls) * 1e3


def matmul_floor(base_dir: Path, batch: int, repeats: int = 10) -> dict[str, float]:
    """ms for one step's dense matmuls alone (``batch`` rows through every weight shape of the model, in
    the CPU's default precision, in a loop), with ``F.linear`` and with prepacked oneDNN weights
    (``engine/packed.py``)."""
    dtype = default_precision(torch.device("cpu")).dtype
    shapes = linear_shapes(base_dir)
    weights = [torch.randn(o, i, dtype=dtype) * 0.02 for o, i in shapes]
    inputs = [torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights]
    ops = {"F.linear": (torch.nn.functional.linear, weights)}
    if packing_supported(dtype, torch.device("cpu")):
        ops["packed"] = (packed_linear, [pack(w, batch) for w in weights])
    out = {}
    with torch.inference_mode():
        for name, (op, ws) in ops.items():
            for x, w in zip(inputs, ws, strict=True):
                op(x, w)
            start = time.perf_counter()
            for _ in range(repeats):
                for x, w in zip(inputs, ws, strict=True):
                    op(x, w)
            out[name] = (time.perf_counter() - start) / repeats * 1e3
    return out


def copy_bandwidth() -> float:
    """Bytes per second of a large tensor copy on this machine."""
    src = torch.empty(256 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 5 * src.numel() * 2 / (time.perf_counter() - start)  # read + write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of unprofiled steps")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="loraswap-step-profile-"))
    base = resolve_base("default")
    registry = open_registry(work / "registry")
    names = []
    for i in range(args.adapters):
        folder = write_adapter(
            work / f"a{i}", base.path, seed=i, rank=16, targets=("q_proj", "k_proj", "v_proj", "o_proj")
        )
        registry.push(folder, f"bot-{i}", base=base)
        names.append(f"bot-{i}")
    bandwidth = copy_bandwidth()
    rows = {}
    cases = [("base only", []), (f"{args.adapters} adapters (r16 q,k,v,o)", names)]
    variants = [  # (fused, packed): the default first, then each fast path off in turn
        (True, True, "fused, packed weights"),
        (True, False, "fused, plain weights (F.linear)"),
        (False, True, "projections one by one, packed weights"),
    ]
    floors = []
    timed: dict[str, list[float]] = {}
    for label, adapters in cases:
        engines = {
            f"{label}, {variant}": decoding_engine(
                base.path, work / "registry", args.batch, adapters, fuse, pack
            )
            for fuse, pack, variant in variants
        }  # the variants of a case side by side, so that their steps can alternate
        for name, engine in engines.items():
            with engine.step_lock:
                rows[name] = profile_steps(engine, args.steps)
        for _ in range(args.rounds):  # unprofiled steps, the variants alternating round by round
            for name, engine in engines.items():
                with engine.step_lock:
                    timed.setdefault(name, []).append(timed_steps(engine, args.steps))
            floors.append(matmul_floor(base.path, args.batch))
        for engine in engines.values():
            engine.stop(drain_timeout=0)
        del engines
    floor = {name: statistics.median(f[name] for f in floors) for name in floors[0]}
    floor_ms = min(floor.values())
    chosen = default_precision(torch.device("cpu"))
    weight_bytes = sum(chosen.dtype.itemsize * o * i for o, i in linear_shapes(base.path))
    memory_floor_ms = weight_bytes / bandwidth * 1e3
    print(f"decode step of {args.batch} sequences, SmolLM2 on CPU, {chosen.describe()}, "
          f"{args.steps} profiled steps")  # fmt: skip
    alone = ", ".join(f"{k} {v:.1f} ms" for k, v in floor.items())
    print(f"floor: the step's dense matmuls alone, {chosen.name}, {alone}"
          f" (median of {len(floors)}); weights {weight_bytes / 1e6:.0f} MB at {bandwidth / 1e9:.1f} GB/s "
          f"copy bandwidth {memory_floor_ms:.1f} ms")  # fmt: skip
    groups = [g for g, _ in GROUPS] + ["other operators"]
    for label, (wall, by_group, top) in rows.items():
        profiled = sum(by_group.values())
        print(f"\n{label}: step {wall:.1f} ms = {wall / floor_ms:.1f}x the matmul floor "
              f"({args.batch / wall * 1e3:.0f} tok/s)")  # fmt: skip
        for group in groups:
            ms = by_group.get(group, 0.0)
            print(f"  {group:<36}{ms:>8.1f} ms {ms / wall:>6.0%}")
            if group == "other operators":
                print("    " + ", ".join(f"{name} {t:.1f} ms" for name, t in top))
        rest = wall - profiled
        print(f"  {'host overhead (wall - operators)':<36}{rest:>8.1f} ms {rest / wall:>6.0%}")
    print("\nunprofiled steps, the variants alternating: median ms per round, and tok/s ratios per round")
    for label, _ in cases:
        default = f"{label}, {variants[0][2]}"
        for _, _, variant in variants:
            name = f"{label}, {variant}"
            print(f"  {name}: " + ", ".join(f"{ms:.1f}" for ms in timed[name]) + " ms")
        for _, _, variant in variants[1:]:
            ratios = [v / d for v, d in zip(timed[f"{label}, {variant}"], timed[default], strict=True)]
            print(f"  {label}: {variants[0][2]} vs {variant}: median {statistics.median(ratios):.2f}x tok/s "
                  f"({', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``torch.compile`` of a decoder layer's pieces against the eager ops the packed forward runs, same run.

The packed forward's per-layer work outside attention is RMSNorm, rotary embedding of q and k, and the
MLP block (norm, gate/up matmul, SiLU times up, down matmul, residual add). Each piece is timed eagerly
and compiled (``torch.compile(dynamic=True)``, inductor, so one compile serves every batch size; the
matmuls on prepacked oneDNN weights as the engine runs them, where supported), at SmolLM2-135M's shapes
with ``--rows`` tokens, alternating eager and compiled over ``--repeat`` rounds. It reports the compile
time, and the median microseconds per call of each, so that a same-run A/B decides whether compiling the
decode step pays on this machine.

Run: ``python -m bench.compile_ab [--rows 32] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch._inductor.config
import torch.nn.functional as F

from loraswap.precision import default_precision
from loraswap.server.engine.packed import pack, packed_linear, packing_supported

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 9, 3, 64  # SmolLM2-135M


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """As HF's LlamaRMSNorm: in fp32, the result cast back, then scaled."""
    dtype = x.dtype
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


class MlpBlock(torch.nn.Module):
    """Norm, fused gate/up, SiLU times up, down, residual: plain weights with ``F.linear`` (what inductor
    compiles, packing the weights itself with ``freezing``), or prepacked ones (what the engine runs)."""

    def __init__(self, norm: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, packed: bool) -> None:
        super().__init__()
        self.norm = torch.nn.Parameter(norm, requires_grad=False)
        self.linear = packed_linear if packed else F.linear
        if packed:
            self.register_buffer("gate_up", pack(gate_up, 32))
            self.register_buffer("down", pack(down, 32))
        else:
            self.gate_up = torch.nn.Parameter(gate_up, requires_grad=False)
            self.down = torch.nn.Parameter(down, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear(rms_norm(hidden, self.norm), self.gate_up).split(INTERMEDIATE, dim=-1)
        return hidden + self.linear(F.silu(gate) * up, self.down)


def time_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dtype, t = default_precision(torch.device("cpu")).dtype, args.rows
    hidden = torch.randn(t, HIDDEN, dtype=dtype)
    norm = torch.ones(HIDDEN, dtype=dtype)
    q = torch.randn(t, HEADS, HEAD_DIM, dtype=dtype)
    k = torch.randn(t, KV_HEADS, HEAD_DIM, dtype=dtype)
    cos, sin = torch.randn(t, 1, HEAD_DIM, dtype=dtype), torch.randn(t, 1, HEAD_DIM, dtype=dtype)
    gate_up = torch.randn(2 * INTERMEDIATE, HIDDEN, dtype=dtype) * 0.02
    down = torch.randn(HIDDEN, INTERMEDIATE, dtype=dtype) * 0.02
    packs = packing_supported(dtype, hidden.device)
    plain_mlp = MlpBlock(norm, gate_up, down, packed=False)
    # (name, eager function, compiled function's source, inputs): the eager side is what the engine runs
    pieces = [
        ("rms_norm", rms_norm, rms_norm, (hidden, norm)),
        ("rotary q,k", rotary, rotary, (q, k, cos, sin)),
        ("mlp block", MlpBlock(norm, gate_up, down, packed=packs), plain_mlp, (hidden,)),
    ]
    torch._inductor.config.freezing = True  # constant weights: inductor may pack them itself
    eager = "prepacked oneDNN weights" if packs else "F.linear"
    print(
        f"{t} rows, bf16, {torch.get_num_threads()} threads; eager matmuls on {eager}, "
        "compiled ones as inductor makes them"
    )
    with torch.inference_mode():
        for name, fn, source, inputs in pieces:
            compiled = torch.compile(source, dynamic=True)
            start = time.perf_counter()
            compiled(*inputs)
            compile_s = time.perf_counter() - start
            eager_us, compiled_us = [], []
            for _ in range(args.repeat):  # alternating
                eager_us.append(time_us(lambda fn=fn, inputs=inputs: fn(*inputs), args.calls))
                compiled_us.append(time_us(lambda c=compiled, inputs=inputs: c(*inputs), args.calls))
            e, c = statistics.median(eager_us), statistics.median(compiled_us)
            print(f"{name:<12} eager {e:8.1f} us  compiled {c:8.1f} us  eager/compiled {e / c:5.2f}x  "
                  f"(compile {compile_s:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

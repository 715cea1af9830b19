"""bench/quantized_cpu on the tiny model (every variant kind in its own process, the op table, the
summary), and its int8 weight-only candidate's op against the reference op."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import quantized_cpu
from bench.int8_weight_only import Int8WeightOnlyLinear, int8_linear, quantize_int8, reference_int8_linear
from bench.quantized_ops import op_table
from bench.quantized_variant import weight_bytes
from loraswap.server.engine.weight_only import half_weights_supported


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
def test_int8_linear_matches_dequantize_and_f_linear(act_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(40, 64, generator=gen)
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert ((q.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 * (1 + 1e-6)).all()
    for shape in ((1, 64), (6, 64), (2, 3, 64)):
        x = torch.randn(*shape, generator=gen)
        got, want = int8_linear(x, q, scales, act_dtype), reference_int8_linear(x, q, scales, act_dtype)
        assert got.shape == want.shape and got.dtype == x.dtype
        # Both sum the same fp32 products in some order (at most `in` terms, each partial sum rounded once
        # in fp32), then round once to act_dtype: the outputs may differ by a rounding of act_dtype there.
        terms = x.to(act_dtype).float().abs() @ (q.float().abs() * scales.to(act_dtype).float()[:, None]).T
        bound = 64 * torch.finfo(torch.float32).eps * terms + torch.finfo(act_dtype).eps * want.abs()
        assert ((got - want).abs() <= bound).all()
    layer = Int8WeightOnlyLinear(weight, torch.ones(40), act_dtype)
    x = torch.randn(3, 64, generator=gen)
    assert torch.equal(layer(x), int8_linear(x, q, scales, act_dtype) + 1)


def test_schedule_rotates_the_order_and_runs_slow_variants_once() -> None:
    order = quantized_cpu.schedule(["a", "b", "c"], 3, {"b"})
    assert order == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "a"), (2, "c"), (2, "a")]


def test_agreement_counts_identical_sequences_and_the_share_before_the_first_difference() -> None:
    got = [[1, 2, 3, 4], [1, 2, 9, 4], [5, 5, 5, 5]]
    want = [[1, 2, 3, 4], [1, 2, 3, 4], [6, 5, 5, 5]]
    assert quantized_cpu.agreement(got, want) == {"identical": 1, "sequences": 3, "prefix_share": 0.5}


def test_op_table_times_every_format_at_the_models_shapes(tiny_base: Path) -> None:
    ops = op_table(tiny_base, rows=3, threads=1)
    formats = {"fp32 F.linear", "int8wo fp32 act", "int8wo bf16 act"}
    formats |= {"fp16w"} if half_weights_supported() else set()
    assert formats <= set(ops["layer"]) and set(ops["shapes"]) == {
        "q", "k", "v", "o", "gate", "up", "down", "lm_head",
    }  # fmt: skip
    assert all(t > 0 for row in ops["shapes"].values() for t in row.values())
    assert ops["cpu"]["model"] and ops["cpu"]["torch_capability"]


def test_weight_bytes_counts_each_tensor_once_and_opaque_fp16_weights_by_their_modules(
    tiny_base: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    from loraswap.server.engine.weight_only import replace_linears

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    params = {n: p.numel() for n, p in model.named_parameters()}
    linear = sum(n for name, n in params.items() if name.endswith("proj.weight") or name == "lm_head.weight")
    assert weight_bytes(model) == 4 * sum(params.values()) + 4 * sum(b.numel() for b in model.buffers())
    if half_weights_supported():
        replace_linears(model)
        assert weight_bytes(model) == 4 * (sum(params.values()) - linear) + 2 * linear + 4 * sum(
            b.numel() for b in model.buffers()
        )


@pytest.mark.slow
def test_bench_runs_each_kind_of_variant_in_its_own_process(tiny_base: Path, tmp_path: Path, capsys) -> None:
    """fp32 (the engine as it is), int8wo (the bench-only candidate, loaded through its own hook) and nf4
    (bitsandbytes, PEFT on the same quantized model); fp16w runs the engine's own path, as fp32 does."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "report.json"
    argv = ["--base", str(tiny_base), "--variants", "fp32,int8wo,nf4", "--rounds", "1", "--requests", "2"]
    argv += ["--new-tokens", "4", "--agree-prompts", "1", "--no-ops", "--out", str(out)]
    assert quantized_cpu.main(argv) == 0
    summary = json.loads(out.read_text())["summary"]
    for variant, row in summary.items():
        assert all(row["tok_s"][case] > 0 for case in ("base", "one", "mixed")), variant
        assert row["weight_bytes"] > 0 and row["rss_after_bytes"] >= row["rss_before_bytes"]
        assert row["agree_same_weights"]["sequences"] == 3 and "agree_fp32_peft" in row
    # The exact paths agree with PEFT on their own weights token for token.
    for variant in ("fp32", "nf4"):
        assert summary[variant]["agree_same_weights"]["identical"] == 3, variant
    assert summary["fp32"]["agree_fp32_peft"]["identical"] == 3
    weights = {v: row["weight_bytes"] for v, row in summary.items()}
    assert weights["int8wo"] < weights["fp32"] and weights["nf4"] < weights["fp32"]
    assert summary["int8wo"]["precision"] == "precision: fp32 (int8 weights, bf16 activations in the matmul)"
    assert "2 adapters" in capsys.readouterr().out

"""The fast LoRA ops against the per-token reference op, on random data."""

from __future__ import annotations

import json

import pytest
import torch

from loraswap.server.lora.context import choose_op
from loraswap.server.lora.ops import (
    GATHER,
    GROUPED,
    OPS,
    SEGMENTED,
    group_layout,
    lora_bgmv,
    lora_grouped,
    lora_reference,
    lora_sgmv,
    segments,
)


def _random_case(tokens: int, slots: int, rank: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 48, generator=gen).to(dtype)
    a = torch.randn(slots, rank, 48, generator=gen).to(dtype)
    bt = torch.randn(slots, rank, 80, generator=gen).to(dtype)
    slot_ids = torch.randint(-1, slots, (tokens,), generator=gen)
    return x, a, bt, slot_ids


def _rounding_bound(x, a, bt, slots, dtype: torch.dtype) -> torch.Tensor:
    """Per element, how far an op run in ``dtype`` may be from :func:`lora_reference` run in fp32.

    A dot product of n terms in floating point is off by at most gamma_n * sum|terms| whatever the order
    of summation, gamma_n = n*u / (1 - n*u) with u the unit roundoff (Higham, Accuracy and Stability of
    Numerical Algorithms, 3.1). An output element chains two (``in`` terms, then ``rank``), so the op and
    the reference each stay within gamma_(in + rank) * S of the exact value, S = sum over r, k of
    |x_k a_rk bt_rj| (the reference op on absolute values). An op in a narrower dtype, accumulating in fp32
    as torch's matmuls do, also rounds x, a and bt, the rank-sized intermediate and its output: 5 u more.
    """
    n = a.shape[1] + a.shape[2]
    u32 = torch.finfo(torch.float32).eps / 2
    relative = 2 * n * u32 / (1 - n * u32)
    if dtype != torch.float32:
        relative += 5 * torch.finfo(dtype).eps / 2
    return relative * lora_reference(x.double().abs(), a.double().abs(), bt.double().abs(), slots).float()


def _excess(got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> float:
    """The largest amount by which ``got`` misses ``expected`` beyond ``bound`` (<= 0: within it)."""
    return ((got.float() - expected).abs() - bound).max().item()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("op", [lora_bgmv, lora_sgmv, lora_grouped])
def test_fast_ops_match_reference(op, seed: int) -> None:
    x, a, bt, slots = _random_case(tokens=37, slots=6, rank=8, seed=seed)
    expected = lora_reference(x, a, bt, slots)
    bound = _rounding_bound(x, a, bt, slots, torch.float32)
    assert _excess(op(x, a, bt, slots), expected, bound) <= 0
    assert _excess(op(x, a, bt * (1 + 1e-3), slots), expected, bound) > 0  # a scale off by 0.1% fails


def test_ops_in_bf16_stay_close_to_fp32_reference() -> None:
    x, a, bt, slots = _random_case(tokens=16, slots=4, rank=16, seed=7)
    expected = lora_reference(x, a, bt, slots)
    bound = _rounding_bound(x, a, bt, slots, torch.bfloat16)
    for op in (lora_bgmv, lora_sgmv, lora_grouped):
        assert _excess(op(x.bfloat16(), a.bfloat16(), bt.bfloat16(), slots), expected, bound) <= 0
        assert _excess(op(x.bfloat16(), a.bfloat16(), (bt * 0.9).bfloat16(), slots), expected, bound) > 0


def test_rank_truncation_is_exact_with_zero_padding() -> None:
    x, a, bt, slots = _random_case(tokens=20, slots=3, rank=16, seed=3)
    a[:, 4:] = 0
    bt[:, 4:] = 0
    full = lora_reference(x, a, bt, slots)
    bound = _rounding_bound(x, a, bt, slots, torch.float32)
    for op in (lora_bgmv, lora_sgmv, lora_grouped):
        assert _excess(op(x, a, bt, slots, 4), full, bound) <= 0


def test_tokens_without_adapter_get_no_delta() -> None:
    x, a, bt, _ = _random_case(tokens=5, slots=2, rank=4, seed=0)
    slots = torch.full((5,), -1)
    for op in (lora_reference, lora_bgmv, lora_sgmv, lora_grouped):
        assert torch.count_nonzero(op(x, a, bt, slots)) == 0


def test_segments_and_op_choice() -> None:
    assert segments([0, 0, -1, 2, 2, 2, 0]) == [(0, 2, 0), (3, 6, 2), (6, 7, 0)]
    assert segments([-1, -1]) == []
    assert choose_op("auto", 8, 0, 0) is None
    assert choose_op("auto", 8, 8, 8) is GROUPED  # decode over a compact slot range
    assert choose_op("auto", 8, 8, 64) is GATHER  # decode over scattered slots
    assert choose_op("auto", 400, 2, 1200) is SEGMENTED  # prefill: long runs
    for name, op in OPS.items():
        assert choose_op(name, 400, 2, 400) is op and op.name == name


def test_group_layout_places_each_token_in_its_slot_row() -> None:
    assert group_layout([-1, -1]) is None
    first, count, per_slot, cells = group_layout([3, 5, -1, 3, 4])
    assert (first, count, per_slot) == (3, 3, 2)
    assert cells == [0, 4, -1, 1, 2]


@pytest.mark.parametrize(
    "slot_list", [[0, 0, 1, 1, 2, 2], [1, 2, 3], [2, 2, 2, 2], [0, 0, 1], [-1, 0, 1], [3, 1, 1, 0]]
)
def test_lora_layer_matches_reference_in_every_mode(slot_list: list[int]) -> None:
    from loraswap.server.lora.context import LoraContext
    from loraswap.server.lora.layer import BatchedLoraLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(48, 80, bias=True)
    context = LoraContext(max_rank=8)  # ranks 4..8 run all 8 rows (zero padding), rank 2 slices
    layer = BatchedLoraLinear(base, num_slots=4, max_rank=8, context=context, dtype=torch.float32)
    ranks = {0: 8, 1: 4, 2: 6, 3: 2}
    for slot, rank in ranks.items():
        layer.set_slot(slot, torch.randn(rank, 48), torch.randn(rank, 80))
    x = torch.randn(len(slot_list), 48)
    context.set_batch(slot_list, ranks, torch.device("cpu"), "reference")
    expected = layer(x)
    for mode in ("auto", "grouped", "bgmv", "sgmv"):
        context.set_batch(slot_list, ranks, torch.device("cpu"), mode)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
    context.set_batch(slot_list, ranks, torch.device("cpu"), "auto")
    assert context.in_place == (slot_list in ([0, 0, 1, 1, 2, 2], [1, 2, 3], [2, 2, 2, 2]))
    needed = max(ranks[s] for s in slot_list if s >= 0)
    assert context.rank == (8 if 2 * needed >= 8 else needed)


def test_a_low_rank_batch_slices_the_rank_and_still_matches_the_reference() -> None:
    from loraswap.server.lora.context import LoraContext
    from loraswap.server.lora.layer import BatchedLoraLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(48, 80)
    context = LoraContext(max_rank=16)
    layer = BatchedLoraLinear(base, num_slots=3, max_rank=16, context=context, dtype=torch.float32)
    ranks = {0: 2, 1: 3, 2: 16}
    for slot, rank in ranks.items():
        layer.set_slot(slot, torch.randn(rank, 48), torch.randn(rank, 80))
    x = torch.randn(4, 48)
    context.set_batch([0, 0, 1, 1], ranks, torch.device("cpu"), "reference")
    expected = layer(x)
    context.set_batch([0, 0, 1, 1], ranks, torch.device("cpu"), "auto")
    assert context.rank == 3 and context.in_place
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    context.set_batch([0, 2], ranks, torch.device("cpu"), "auto")
    assert context.rank == 16


def test_reloading_a_slot_with_a_lower_rank_or_nothing_leaves_no_stale_rows() -> None:
    from loraswap.server.lora.context import LoraContext
    from loraswap.server.lora.layer import BatchedLoraLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(48, 80, bias=False)
    context = LoraContext()
    layer = BatchedLoraLinear(base, num_slots=2, max_rank=8, context=context, dtype=torch.float32)
    x = torch.randn(3, 48)
    layer.set_slot(1, torch.randn(8, 48), torch.randn(8, 80))
    a, bt = torch.randn(2, 48), torch.randn(2, 80)
    layer.set_slot(1, a, bt)  # rank 8 -> rank 2: rows 2..7 must be zero again
    assert layer.filled == {1: 2}
    assert not layer.a[1, 2:].any() and not layer.bt[1, 2:].any()
    context.set_batch([1, 1, 1], {1: 8}, torch.device("cpu"), "auto")  # rank 8 on purpose: padding is read
    torch.testing.assert_close(layer(x), base(x) + (x @ a.T) @ bt, rtol=1e-5, atol=1e-5)
    layer.set_slot(1, None, None)
    assert layer.filled == {} and not layer.a.any() and not layer.bt.any()


def test_a_layer_no_adapter_of_the_batch_targets_returns_the_base_output() -> None:
    from loraswap.server.lora.context import LoraContext
    from loraswap.server.lora.layer import BatchedLoraLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(48, 80)
    context = LoraContext()
    layer = BatchedLoraLinear(base, num_slots=3, max_rank=4, context=context, dtype=torch.float32)
    layer.set_slot(0, torch.randn(4, 48), torch.randn(4, 80))
    x = torch.randn(2, 48)
    context.set_batch([1, 2], {1: 4, 2: 4}, torch.device("cpu"), "auto")  # slots 1, 2 leave it alone
    assert context.op is not None
    torch.testing.assert_close(layer(x), base(x))
    context.set_batch([0, 2], {0: 4, 2: 4}, torch.device("cpu"), "auto")
    assert not torch.allclose(layer(x), base(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fill_with_a_scaling_equals_a_fill_of_the_scaled_matrix(dtype) -> None:
    """The slot scales its own copy of B^T (the host copy stays unscaled), on the numpy-bits path
    (same dtype) and the torch path (the host copy in another dtype)."""
    from loraswap.server.lora.context import LoraContext
    from loraswap.server.lora.layer import BatchedLoraLinear, fill_slot

    base = torch.nn.Linear(48, 80, bias=False)
    layers = [BatchedLoraLinear(base, 3, 8, LoraContext(), dtype=dtype) for _ in range(2)]
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 48, generator=gen), torch.randn(80, 6, generator=gen)
    for source in (dtype, torch.float64):  # float64: another dtype, so fill_slot copies with torch
        bt = b.to(source).T  # a transposed view, as the host tier holds it
        original = bt.clone()
        fill_slot(2, [(layers[0], a.to(source), bt, 0.25), (layers[1], a.to(source), bt * 0.25, 1.0)])
        assert torch.equal(layers[0].a, layers[1].a) and torch.equal(layers[0].bt, layers[1].bt)
        assert torch.equal(layers[0].bt[2, :6], (bt.to(dtype) * 0.25).to(dtype))
        assert torch.equal(bt, original)  # the source itself was left alone


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float32])  # mapped views / packed copies
def test_staged_sources_are_views_of_one_transferred_copy(tmp_path, file_dtype) -> None:
    """The host -> accelerator fill moves an adapter's one host storage at once and views the copy the
    way the host tensors view the original (checked on CPU with a clone standing in for the transfer)."""
    from safetensors.torch import save_file

    from loraswap.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_key
    from loraswap.server.adapters.reader import AdapterReader, BaseShape
    from loraswap.server.lora.layer import staged

    modules = {"model.layers.0.mlp.up_proj": (16, 24), "model.layers.0.mlp.down_proj": (24, 16)}
    tensors = {}
    for i, (module, (in_f, out_f)) in enumerate(modules.items()):
        tensors[lora_key(module, "A")] = torch.randn(4 + i, in_f).to(file_dtype)
        tensors[lora_key(module, "B")] = torch.randn(out_f, 4 + i).to(file_dtype)
    save_file(tensors, str(tmp_path / ADAPTER_WEIGHTS))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"down_proj": 5}}
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, "target_modules": ["up_proj", "down_proj"]}))
    host = AdapterReader(BaseShape(modules, 8, "x"), torch.bfloat16).read(tmp_path, "a", "sha256:a")
    sources = [t for pair in host.modules.values() for t in pair]
    transfers = []
    views = staged(sources, lambda whole: transfers.append(whole) or whole.clone())
    assert len(transfers) == 1 and transfers[0].numel() == sources[0].untyped_storage().nbytes()
    for view, source in zip(views, sources, strict=True):
        assert view.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()
        assert view.dtype == source.dtype and torch.equal(view, source)
    assert staged([torch.zeros(3), torch.zeros(3)], lambda whole: whole) is None  # two storages

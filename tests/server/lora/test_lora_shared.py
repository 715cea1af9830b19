"""One LoRA shrink for the projections of one input (SharedShrink) against each projection alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraswap.server.lora.context import LoraContext
from loraswap.server.lora.layer import BatchedLoraLinear, SharedShrink, fill_slot, shareable

CPU = torch.device("cpu")
IN, OUTS, SLOTS, MAX_RANK = 48, (64, 32, 40), 4, 8
RANKS = {0: 8, 1: 4, 2: 6, 3: 2}  # slot -> rank; rank 2 alone slices the rows, the others read all 8
UNTARGETED = {(1, 2), (3, 0), (3, 2)}  # (slot, projection): that slot's adapter leaves it alone


def group(dtype: torch.dtype, seed: int = 0) -> tuple[list[BatchedLoraLinear], LoraContext]:
    """Three LoRA layers over one input, their slots filled through fill_slot (some left empty)."""
    gen = torch.Generator().manual_seed(seed)
    context = LoraContext(max_rank=MAX_RANK)
    layers = []
    for out in OUTS:
        base = nn.Linear(IN, out, bias=False).to(dtype)
        layers.append(BatchedLoraLinear(base, SLOTS, MAX_RANK, context, dtype))
    for slot, rank in RANKS.items():
        parts = []
        for i, layer in enumerate(layers):
            a = torch.randn(rank, IN, generator=gen).to(dtype)
            bt = torch.randn(rank, OUTS[i], generator=gen).to(dtype)
            parts.append((layer, None, None, 1.0) if (slot, i) in UNTARGETED else (layer, a, bt, 0.5))
        fill_slot(slot, parts)
    return layers, context


def rounding_bound(layers: list[BatchedLoraLinear], x: torch.Tensor, slots: list[int]) -> list[torch.Tensor]:
    """Per projection and element, how far two orders of the same sums may be apart: each is within
    gamma_(in + rank) * S of the exact value (S the sum of |terms|; Higham 3.1), and an op in a narrower
    dtype also rounds its rank-sized intermediate and its output once each."""
    n = IN + MAX_RANK
    u = torch.finfo(x.dtype).eps / 2
    u32 = torch.finfo(torch.float32).eps / 2
    relative = 2 * (n * u32 / (1 - n * u32)) + (4 * u if x.dtype != torch.float32 else 0)
    out = []
    for layer in layers:
        a, bt = layer.a.double().abs(), layer.bt.double().abs()
        s = torch.stack([bt[i].T @ (a[i] @ x[t].double().abs()) if i >= 0 else bt.new_zeros(bt.shape[2])
                         for t, i in enumerate(slots)])  # fmt: skip
        out.append(relative * s.float())
    return out


BATCHES = {
    "grid": [0, 0, 1, 1, 2, 2],  # sorted, the same count per slot: the grouped op runs in place
    "dense": [1, 2, 3],
    "holes": [-1, 0, 0, 2, -1],
    "sparse": [3, 0, 0, 1],
    "one-slot": [2, 2, 2],
    "low-rank": [3, 3],  # rank 2: the rows sliced; slot 3 targets projection 1 only (the fallback)
    "none": [-1, -1],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_shared_shrink_matches_each_projection_alone(dtype: torch.dtype, batch: str) -> None:
    slots = BATCHES[batch]
    layers, context = group(dtype)
    before = [(layer.a.clone(), dict(layer.filled)) for layer in layers]
    shared = SharedShrink(layers)
    for layer, (a, filled) in zip(layers, before, strict=True):  # contents kept, one buffer under all
        assert torch.equal(layer.a, a) and layer.filled == filled
        assert layer.a.untyped_storage().data_ptr() == shared.a.untyped_storage().data_ptr()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(slots), IN, generator=gen).to(dtype)
    ys = [torch.randn(len(slots), out, generator=gen).to(dtype) for out in OUTS]
    bounds = rounding_bound(layers, x, slots)
    for mode in ("auto", "grouped", "bgmv", "sgmv", "reference"):
        context.set_batch(slots, RANKS, CPU, mode)
        alone = [layer.add_delta(y.clone(), x) for layer, y in zip(layers, ys, strict=True)]
        inputs = [y.clone() for y in ys]
        together = shared.add_deltas(inputs, x)
        for i, (got, want, bound) in enumerate(zip(together, alone, bounds, strict=True)):
            assert got.shape == want.shape and got.dtype == want.dtype
            assert ((got.float() - want.float()).abs() <= bound + torch.finfo(dtype).eps * want.abs()).all()
            if context.used.isdisjoint(layers[i].filled):  # no adapter of the batch targets it
                assert got is inputs[i] and torch.equal(got, ys[i])


def test_slot_fills_after_sharing_land_in_the_shared_buffer() -> None:
    layers, context = group(torch.float32)
    shared = SharedShrink(layers)
    a, bt = torch.randn(5, IN), torch.randn(5, OUTS[1])
    fill_slot(1, [(layers[1], a, bt, 1.0), (layers[2], None, None, 1.0)])  # numpy views of the bits
    assert torch.equal(shared.a[1, :5, 1], a) and not shared.a[1, 5:, 1].any() and not shared.a[1, :, 2].any()
    layers[0].set_slot(2, a, torch.randn(5, OUTS[0]))
    assert torch.equal(shared.a[2, :5, 0], a) and not shared.a[2, 5:, 0].any()
    context.set_batch([1, 2], {**RANKS, 1: 5, 2: 5}, CPU, "grouped")
    x = torch.randn(2, IN)
    ys = [torch.zeros(2, out) for out in OUTS]
    got = shared.add_deltas([y.clone() for y in ys], x)
    want = [layer.add_delta(y.clone(), x) for layer, y in zip(layers, ys, strict=True)]
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-5) for g, w in zip(got, want, strict=True))
    assert torch.allclose(got[1][0], bt.T @ (a @ x[0]), rtol=1e-5, atol=1e-4)


def test_only_matching_lora_layers_share() -> None:
    layers, _ = group(torch.float32)
    other, _ = group(torch.float32)
    assert shareable(layers) and not shareable(layers[:1]) and not shareable([layers[0], other[1]])
    assert not shareable([layers[0], nn.Linear(IN, 8)])
    with pytest.raises(ValueError, match="do not share"):
        SharedShrink([layers[0], other[1]])

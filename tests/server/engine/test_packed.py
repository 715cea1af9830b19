"""Prepacked (oneDNN) weights against ``F.linear`` on the plain ones: the layer, the model, the engine."""

from __future__ import annotations

import gc
import math
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from loraswap.models import resolve_base
from loraswap.registry import open_registry
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.base_loader import load_base
from loraswap.server.engine.forward import PackedForward, SeqChunk, chunk_order
from loraswap.server.engine.fused import FusedSlice
from loraswap.server.engine.kv_cache import KVCache
from loraswap.server.engine.packed import PackedLinear, packed_linear, packing_supported, reference_linear
from loraswap.server.lora.context import LoraContext
from loraswap.server.lora.layer import install_lora_layers

CPU = torch.device("cpu")
DTYPES = [
    pytest.param(
        dtype,
        marks=pytest.mark.skipif(
            not packing_supported(dtype, CPU), reason=f"oneDNN cannot pack {dtype} weights on this CPU"
        ),
    )
    for dtype in (torch.bfloat16, torch.float32)
]
PROMPTS = ("The quick brown fox", "Once upon a time", "In the beginning", "Hello")


def within_rounding(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Two matmuls of the same operands that may sum in another order (fp32 accumulation, at most
    ``in`` terms) and each round once to the output dtype."""
    bound = x.abs().float() @ weight.abs().float().T  # [.., out]: the sum of |terms|
    accumulate = weight.shape[1] * torch.finfo(torch.float32).eps * bound
    rounding = torch.finfo(got.dtype).eps * want.abs().float()
    return bool(((got.float() - want.float()).abs() <= accumulate + rounding).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_f_linear_for_any_leading_shape(dtype: torch.dtype, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 80, generator=gen).to(dtype)
    bias = torch.randn(96, generator=gen).to(dtype) if with_bias else None
    layer = PackedLinear(weight, bias, batch_hint=8)
    assert layer.packed.is_mkldnn and (layer.in_features, layer.out_features) == (80, 96)
    for shape in ((1, 80), (5, 80), (37, 80), (2, 3, 80), (0, 80)):
        x = torch.randn(*shape, generator=gen).to(dtype)
        got, want = layer(x), reference_linear(x, weight, bias)
        assert got.shape == want.shape and got.dtype == dtype
        assert within_rounding(got, want, x, weight)
    x = torch.randn(80, 6, generator=gen).to(dtype).T  # not contiguous
    assert within_rounding(
        packed_linear(x, layer.packed, layer.bias), reference_linear(x, weight, bias), x, weight
    )
    copy = layer.weight  # a dense copy, exact; writing to it leaves the layer alone
    assert not copy.is_mkldnn and torch.equal(copy, weight)
    copy.zero_()
    assert torch.equal(layer.weight, weight)


def test_packed_linear_refuses_what_it_cannot_pack() -> None:
    weight = torch.randn(8, 4)
    with pytest.raises(ValueError, match="bias does not fit"):
        PackedLinear(weight, torch.randn(4))
    with pytest.raises(ValueError, match="bias does not fit"):
        PackedLinear(weight, torch.randn(8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"cannot pack a torch\.float64"):
        PackedLinear(weight.double())

    class Quantized(nn.Linear):  # a bitsandbytes layer is a subclass with its own storage
        pass

    with pytest.raises(ValueError, match="cannot pack Quantized"):
        PackedLinear.replacing(Quantized(4, 8), batch_hint=1)
    assert not packing_supported(torch.float16, torch.device("meta"))


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def wrapped_base(tiny_base: Path) -> tuple[nn.Module, LoraContext]:
    """The tiny base in bf16 with its projections LoRA-wrapped (2 slots of rank 8), as the engine has it."""
    model = load_base(resolve_base(tiny_base), "bf16", CPU).model
    context, _ = install_lora_layers(model, 2, 8, torch.bfloat16)
    return model, context


def packed_forward(model: nn.Module, context: LoraContext, fuse: bool) -> PackedForward:
    """The engine's forward over ``model``, weights packed."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv = KVCache(config.num_hidden_layers, 4, 32, config.num_key_value_heads, head_dim, torch.bfloat16, CPU)
    return PackedForward(model, kv, context, {}, "auto", fuse_projections=fuse, pack_weights=True)


BF16 = pytest.mark.skipif(not packing_supported(torch.bfloat16, CPU), reason="oneDNN cannot pack bf16 here")


@BF16
@pytest.mark.parametrize("fuse", [True, False])
def test_packing_leaves_one_copy_of_each_weight(tiny_base: Path, fuse: bool) -> None:
    model, context = wrapped_base(tiny_base)
    plain = {name: m.weight for name, m in model.named_modules() if type(m) is nn.Linear}
    dense = {name.removesuffix(".base"): w.clone() for name, w in plain.items()}
    alive = [weakref.ref(w) for w in plain.values()]
    before = model_bytes(model)  # the LoRA slot buffers count on both sides
    del plain
    forward = packed_forward(model, context, fuse)
    gc.collect()
    assert [ref for ref in alive if ref() is not None] == []  # every plain weight freed
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == []
    assert model_bytes(model) == before  # the packed weights replace the plain ones, once each

    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.o_proj.base, PackedLinear) and isinstance(mlp.down_proj.base, PackedLinear)
    assert isinstance(model.lm_head, PackedLinear)
    x = torch.randn(3, model.config.hidden_size, dtype=torch.bfloat16)
    for parent, name in ((attn, "q_proj"), (attn, "v_proj"), (attn, "o_proj"), (mlp, "up_proj")):
        base = getattr(parent, name).base
        assert isinstance(base, FusedSlice if fuse and name != "o_proj" else PackedLinear)
        if isinstance(base, FusedSlice):
            assert list(base.parameters()) == [] and list(base.buffers()) == []  # holds no weight
        weight = dense[f"model.layers.0.{'self_attn' if parent is attn else 'mlp'}.{name}"]
        assert (base.in_features, base.out_features) == (weight.shape[1], weight.shape[0])
        assert torch.equal(base.weight, weight)  # a dense copy of the projection's rows
        assert within_rounding(base(x), reference_linear(x, weight), x, weight)
    if fuse:
        qkv, gate_up = forward.fused[0]
        assert qkv.weight is None and qkv.linear is attn.qkv_proj and gate_up.linear is mlp.gate_up_proj


@BF16
def test_a_tied_lm_head_is_packed_beside_the_embedding(tiny_base: Path) -> None:
    model, context = wrapped_base(tiny_base)
    embedding = model.model.embed_tokens.weight
    model.lm_head.weight = embedding  # tied, as SmolLM2's is (the parameters count it once)
    before = model_bytes(model)
    packed_forward(model, context, fuse=True)
    assert isinstance(model.lm_head, PackedLinear) and model.model.embed_tokens.weight is embedding
    assert torch.equal(model.lm_head.weight, embedding)
    assert model_bytes(model) == before + embedding.numel() * embedding.element_size()  # one extra copy


def engines(tiny_base: Path, root: Path, quantization: str, fuse: bool) -> dict[bool, Engine]:
    config = dict(base=str(tiny_base), registry=str(root), quantization=quantization, adapter_slots=3,
                  max_rank=8, max_batch_size=4, max_seq_len=96, fuse_projections=fuse)  # fmt: skip
    return {pack: Engine(EngineConfig(**config, pack_weights=pack)) for pack in (True, False)}


def greedy_batch(
    engine: Engine, adapters: tuple[str, ...], steps: int
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens of :data:`PROMPTS` decoded together, one adapter each ("" for the base), through
    the engine's forward: one prefill step, then decode steps; and the prefill step's logits.

    The steps are run here rather than by the step loop, whose batches depend on when each request's
    adapter resolves: bf16 logits often tie, and another batch may break a tie another way.
    """
    slots = {
        name: engine.adapters.slots.slot_of(engine.load_adapter(name, "device").digest)
        for name in adapters
        if name
    }
    with engine.step_lock:
        rows = [engine.kv.allocate() for _ in PROMPTS]
        chunks = [
            SeqChunk(row, engine.tokenizer(prompt)["input_ids"], 0, slots.get(adapter, -1), want_logits=True)
            for row, prompt, adapter in zip(rows, PROMPTS, adapters, strict=True)
        ]
        chunks.sort(key=chunk_order)  # the forward's order, which its logits follow
        tokens: list[list[int]] = [[] for _ in chunks]
        first = None
        for _ in range(steps):
            logits = engine.forward(chunks)
            first = logits if first is None else first
            for seq, token in zip(tokens, logits.argmax(dim=-1).tolist(), strict=True):
                seq.append(token)
            chunks = [
                SeqChunk(c.row, [t[-1]], c.start_pos + len(c.token_ids), c.slot, True)
                for c, t in zip(chunks, tokens, strict=True)
            ]
        for row in rows:
            engine.kv.release(row)
    return tokens, first


@pytest.mark.parametrize(
    ("quantization", "dtype", "fuse"),
    [
        pytest.param("bf16", torch.bfloat16, True, marks=DTYPES[0].marks, id="bf16-fused"),
        pytest.param("fp32", torch.float32, False, marks=DTYPES[1].marks, id="fp32-one-by-one"),
    ],
)
def test_packed_engine_gives_the_reference_tokens_with_adapters_mixed(
    tiny_base: Path, make_adapter, tmp_path: Path, quantization: str, dtype: torch.dtype, fuse: bool
) -> None:
    root = tmp_path / "registry"
    registry, base = open_registry(root), resolve_base(tiny_base)
    registry.push(make_adapter(r=4, target_modules=("q_proj", "v_proj", "up_proj"), seed=81), "a", base=base)
    registry.push(
        make_adapter(r=8, target_modules=("k_proj", "o_proj", "down_proj"), seed=82), "b", base=base
    )
    by_pack = engines(tiny_base, root, quantization, fuse)
    packed = by_pack[True].loaded.model
    assert isinstance(packed.model.layers[0].self_attn.o_proj.base, PackedLinear)
    assert not any(isinstance(m, PackedLinear) for m in by_pack[False].loaded.model.modules())

    # A mixed batch: two adapters on different projections, and the base.
    runs = {pack: greedy_batch(engine, ("a", "b", "", "a"), 16) for pack, engine in by_pack.items()}
    assert runs[True][0] == runs[False][0]

    # The same products summed in another order, each matmul rounded once to the model's dtype: for
    # bf16 within a random walk of roundings over the longest reduction, for fp32 within its sum's bound.
    logits = {pack: run[1] for pack, run in runs.items()}
    reduction = packed.config.intermediate_size
    eps = torch.finfo(dtype).eps
    scale = math.sqrt(reduction) if dtype == torch.bfloat16 else 64 * reduction
    tolerance = scale * eps * logits[False].abs().max()
    assert torch.allclose(logits[True], logits[False], rtol=0, atol=tolerance)

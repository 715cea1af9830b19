"""fp16w: fbgemm's fp16-weight matmul against ``F.linear`` on the rounded weights (the op, the layer), and
the engine on fp16 weights against PEFT on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from loraswap.errors import InvalidArgumentError
from loraswap.models import resolve_base
from loraswap.registry import open_registry
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.api import GenerationRequest
from loraswap.server.engine.base_loader import choose_precision
from loraswap.server.engine.forward import SeqChunk
from loraswap.server.engine.packed import PackedLinear
from loraswap.server.engine.weight_only import (
    HalfWeightLinear,
    half_linear,
    half_weights_supported,
    pack_half,
    reference_linear,
    replace_linears,
)
from loraswap.server.lora.layer import BatchedLoraLinear

pytestmark = pytest.mark.skipif(
    not half_weights_supported(), reason="fbgemm's fp16 matmul does not run on this CPU or torch build"
)
CPU = torch.device("cpu")
PROMPTS = ("The quick brown fox", "Once upon a time")


def within_rounding(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Two fp32 matmuls of the same operands that may sum in another order: at most ``in`` terms, each
    partial sum rounded once in fp32, so the difference is under ``in * eps * sum |terms|``."""
    bound = x.abs() @ weight.abs().T  # [.., out]: the sum of |terms|
    eps = torch.finfo(torch.float32).eps
    return bool(((got - want).abs() <= weight.shape[1] * eps * bound + eps * want.abs()).all())


@pytest.mark.parametrize("with_bias", [False, True])
def test_half_linear_matches_f_linear_on_the_rounded_weight(with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(96, 80, generator=gen)
    bias = torch.randn(96, generator=gen) if with_bias else None
    packed = pack_half(weight, bias)
    rounded = weight.half().float()
    for shape in ((1, 80), (5, 80), (37, 80), (2, 3, 80), (0, 80)):
        x = torch.randn(*shape, generator=gen)
        got, want = half_linear(x, packed), reference_linear(x, weight, bias)
        assert got.shape == want.shape and got.dtype == torch.float32
        offset = 0 if bias is None else bias
        assert within_rounding(got - offset, want - offset, x, rounded)
    x = torch.randn(80, 6, generator=gen).T  # not contiguous
    assert within_rounding(half_linear(x, pack_half(weight)), reference_linear(x, weight), x, rounded)


def test_layer_holds_the_fp16_weight_and_nothing_else() -> None:
    gen = torch.Generator().manual_seed(6)
    # bf16 weights of fp16's normal range (above 2**-14; bf16 values from 2**-17 fit too) convert exactly
    magnitude = torch.exp2(torch.empty(64, 48).uniform_(-14, 4, generator=gen))
    weight = (magnitude * torch.randn(64, 48, generator=gen).sign()).bfloat16()
    layer = HalfWeightLinear(weight)
    assert torch.equal(layer.weight, weight.float()) and layer.bias is None
    assert (layer.in_features, layer.out_features) == (48, 64)
    assert layer.weight_bytes() == 2 * 64 * 48
    assert list(layer.parameters()) == [] and list(layer.buffers()) == []
    copy = layer.weight
    copy.zero_()  # a copy: the layer is unchanged
    assert torch.equal(layer.weight, weight.float())
    biased = HalfWeightLinear(weight, torch.ones(64))
    assert torch.equal(biased.bias, torch.ones(64)) and biased.weight_bytes() == 2 * 64 * 48 + 4 * 64
    with pytest.raises(ValueError, match="does not fit"):
        HalfWeightLinear(weight, torch.ones(48))
    with pytest.raises(ValueError, match="2-d float"):
        HalfWeightLinear(torch.ones(4, 4, dtype=torch.int32))


def test_replace_linears_takes_plain_linears_only() -> None:
    class Quantized(nn.Linear):  # a bitsandbytes layer is a subclass with its own storage
        pass

    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), Quantized(4, 4), nn.Sequential(nn.Linear(4, 2)))
    weights = {
        name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    assert replace_linears(model) == ["0", "3.0"]
    assert isinstance(model[0], HalfWeightLinear) and isinstance(model[3][0], HalfWeightLinear)
    assert type(model[2]) is Quantized
    assert torch.equal(model[0].weight, weights["0"].half().float())
    x = torch.randn(3, 8)
    assert model(x).shape == (3, 2)


def test_fp16w_computes_in_fp32_on_cpu_and_is_refused_elsewhere() -> None:
    quantization, precision = choose_precision("fp16w", CPU)
    assert quantization == "fp16w" and precision.dtype == torch.float32
    assert precision.reason.startswith("fp16 weights, fp32 matmuls; ")
    with pytest.raises(InvalidArgumentError, match="runs on CPU only"):
        choose_precision("fp16w", torch.device("cuda"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, make_adapter):
    registry = open_registry(tmp_path_factory.mktemp("registry"))
    base = resolve_base(tiny_base)
    everything = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    folders = {
        "all": make_adapter(r=8, target_modules=everything, seed=41),
        "qv": make_adapter(r=4, target_modules=("q_proj", "v_proj"), seed=42),
    }
    for name, folder in folders.items():
        registry.push(folder, name, base=base)
    return registry, folders


@pytest.fixture(scope="module")
def engine(tiny_base: Path, registry):
    config = EngineConfig(
        base=str(tiny_base),
        quantization="fp16w",
        adapter_slots=4,
        max_rank=8,
        max_batch_size=8,
        max_seq_len=64,
    )
    engine = Engine(config, registry=registry[0])
    engine.start()
    yield engine
    engine.stop(drain_timeout=5)


def oracle(tiny_base: Path, engine: Engine, adapter: Path | None) -> nn.Module:
    """PEFT on an fp32 model holding the engine's fp16 weights (as fp32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    for name, module in engine.loaded.model.named_modules():
        if isinstance(module, HalfWeightLinear):
            target = model.get_submodule(name.removesuffix(".base"))
            target.weight = nn.Parameter(module.weight, requires_grad=False)
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


def test_every_linear_is_fp16_neither_fused_nor_packed_and_lora_wraps_it(engine: Engine) -> None:
    model = engine.loaded.model
    assert engine.loaded.quantization == "fp16w" and engine.loaded.compute_dtype == torch.float32
    assert isinstance(model.lm_head, HalfWeightLinear)
    assert not any(type(m) in (nn.Linear, PackedLinear) for m in model.modules())
    wrapped = [m for m in model.modules() if isinstance(m, BatchedLoraLinear)]
    assert len(wrapped) == 7 * len(model.model.layers)
    assert all(isinstance(m.base, HalfWeightLinear) for m in wrapped)
    assert all(pair == (None, None) for pair in engine.forward.fused)


def test_greedy_tokens_and_logits_match_peft_on_the_same_weights(
    engine: Engine, registry, tiny_base: Path, greedy
) -> None:
    _, folders = registry
    names = ["", *folders]
    requests = [GenerationRequest(adapter=n, prompt=p, sampling=greedy(8)) for n in names for p in PROMPTS]
    results = [h.result(timeout=120) for h in [engine.submit(r) for r in requests]]
    for name in names:
        model = oracle(tiny_base, engine, folders.get(name))
        for prompt in PROMPTS:
            ids = engine.tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                expected = model.generate(
                    ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
                )
                logits = model(ids).logits[0, -1]
            got = results[requests.index(GenerationRequest(adapter=name, prompt=prompt, sampling=greedy(8)))]
            assert list(got.token_ids) == expected[0, ids.shape[1] :].tolist(), (name, prompt)
            slot = (
                -1 if not name else engine.adapters.slots.slot_of(engine.load_adapter(name, "device").digest)
            )
            with engine.step_lock:
                row = engine.kv.allocate()
                mine = engine.forward([SeqChunk(row, ids[0].tolist(), 0, slot, True)])[0]
                engine.kv.release(row)
            torch.testing.assert_close(mine, logits, rtol=1e-4, atol=1e-4)

"""The CUDA path: a bitsandbytes NF4 / int8 base (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraswap.models import resolve_base
from loraswap.registry.registry import open_registry
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.api import GenerationRequest, SamplingParams
from loraswap.server.engine.forward import SeqChunk

pytestmark = pytest.mark.gpu
PROMPT = "The quick brown fox"


@pytest.fixture
def gpu_registry(tmp_path: Path, tiny_base: Path, make_adapter):
    registry = open_registry(tmp_path / "registry")
    for i, targets in enumerate((("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj"))):
        registry.push(
            make_adapter(r=8, target_modules=targets, seed=40 + i), f"g{i}", base=resolve_base(tiny_base)
        )
    return registry


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_cuda_base_unchanged_after_200_loads(
    tiny_base: Path, gpu_registry, quantization: str
) -> None:
    engine = Engine(
        EngineConfig(base=str(tiny_base), quantization=quantization, adapter_slots=1, max_seq_len=64),
        registry=gpu_registry,
    )
    engine.start()
    try:
        assert engine.device.type == "cuda"
        ids = engine.tokenizer(PROMPT)["input_ids"]
        with engine.step_lock:
            row = engine.kv.allocate()
            before = engine.forward([SeqChunk(row, ids, 0, -1, True)])
        for i in range(200):
            engine.load_adapter(f"g{i % 2}", "device")
        with engine.step_lock:
            after = engine.forward([SeqChunk(row, ids, 0, -1, True)])
        assert torch.equal(before, after)
    finally:
        engine.stop(drain_timeout=5)


def test_nf4_engine_matches_peft_on_the_same_nf4_base(tiny_base: Path, gpu_registry, make_adapter) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraswap.models.quantization import bnb_config

    engine = Engine(
        EngineConfig(base=str(tiny_base), quantization="nf4", max_seq_len=64), registry=gpu_registry
    )
    engine.start()
    try:
        got = engine.generate(
            GenerationRequest(adapter="g0", prompt=PROMPT, sampling=SamplingParams(max_new_tokens=8))
        )
        ids = engine.tokenizer(PROMPT, return_tensors="pt")["input_ids"].cuda()
        base = AutoModelForCausalLM.from_pretrained(
            tiny_base, dtype=torch.bfloat16, quantization_config=bnb_config("nf4"), device_map={"": "cuda"}
        )
        oracle = PeftModel.from_pretrained(
            base, make_adapter(r=8, target_modules=("q_proj", "v_proj"), seed=40)
        )
        with torch.no_grad():
            expected = oracle(ids).logits[0, -1].float()
        row = engine.kv.allocate()
        slot = engine.adapters.slots.slot_of(got.adapter_digest)
        with engine.step_lock:
            logits = engine.forward([SeqChunk(row, ids[0].tolist(), 0, slot, True)])[0]
        torch.testing.assert_close(logits, expected, rtol=5e-2, atol=5e-2)
    finally:
        engine.stop(drain_timeout=5)

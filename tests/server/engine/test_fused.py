"""Fused q/k/v and gate/up projections against the one-by-one reference path, with adapters mixed."""

from __future__ import annotations

from pathlib import Path

import torch

from loraswap.models import resolve_base
from loraswap.registry import open_registry
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.api import GenerationRequest, SamplingParams
from loraswap.server.engine.forward import SeqChunk

PROMPTS = ("The quick brown fox", "Once upon a time", "In the beginning", "Hello")


def engines(tiny_base: Path, root: Path) -> dict[bool, Engine]:
    """Fused and one-by-one engines over plain weights (each projection's weight a view of the fused one;
    packed weights are test_packed.py's)."""
    config = dict(base=str(tiny_base), registry=str(root), quantization="fp32", adapter_slots=3, max_rank=8,
                  max_batch_size=4, max_seq_len=96, pack_weights=False)  # fmt: skip
    return {fuse: Engine(EngineConfig(**config, fuse_projections=fuse)) for fuse in (True, False)}


def test_fused_projections_give_the_reference_tokens_and_share_the_weights(
    tiny_base: Path, make_adapter, tmp_path: Path
) -> None:
    root = tmp_path / "registry"
    registry, base = open_registry(root), resolve_base(tiny_base)
    registry.push(make_adapter(r=4, target_modules=("q_proj", "v_proj", "up_proj"), seed=81), "a", base=base)
    registry.push(
        make_adapter(r=8, target_modules=("k_proj", "gate_proj", "down_proj"), seed=82), "b", base=base
    )
    by_fuse = engines(tiny_base, root)
    fused, plain = by_fuse[True], by_fuse[False]
    layer = fused.loaded.model.model.layers[0]
    (qkv, gate_up) = fused.forward.fused[0]
    assert qkv is not None and gate_up is not None and plain.forward.fused[0] == (None, None)
    q_weight = layer.self_attn.q_proj.base.weight
    assert q_weight.untyped_storage().data_ptr() == qkv.weight.untyped_storage().data_ptr()  # a view

    sampling = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    tokens = {}
    for fuse, engine in by_fuse.items():
        engine.start()
        handles = [
            engine.submit(GenerationRequest(adapter=adapter, prompt=prompt, sampling=sampling))
            for adapter, prompt in zip(("a", "b", "", "a"), PROMPTS, strict=True)
        ]  # a mixed batch: two adapters on different projections, and the base
        tokens[fuse] = [h.result(timeout=120).token_ids for h in handles]
    assert tokens[True] == tokens[False]

    # One step's logits: the same sums in another grouping, so within fp32 rounding of the reductions.
    for engine in by_fuse.values():
        engine.stop(drain_timeout=0)
    ids = fused.tokenizer("The quick brown fox")["input_ids"]
    logits = {}
    for fuse, engine in by_fuse.items():
        chunk = SeqChunk(row=0, start_pos=0, token_ids=list(ids), slot=-1, want_logits=True)
        logits[fuse] = engine.forward([chunk])
    hidden = fused.loaded.model.config.intermediate_size
    tolerance = 64 * hidden * torch.finfo(torch.float32).eps
    assert torch.allclose(logits[True], logits[False], rtol=0, atol=tolerance * logits[False].abs().max())

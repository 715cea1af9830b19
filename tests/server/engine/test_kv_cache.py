"""The one head-size / KV-size formula: a config object and config.json agree, and the cache built
from it holds exactly the bytes it predicts (what a route's memory estimate counts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from loraswap.server.engine.kv_cache import KVCache, head_dim, kv_cache_bytes, kv_heads

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("fields", "size", "groups"),
    [
        ({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}, 16, 2),
        ({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}, 32, 2),
        ({"hidden_size": 96, "num_attention_heads": 6}, 16, 6),  # no grouping: kv heads = heads
    ],
)
def test_dict_and_config_object_agree_and_the_cache_holds_what_is_predicted(fields, size, groups) -> None:
    doc = {"num_hidden_layers": 3, "intermediate_size": 128, **fields}
    config = LlamaConfig(**doc)
    for source in (doc, config):
        assert head_dim(source) == size and kv_heads(source) == groups
        for dtype in (torch.float32, torch.bfloat16):
            cache = KVCache.for_model(source, 5, 24, dtype, CPU)
            assert cache.k[0].shape == (5, groups, 24, size) and len(cache.k) == len(cache.v) == 3
            assert kv_cache_bytes(source, 5, 24, dtype) == cache.nbytes


def test_the_tiny_base_config_file(tiny_base: Path) -> None:
    doc = json.loads((tiny_base / "config.json").read_text())
    config = LlamaConfig.from_pretrained(tiny_base)
    assert head_dim(doc) == head_dim(config) == doc["hidden_size"] // doc["num_attention_heads"]
    assert (
        kv_cache_bytes(doc, 2, 32, torch.float32)
        == KVCache.for_model(config, 2, 32, torch.float32, CPU).nbytes
    )

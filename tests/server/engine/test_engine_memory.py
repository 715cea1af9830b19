"""Unloading frees memory: 1,000 load/unload cycles of distinct adapters leave host memory flat."""

from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraswap.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_key
from loraswap.device import device_allocated_bytes, host_rss_bytes
from loraswap.registry.registry import open_registry
from loraswap.server.engine import Engine, EngineConfig

CYCLES = 1000


def write_adapter(folder: Path, seed: int, hidden: int, layers: int, rank: int = 8) -> Path:
    """A PEFT-format LoRA adapter on q_proj/v_proj with random weights."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for proj, out in (("q_proj", hidden), ("v_proj", hidden // 2)):
            module = f"model.layers.{layer}.self_attn.{proj}"
            tensors[lora_key(module, "A")] = torch.randn(rank, hidden, generator=gen) * 0.1
            tensors[lora_key(module, "B")] = torch.randn(out, rank, generator=gen) * 0.1
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    return folder


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor the garbage collector can see."""
    storages = {}
    with warnings.catch_warnings():  # isinstance() on every object touches deprecated torch aliases
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # oneDNN's packed base weights: fixed, not counted
            continue
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.slow
def test_thousand_load_unload_cycles_return_memory(tiny_base: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_base / "config.json").read_text())
    registry = open_registry(tmp_path / "registry")
    names = []
    for i in range(CYCLES):
        folder = write_adapter(tmp_path / f"src{i}", i, config["hidden_size"], config["num_hidden_layers"])
        names.append(registry.push(folder, f"a{i}").name)
    engine = Engine(
        EngineConfig(
            base=str(tiny_base), quantization="fp32", adapter_slots=4, max_batch_size=2, max_seq_len=32
        ),
        registry=registry,
    )
    try:
        for name in names[:50]:  # warm up allocator pools and caches
            engine.load_adapter(name, "device")
            engine.unload_adapter(name)
        gc.collect()
        rss_start, dev_start = host_rss_bytes(), device_allocated_bytes(engine.device)
        tensors_start = live_tensor_bytes()
        for name in names[50:]:
            engine.load_adapter(name, "device")
            engine.unload_adapter(name)
        gc.collect()
        assert len(engine.adapters.host) == 0 and engine.adapters.slots.keys() == []
        assert host_rss_bytes() <= rss_start * 1.05
        # every tensor still alive, on any device (on CPU, where device_allocated_bytes is always 0, this
        # is what would hold a leaked host copy or slot buffer): no more bytes than before the cycles
        assert live_tensor_bytes() <= tensors_start
        if engine.device.type == "cuda":
            assert device_allocated_bytes(engine.device) <= dev_start * 1.05
    finally:
        engine.stop(drain_timeout=1)

"""Synthetic PEFT-format adapters for a given base, written straight to disk (fast, any count)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraswap.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_key
from loraswap.models.fingerprint import weight_shapes


def write_adapter(
    folder: Path, base_dir: Path, seed: int, rank: int, targets: tuple[str, ...], dtype=torch.bfloat16
) -> Path:
    """Random LoRA weights for every ``targets`` projection of ``base_dir`` (shapes read from its files)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in weight_shapes(base_dir).items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in targets or not name.endswith(".weight"):
            continue
        out_f, in_f = shape
        tensors[lora_key(module, "A")] = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).to(dtype)
        tensors[lora_key(module, "B")] = (torch.randn(out_f, rank, generator=gen) * 0.02).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(targets)}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    return folder

"""Writing the trained adapter as a standard PEFT folder, touching only the LoRA parameters.

``state_dict()`` / ``save_pretrained`` are never called on the live model: on a quantized base they would
dequantize/serialise the 4-bit weights (and bitsandbytes 0.50.2 corrupts them on some CPUs when that runs
after a forward). The LoRA matrices are collected from ``named_parameters()`` instead and renamed to
PEFT's file keys (``base_model.model.<module>.lora_A.weight``, the adapter name stripped).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from loraswap.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_lora_weight
from loraswap.trainer.model import ADAPTER_NAME

_PARAM_RE = re.compile(rf"^(?P<module>.+)\.lora_(?P<ab>[AB])\.{ADAPTER_NAME}\.weight$")


def file_key(param_name: str) -> str | None:
    """PEFT's file key for a live LoRA parameter name, or ``None`` for any other parameter."""
    match = _PARAM_RE.match(param_name)
    if match is None:
        return None
    key = f"{match['module']}.lora_{match['ab']}.weight"
    return key if is_lora_weight(key) else None


def lora_parameters(model) -> dict[str, Any]:
    """``{file key: live parameter}`` of every LoRA matrix of ``model`` (a PeftModel)."""
    found = {}
    for name, param in model.named_parameters():
        key = file_key(name)
        if key is not None:
            found[key] = param
    if not found:
        raise RuntimeError("the model has no LoRA parameters")
    return found


def lora_tensors(model) -> dict[str, Any]:
    """Detached CPU copies of the LoRA matrices, keyed as in ``adapter_model.safetensors``."""
    return {
        key: param.detach().to("cpu").contiguous().clone() for key, param in lora_parameters(model).items()
    }


def load_lora_tensors(model, tensors: dict[str, Any]) -> None:
    """Copy saved LoRA matrices back into ``model``; every key must match."""
    import torch

    params = lora_parameters(model)
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"LoRA weights do not match the model (missing {missing[:3]}, extra {extra[:3]})")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key].to(param.device, param.dtype))


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return sorted(_jsonable(v) for v in value) if isinstance(value, set | frozenset) else list(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and isinstance(value, str):  # str enums (PeftType, TaskType)
        return value.value
    return value


def adapter_config_doc(model, base_model_id: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` document of ``model``'s adapter, as PEFT writes it."""
    doc = _jsonable(model.peft_config[ADAPTER_NAME].to_dict())
    doc["inference_mode"] = True
    if base_model_id is not None:
        doc["base_model_name_or_path"] = base_model_id
    json.dumps(doc)  # fail here, not half-way through writing the file
    return doc


def save_adapter(model, out_dir: Path, base_model_id: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (weights in their training dtype)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_tmp = out_dir / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(lora_tensors(model), str(weights_tmp), metadata={"format": "pt"})
    config_tmp = out_dir / f".{ADAPTER_CONFIG}.tmp"
    config_tmp.write_text(json.dumps(adapter_config_doc(model, base_model_id), indent=2, sort_keys=True))
    os.replace(weights_tmp, out_dir / ADAPTER_WEIGHTS)
    os.replace(config_tmp, out_dir / ADAPTER_CONFIG)
    return out_dir

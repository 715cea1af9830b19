"""A base model's fingerprint: a hash of its architecture and weight names/shapes.

Two folders holding the same architecture with the same tensor layout share a fingerprint whatever their
dtype; an adapter trained for one base is refused on a base with another fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open

ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


def weight_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Names and shapes of every tensor in the folder's safetensors files (headers only, no data read)."""
    shapes: dict[str, list[int]] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[name] = list(handle.get_slice(name).get_shape())
    return shapes


def base_fingerprint(model_dir: Path) -> str:
    """``sha256:<hex>`` over the architecture keys of config.json and the sorted weight names/shapes."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch = {key: config.get(key) for key in ARCH_KEYS}
    payload = json.dumps({"arch": arch, "weights": sorted(weight_shapes(model_dir).items())}, sort_keys=True)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()

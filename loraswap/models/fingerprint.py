"""A base model's fingerprint: a hash of its architecture and weight names/shapes.

Two folders holding the same architecture with the same tensor layout share a fingerprint whatever their
dtype; an adapter trained for one base is refused on a base with another fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loraswap.models.weight_files import weight_files
from loraswap.safetensors_header import read_header_file

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
    """Names and shapes of every tensor in the folder's weight files (:func:`weight_files`; headers
    only, no data read).

    Raises:
        FileNotFoundError: The folder has no safetensors weights (or its index names a missing file).
        SafetensorsError: A weight file's header is malformed.
    """
    files = weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    shapes: dict[str, list[int]] = {}
    for file in files:
        shapes.update(read_header_file(file).shapes())
    return shapes


def base_fingerprint(model_dir: Path) -> str:
    """``sha256:<hex>`` over the architecture keys of config.json and the sorted weight names/shapes."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch = {key: config.get(key) for key in ARCH_KEYS}
    payload = json.dumps({"arch": arch, "weights": sorted(weight_shapes(model_dir).items())}, sort_keys=True)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()

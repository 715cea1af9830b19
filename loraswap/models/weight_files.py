"""Which safetensors files of a model folder hold its weights: the one shard lister.

A folder may hold more ``*.safetensors`` than its weights: Mistral's releases keep a
``consolidated.safetensors`` (the same tensors under other names) beside the HF shards. The index,
when there is one, says which files are the model's.
"""

from __future__ import annotations

import json
from pathlib import Path

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def indexed_files(index: Path) -> list[str]:
    """The file names the index's ``weight_map`` names, sorted, each once."""
    weight_map = json.loads(Path(index).read_text()).get("weight_map") or {}
    return sorted({name for name in weight_map.values() if isinstance(name, str)})


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files: those :data:`INDEX_FILE` names when it is present, else
    :data:`SINGLE_FILE`, else every ``*.safetensors`` (sorted). Empty when there are none.

    Files the index does not name (``consolidated.safetensors``) are never weights of an indexed folder.
    """
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        return [folder / name for name in indexed_files(folder / INDEX_FILE)]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    return sorted(folder.glob("*.safetensors"))

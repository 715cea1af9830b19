"""Where loraswap keeps its local state (model cache, pulled adapters, local registry).

These are lookups only: nothing here creates a folder. The code that writes into one creates it
(the model conversion, the adapter cache, the local registry store).
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Root of loraswap's local state: ``$LORASWAP_HOME`` or ``~/.cache/loraswap``."""
    env = os.environ.get("LORASWAP_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraswap"


def models_dir() -> Path:
    """Converted base models (one HF folder each)."""
    return home() / "models"


def adapter_cache_dir() -> Path:
    """Adapter versions pulled from a registry, one folder per digest."""
    return home() / "adapters"


def model_cache_dir() -> Path:
    """Merged models pulled from a registry, one folder per digest (beside the adapter cache)."""
    return home() / "registry-models"


def default_registry_dir() -> Path:
    """The embedded local registry used when no ``--registry`` is given."""
    return home() / "registry"

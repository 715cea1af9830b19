"""Where loraswap keeps its local state (model cache, pulled adapters, local registry).

Caches (converted models, pulled adapters) live under :func:`home`; the local registry is data, not
cache, and lives in the XDG data dir (:func:`data_home`) unless ``$LORASWAP_HOME`` is set, which keeps
everything, the registry included, under one folder.

These are lookups only: nothing here creates a folder. The code that writes into one creates it
(the model conversion, the adapter cache, the local registry store).
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "LORASWAP_HOME"


def home() -> Path:
    """Root of loraswap's caches: ``$LORASWAP_HOME`` or ``~/.cache/loraswap``."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraswap"


def data_home() -> Path:
    """Root of loraswap's data without ``$LORASWAP_HOME``: ``$XDG_DATA_HOME/loraswap``, by default
    ``~/.local/share/loraswap`` (a relative ``$XDG_DATA_HOME`` is ignored, as the XDG spec says)."""
    env = os.environ.get("XDG_DATA_HOME", "")
    root = Path(env) if os.path.isabs(env) else Path.home() / ".local" / "share"
    return root / "loraswap"


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
    """The local registry used when no ``--registry`` is given: ``$LORASWAP_HOME/registry`` when
    ``$LORASWAP_HOME`` is set, else ``data_home()/registry``."""
    return home() / "registry" if os.environ.get(HOME_ENV) else data_home() / "registry"


def legacy_registry_dir() -> Path | None:
    """Where the local registry was by default before it moved to the data dir (``~/.cache/loraswap/
    registry``); None when ``$LORASWAP_HOME`` is set (its registry never moved)."""
    return None if os.environ.get(HOME_ENV) else home() / "registry"

"""Pushing a trained adapter folder to a registry (``--push NAME[:TAG]``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from loraswap.errors import InvalidArgumentError
from loraswap.models import BaseModelRef

_NAME_RE = re.compile(r"(?P<name>[^:\s]+)(?::(?P<tag>[^:\s]+))?")


def parse_push_target(spec: str) -> tuple[str, str | None]:
    """Split ``NAME[:TAG]``."""
    match = _NAME_RE.fullmatch(spec)
    if match is None:
        raise InvalidArgumentError(f"--push expects NAME or NAME:TAG, got {spec!r}")
    return match["name"], match["tag"]


def push_adapter(output_dir: Path, spec: str, base_ref: BaseModelRef, registry: str | None = None) -> Any:
    """Push ``output_dir`` (adapter + training_metadata.json) as ``NAME[:TAG]``; return the manifest."""
    from loraswap.registry import open_registry

    name, tag = parse_push_target(spec)
    reg = open_registry(registry)  # None -> $LORASWAP_REGISTRY or the local default
    return reg.push(output_dir, name, tags=[tag] if tag else [], base=base_ref, description=None)

"""loraswap.registry: a content-addressed registry of adapters and merged models with tags, on a local
folder or S3.

Typical use::

    from loraswap.registry import open_registry

    reg = open_registry()                       # $LORASWAP_REGISTRY or the local default
    manifest = reg.push(folder, "support-bot", tags=["prod"])
    folder = reg.pull("support-bot:prod")       # verified local cache folder
    model = reg.push_model(merged_dir, "support-bot-merged:v1")   # a merged model (kind "model")
    folder = reg.pull_model("support-bot-merged:v1")
"""

from loraswap.registry.maintenance import GcReport
from loraswap.registry.manifest import ADAPTER, KINDS, MODEL, FileEntry, Manifest
from loraswap.registry.names import Reference, parse_ref
from loraswap.registry.registry import Registry, VersionEntry, WrongKindError, open_registry
from loraswap.registry.store import ObjectStore, open_store
from loraswap.registry.validate import AdapterSummary, base_compat_problems, validate_adapter_dir
from loraswap.registry.validate_model import (
    Lineage,
    LineageAdapter,
    ModelInfo,
    ModelSummary,
    validate_model_dir,
)

__all__ = [
    "ADAPTER",
    "KINDS",
    "MODEL",
    "AdapterSummary",
    "FileEntry",
    "GcReport",
    "Lineage",
    "LineageAdapter",
    "Manifest",
    "ModelInfo",
    "ModelSummary",
    "ObjectStore",
    "Reference",
    "Registry",
    "VersionEntry",
    "WrongKindError",
    "base_compat_problems",
    "open_registry",
    "open_store",
    "parse_ref",
    "validate_adapter_dir",
    "validate_model_dir",
]

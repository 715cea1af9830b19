"""loraswap.registry: a content-addressed adapter registry with tags, on a local folder or S3.

Typical use::

    from loraswap.registry import open_registry

    reg = open_registry()                       # $LORASWAP_REGISTRY or the local default
    manifest = reg.push(folder, "support-bot", tags=["prod"])
    folder = reg.pull("support-bot:prod")       # verified local cache folder
"""

from loraswap.registry.maintenance import GcReport
from loraswap.registry.manifest import FileEntry, Manifest
from loraswap.registry.names import Reference, parse_ref
from loraswap.registry.registry import Registry, VersionEntry, open_registry
from loraswap.registry.store import ObjectStore, open_store
from loraswap.registry.validate import AdapterSummary, base_compat_problems, validate_adapter_dir

__all__ = [
    "AdapterSummary",
    "FileEntry",
    "GcReport",
    "Manifest",
    "ObjectStore",
    "Reference",
    "Registry",
    "VersionEntry",
    "base_compat_problems",
    "open_registry",
    "open_store",
    "parse_ref",
    "validate_adapter_dir",
]

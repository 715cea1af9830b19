"""loraswap.merge: adapters folded into a base model's weights, written as a standalone HF model folder.

Typical use::

    from loraswap.merge import merge_adapters, resolve_adapter

    sources = [resolve_adapter("support-bot:prod"), resolve_adapter("./style-adapter")]
    record = merge_adapters(base_dir, sources, Path("merged"), method="cat", weights=[0.7, 0.3])
"""

from loraswap.merge.builder import DTYPES, merge_adapters
from loraswap.merge.methods import METHODS, MergeParams, MethodSpec, check_params
from loraswap.merge.record import RECORD_FILE, MergedAdapter, MergeRecord
from loraswap.merge.sources import AdapterSource, folder_digest, resolve_adapter

__all__ = [
    "DTYPES",
    "METHODS",
    "RECORD_FILE",
    "AdapterSource",
    "MergeParams",
    "MergeRecord",
    "MergedAdapter",
    "MethodSpec",
    "check_params",
    "folder_digest",
    "merge_adapters",
    "resolve_adapter",
]

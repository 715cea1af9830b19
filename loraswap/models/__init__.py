"""Base models: the embedded default, local HF folders, and their fingerprints."""

from loraswap.models.base import BaseModelRef, resolve_base
from loraswap.models.fingerprint import base_fingerprint

__all__ = ["BaseModelRef", "base_fingerprint", "resolve_base"]

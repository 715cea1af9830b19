"""Where things live in a registry store (the same keys on every backend), OCI-style::

    blobs/sha256/<hex>                      file contents, shared by every version and adapter
    adapters/<name>/manifests/<hex>         one immutable manifest per version (digest = <hex>)
    adapters/<name>/tags/<tag>              {"digest": "sha256:<hex>", "writer": nonce, "updated": time}

Merged models live under the same ``adapters/<name>/`` keys as adapters (their manifests say
``"kind": "model"``; a name holds one kind): one name space, so a reference names one version whatever
its kind, and a loraswap that predates models still sees their manifests (its ``gc`` keeps the blobs a
manifest it cannot parse names, instead of collecting them as unreferenced).

A push writes blobs first, then the manifest, then moves the tags, so a version is visible only once
complete and a tag never points at a missing manifest. Every key is built from a checked name, tag or
hex digest (see :mod:`loraswap.registry.names`).
"""

from __future__ import annotations

import json
import time
import uuid

from loraswap.errors import IntegrityError
from loraswap.registry.names import DIGEST_RE, HEX_RE, NAME_RE, TAG_RE, check_name, check_tag, digest_hex

BLOBS = "blobs/sha256/"
ADAPTERS = "adapters/"


def blob_key(digest: str) -> str:
    return BLOBS + digest_hex(digest)


def manifests_prefix(name: str) -> str:
    return f"{ADAPTERS}{check_name(name)}/manifests/"


def manifest_key(name: str, digest: str) -> str:
    return manifests_prefix(name) + digest_hex(digest)


def tags_prefix(name: str) -> str:
    return f"{ADAPTERS}{check_name(name)}/tags/"


def tag_key(name: str, tag: str) -> str:
    return tags_prefix(name) + check_tag(tag)


def split_adapter_key(key: str) -> tuple[str, str, str] | None:
    """``adapters/<name>/<kind>/<leaf>`` → (name, kind, leaf); ``None`` for keys of another shape (a
    name or tag that is not valid, a manifest whose name is not 64 lower-case hex digits)."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != ADAPTERS.rstrip("/") or not NAME_RE.fullmatch(parts[1]):
        return None
    if parts[2] == "tags" and TAG_RE.fullmatch(parts[3]):
        return parts[1], parts[2], parts[3]
    if parts[2] == "manifests" and HEX_RE.fullmatch(parts[3]):
        return parts[1], parts[2], parts[3]
    return None


def tag_document(digest: str) -> bytes:
    """A tag's content; the per-write nonce makes every write distinct (no ABA on etags)."""
    doc = {"digest": digest, "writer": uuid.uuid4().hex, "updated": time.time()}
    return json.dumps(doc, sort_keys=True).encode()


def tag_target(data: bytes, key: str) -> str:
    """The digest a tag document points at; :class:`IntegrityError` unless it is a ``sha256:<hex>``."""
    try:
        digest = json.loads(data)["digest"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise IntegrityError(f"tag {key} is unreadable") from None
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise IntegrityError(f"tag {key} is unreadable: {str(digest)[:80]!r} is not a digest")
    return digest

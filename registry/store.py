"""The small object-store interface every registry backend implements, and ``open_store(url)``.

Keys are ``/``-separated relative paths built by the registry from checked names, tags and hex digests.
Each stored object has an opaque ``etag`` that changes whenever its content is replaced; tags are
updated with :meth:`ObjectStore.compare_and_swap` so that a concurrent update is never lost silently.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, urlparse

from loraswap.errors import InvalidArgumentError, RegistryUnavailableError

# One segment of a key (full match): no empty, '.' or '..' segment, no backslash, no newline, no leading
# dot (temp files use it).
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")

Progress = Callable[[int], None]
"""Called with the number of bytes just transferred (drives a progress bar)."""


class StoreError(RegistryUnavailableError):
    """The object store failed: network, permissions, a missing bucket, a read that broke off (gRPC
    UNAVAILABLE: the message names the store's URL)."""


def check_key(key: str) -> str:
    """Return ``key`` if every segment is a plain file name; raise :class:`InvalidArgumentError` if not."""
    parts = key.split("/")
    if not key or not all(_SEGMENT_RE.fullmatch(part) for part in parts):
        raise InvalidArgumentError(f"invalid store key {key!r}")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing says about one object.

    Attributes:
        key: The object's key.
        size: Size in bytes.
        modified: Last write (or touch), seconds since the epoch.
        version: Opaque; changes whenever the object is written or touched (S3: its ETag, which
            ``touch`` always changes; local: inode and change times). ``""`` if unknown.
    """

    key: str
    size: int
    modified: float
    version: str = ""


class ObjectStore(ABC):
    """A flat key → bytes store with conditional writes.

    Attributes:
        url: Where the store lives (for messages).
    """

    url: str

    @abstractmethod
    def read(self, key: str) -> tuple[bytes, str]:
        """Return ``(content, etag)``; raise :class:`NotFoundError` if the key is absent.

        Every backend raises only loraswap errors: :class:`StoreError` when the object cannot be read,
        :class:`~loraswap.errors.IntegrityError` when the store itself finds its copy damaged.
        """

    def get(self, key: str) -> bytes:
        """Return the content of ``key``; raise :class:`NotFoundError` if absent."""
        return self.read(key)[0]

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A binary stream over the content (for large blobs); :class:`NotFoundError` if absent.

        Reading it raises :class:`StoreError` or :class:`~loraswap.errors.IntegrityError` (as
        :meth:`read`), never a backend's own exception.
        """

    @abstractmethod
    def put(self, key: str, data: bytes | Path, progress: Progress | None = None) -> None:
        """Write (or replace) ``key`` atomically: readers see the old or the whole new content.

        A ``Path`` is read with :func:`~loraswap.adapter_format.open_adapter_file`: a regular file,
        never through a symbolic link (:class:`InvalidArgumentError` otherwise).
        """

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes | Path, progress: Progress | None = None) -> bool:
        """Write ``key`` only if it does not exist; return whether this call created it."""

    @abstractmethod
    def compare_and_swap(self, key: str, data: bytes, expected: str | None) -> str:
        """Replace ``key`` if its etag is ``expected`` (``None``: only if absent); return the new etag.

        Raises:
            ConflictError: The key changed (or appeared) since ``expected`` was read.
        """

    @abstractmethod
    def delete(self, key: str, expected: str | None = None) -> None:
        """Delete ``key`` (no error if absent); with ``expected``, only if its etag still matches.

        Raises:
            ConflictError: ``expected`` was given and the key has another etag now.
        """

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (in-progress temporary writes excluded)."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size and age of ``key``, or ``None`` if absent."""

    @abstractmethod
    def touch(self, key: str) -> None:
        """Refresh the modification time of ``key`` and change its :attr:`ObjectInfo.version` (a reused
        blob must not look old to ``gc``, and must fail a :meth:`delete_stale` judged before)."""

    @abstractmethod
    def delete_stale(self, seen: ObjectInfo, cutoff: float) -> bool:
        """Delete ``seen.key`` only if it is still the object ``seen`` describes (not written or
        touched since: same :attr:`~ObjectInfo.version`) and was last written before ``cutoff`` (epoch
        seconds); return whether it was deleted.

        This is ``gc``'s delete: a push that touches (or re-uploads) the blob after ``gc`` listed it
        keeps it. Each backend says how atomic the check and the delete are.
        """

    def remove_stale_temp(self, older_than: float) -> int:
        """Delete leftovers of killed writers older than ``older_than`` (epoch seconds); return a count.

        Backends whose writes leave nothing behind (S3 publishes an object only once complete) keep this
        no-op.
        """
        return 0


def open_store(url: str | os.PathLike[str]) -> ObjectStore:
    """Open the store at ``url``: ``file:///path``, a plain path, or ``s3://bucket/prefix``.

    An ``s3://`` URL may end in ``?conditional=false`` to force the read-back fallback for tag updates
    (for stores known to ignore ``If-Match``/``If-None-Match``); by default a probe decides.
    """
    text = os.fspath(url)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        from loraswap.registry.s3_store import S3Store

        options = parse_qs(parsed.query)
        conditional = None
        if "conditional" in options:
            conditional = options["conditional"][-1].lower() not in ("0", "false", "no")
        return S3Store(parsed.netloc, parsed.path.strip("/"), conditional=conditional)
    from loraswap.registry.local_store import LocalStore

    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # 'c:' style drive letters are paths
        raise InvalidArgumentError(f"unsupported registry URL {text!r}: use a path, file:///path or s3://")
    return LocalStore(Path(text).expanduser())


def check_store_url(url: str | os.PathLike[str]) -> None:
    """Check, with no network or disk I/O, that a store at ``url`` can be opened by this installation:
    the URL's scheme, and for ``s3://`` that boto3 is installed and accepts the environment (profile,
    region, endpoint, the ``$LORASWAP_S3_*`` limits). A server runs this at start, so that a
    misconfiguration refuses to start instead of failing every adapter request later; an endpoint that
    is down is not a misconfiguration and is found on first use.

    Raises:
        InvalidArgumentError: An unsupported URL scheme, or a limit's variable that is not a number.
        MissingDependencyError: ``s3://`` without boto3 (the message names the ``pip install``).
        FailedPreconditionError: boto3 refuses the configuration (an unknown ``AWS_PROFILE``, no region).
    """
    text = os.fspath(url)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        from loraswap.registry.s3_client import make_client

        if not parsed.netloc:
            raise InvalidArgumentError(f"registry URL {text!r} names no bucket: use s3://bucket/prefix")
        make_client(text)
    elif parsed.scheme not in ("", "file") and len(parsed.scheme) > 1:
        raise InvalidArgumentError(f"unsupported registry URL {text!r}: use a path, file:///path or s3://")

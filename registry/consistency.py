"""How ``push``, ``tag`` and ``rm`` keep each version consistent without a lock across keys.

A version is a manifest key; a tag is a key naming a manifest's digest. ``rm --force`` deletes the tags
naming a version, then its manifest, while a push of the same content (or a ``tag``) may be moving tags
to it: each side writes one key and then relies on the other, so without a check one of them can leave
a tag naming a deleted manifest (it happened: ``latest`` naming a removed version while every push
reported success).

The protocol: **whoever writes a key checks the other key afterwards.**

* A tag moves by compare-and-swap (:func:`move_tag`): read it, write it if it still holds what was read;
  a lost race is tried again after a short random wait (:func:`tag_retry`), ``retries`` times at most.
* A tag writer (``push``, ``tag``), after moving its tags, checks that the manifest is still there
  (:func:`point_tags`). If it is gone, a push writes it again (same content, same digest: the bytes are
  safe to rewrite), uploads any blob that went meanwhile, moves its tags again and checks again, up to
  ``retries`` times (then it takes back the tags it set and raises :class:`ConflictError`); ``tag``, which
  has no files to restore, takes its tag back (a conditional delete of what it wrote) and raises
  :class:`NotFoundError`.
* ``rm``, after deleting the manifest, lists the tags again: a tag naming the version now was set by a
  concurrent push or ``tag`` after ``rm`` deleted the tags. ``rm`` then writes the manifest back
  (:func:`restore_version`: the blobs are touched first so that a concurrent ``gc`` keeps them) and raises
  :class:`ConflictError` (the version is kept with that tag; its other tags were removed).

Why no tag is left naming a missing manifest once every operation has finished: take the last write of
such a tag and the last delete of its manifest. If the writer's check ran after the delete, it saw the
manifest missing and wrote it back (push) or took its tag back (``tag``); if it ran before the delete,
the tag was written before the delete, so ``rm``'s listing after the delete saw it and ``rm`` wrote the
manifest back. Either way the manifest is there, or the tag is not. Every outcome is one of the orders
of the operations (push, then rm: the version and its tags are gone; rm, then push: the version and the
push's tags are there), except that an ``rm`` that raises :class:`ConflictError` may have removed tags
other than the ones that made it stop. This relies on each key being read-after-write consistent (a
local folder; S3 since 2020), not on any lock.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from loraswap.errors import ConflictError, NotFoundError
from loraswap.registry.layout import blob_key, manifest_key, tag_document, tag_key, tag_target
from loraswap.registry.manifest import Manifest
from loraswap.registry.store import ObjectStore
from loraswap.retry import Retry, RetryPolicy, retry

log = logging.getLogger(__name__)
TAG_BACKOFF_S = 0.01
"""Longest wait before a tag's first compare-and-swap retry (the waits double from there)."""
TAG_MAX_BACKOFF_S = 0.2
"""Longest wait before any tag compare-and-swap retry."""


def read_tag(store: ObjectStore, name: str, tag: str) -> tuple[str, str] | None:
    """(digest, etag) of ``name:tag``, or ``None`` if there is no such tag."""
    key = tag_key(name, tag)
    try:
        data, etag = store.read(key)
    except NotFoundError:
        return None
    return tag_target(data, key), etag


def tag_retry(retries: int) -> RetryPolicy:
    """The policy of a tag's compare-and-swap: ``retries`` more tries after a lost race, each after a
    random wait of up to :data:`TAG_BACKOFF_S` seconds, doubling per retry up to :data:`TAG_MAX_BACKOFF_S`
    (full jitter), so that writers that collided do not read and write again in step."""
    return RetryPolicy(
        attempts=retries + 1, retry_on=(ConflictError,), backoff=TAG_BACKOFF_S, max_backoff=TAG_MAX_BACKOFF_S
    )


def move_tag(store: ObjectStore, name: str, tag: str, digest: str, retries: int) -> str | None:
    """Point ``name:tag`` at ``digest`` by compare-and-swap, re-reading after a lost race (a tag move
    does not depend on the old value, so retrying is safe) under :func:`tag_retry`.

    Returns:
        The etag this call wrote, or ``None`` if the tag already named ``digest``.

    Raises:
        ConflictError: The tag changed under this call ``retries + 1`` times.
    """
    key = tag_key(name, tag)

    def swap() -> str | None:
        current = read_tag(store, name, tag)
        if current is not None and current[0] == digest:
            return None
        return store.compare_and_swap(key, tag_document(digest), current and current[1])

    def lost(event: Retry) -> None:
        log.debug("%s:%s changed under this write; trying again in %.3f s", name, tag, event.wait)

    return retry(swap, tag_retry(retries), before_retry=lost)


def upload_missing_blobs(store: ObjectStore, manifest: Manifest, folder: Path) -> None:
    """Upload from ``folder`` every blob of ``manifest`` the store lacks (after the manifest is written:
    a concurrent ``gc`` may have taken a reused blob before it was referenced)."""
    for entry in manifest.files:
        key = blob_key(entry.digest)
        if store.stat(key) is None:
            store.put(key, folder / entry.path)


def point_tags(
    store: ObjectStore, manifest: Manifest, folder: Path, tags: Sequence[str], retries: int
) -> None:
    """A push's last step: move ``tags`` to ``manifest``'s version, then check that it is still stored,
    writing it back (and its missing blobs, from ``folder``) if a concurrent ``rm`` removed it.

    Raises:
        ConflictError: The version was removed again after each of ``retries + 1`` rounds (the tags this
            push set are taken back first), or a tag kept changing.
    """
    key = manifest_key(manifest.name, manifest.digest)
    for _ in range(retries + 1):
        for tag in tags:
            move_tag(store, manifest.name, tag, manifest.digest, retries)
        if store.stat(key) is not None:
            return
        log.info("%s@%s was removed while being pushed; writing it again", manifest.name, manifest.digest)
        store.put_if_absent(key, manifest.to_bytes())
        upload_missing_blobs(store, manifest, folder)
    for tag in tags:
        drop_tag(store, manifest.name, tag, manifest.digest)
    raise ConflictError(
        f"cannot push {manifest.name}@{manifest.digest}: it was removed by a concurrent rm {retries + 1} "
        "times; push again"
    )


def drop_tag(store: ObjectStore, name: str, tag: str, digest: str, etag: str | None = None) -> None:
    """Delete ``name:tag`` if it still names ``digest`` (and, with ``etag``, is still that write)."""
    current = read_tag(store, name, tag)
    if current is None or current[0] != digest or (etag is not None and current[1] != etag):
        return
    with contextlib.suppress(ConflictError):  # moved by another writer meanwhile: theirs now
        store.delete(tag_key(name, tag), expected=current[1])


def restore_version(store: ObjectStore, manifest: Manifest) -> list[str]:
    """Write a just-removed manifest back (``rm`` lost a race with a tag writer); return the digests of
    its blobs that are gone (a ``gc`` removed them in between: ``verify`` will report the version)."""
    missing = []
    for entry in manifest.files:  # touch first: a gc that listed them old now fails its conditional delete
        store.touch(blob_key(entry.digest))
    store.put_if_absent(manifest_key(manifest.name, manifest.digest), manifest.to_bytes())
    for entry in manifest.files:
        if store.stat(blob_key(entry.digest)) is None:
            missing.append(entry.digest)
    return missing

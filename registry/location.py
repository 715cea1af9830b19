"""Which folder the default local registry is, and a one-time notice for one left at the old default.

The registry is data, not cache: without ``$LORASWAP_HOME`` it lives in the XDG data dir
(:func:`loraswap.paths.default_registry_dir`, ``~/.local/share/loraswap/registry``). It used to live in
``~/.cache/loraswap/registry``. A registry found there while none exists at the new place is still the
one opened (opening the new place would create an empty registry there, hiding the user's adapters and
blocking a plain ``mv``); it is never moved. The first time, a warning names both folders and the
command that moves it; a marker file beside the new registry keeps it from being repeated.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from loraswap import paths

log = logging.getLogger(__name__)

NOTICE_MARKER = ".old-registry-notice-shown"
"""File in :func:`loraswap.paths.data_home` recording that the notice was shown (it holds the old path)."""


def default_local_registry() -> Path:
    """The folder a registry opened with no URL uses: the new default, or a registry still at the old one.

    Warns once (logging) when it returns the old folder.
    """
    new = paths.default_registry_dir()
    old = paths.legacy_registry_dir()
    if old is None or old == new or new.exists() or not _holds_anything(old):
        return new
    _notice_once(old, new)
    return old


def _holds_anything(folder: Path) -> bool:
    try:
        return folder.is_dir() and any(folder.iterdir())
    except OSError:
        return False


def _notice_once(old: Path, new: Path) -> None:
    marker = new.parent / NOTICE_MARKER
    if marker.exists():
        return
    move = f"mkdir -p {shlex.quote(str(new.parent))} && mv {shlex.quote(str(old))} {shlex.quote(str(new))}"
    log.warning(
        "the local registry's default moved out of the cache to %s (a registry is data, not cache); "
        "yours is still at %s and is used from there until you move it: %s (this notice is shown once)",
        new,
        old,
        move,
    )
    try:
        new.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{old}\n")
    except OSError as exc:  # a read-only data dir: the notice shows again next time, nothing else changes
        log.debug("could not record the registry notice in %s: %s", marker, exc)

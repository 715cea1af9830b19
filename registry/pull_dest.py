"""Copying a pulled version out of the verified cache into a caller's folder (``pull REF DEST``).

A pull writes nothing but the adapter's files, and only inside DEST:

* DEST is created (with its parents) when missing; an existing DEST must be an **empty folder**;
* DEST must not be a symbolic link (not even to a folder) and must not be a file;
* with ``force``, DEST may hold other entries: the adapter's file names (``adapter_config.json``,
  ``adapter_model.safetensors``, ``README.md``, ``training_metadata.json``) are replaced by the
  version's files, such a name that the version lacks is removed (so DEST never mixes two versions),
  and every other entry is left alone; a folder under one of those names is refused (for a merged model,
  its file names are those a model folder may hold: ``config.json``, ``model*.safetensors``, the
  tokenizer's files...; see :data:`~loraswap.registry.validate_model.MODEL_FILES`);
* every file is written to a fresh temporary name in DEST (created exclusively, so never through a
  link) and renamed over its final name: a link at that name is replaced, never followed. All of it is
  done relative to one descriptor of DEST opened without following links, so a DEST swapped for a link
  meanwhile is refused rather than followed.

DEST is checked (:func:`check_dest`) before anything is downloaded, and again when it is opened.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from loraswap.adapter_format import file_kind
from loraswap.errors import InvalidArgumentError
from loraswap.registry.manifest import ADAPTER, MODEL, Manifest
from loraswap.registry.validate import ALLOWED_FILES
from loraswap.registry.validate_model import is_model_file

LINK_PROBLEM = "it is a symbolic link (links are not followed: give the folder itself)"
FORCE_HINT = "pull into a new or empty folder, or use --force to replace the {kind}'s files in it"


def _refuse(dest: Path, problem: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"cannot pull into {dest}: {problem}")


def owns(kind: str) -> Callable[[str], bool]:
    """Whether a file name belongs to a version of ``kind`` (what ``--force`` replaces or removes)."""
    return is_model_file if kind == MODEL else ALLOWED_FILES.__contains__


def _entry_problems(names: set[str], mode_of: Callable[[str], int], force: bool, kind: str) -> str | None:
    """Why a folder holding ``names`` cannot take the pull (``mode_of``: an entry's ``lstat`` mode)."""
    if names and not force:
        return f"the folder is not empty ({FORCE_HINT.format(kind=kind)})"
    for name in sorted(filter(owns(kind), names)):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(mode_of(name)):
                return f"{name} in it is a folder, not a file (remove it first)"
    return None


def check_dest(dest: Path, force: bool = False, kind: str = ADAPTER) -> None:
    """Refuse a ``dest`` that :func:`copy_to_dest` would refuse (before anything is downloaded) for a
    version of ``kind``.

    Raises:
        InvalidArgumentError: ``dest`` is a link, not a folder, not empty (without ``force``), holds a
            folder under a file name of the version's kind, or cannot be read.
    """
    dest = Path(dest)
    try:
        mode = os.lstat(dest).st_mode
    except FileNotFoundError:
        return  # created by the copy
    except NotADirectoryError:
        raise _refuse(dest, "a folder above it is a file, not a folder") from None
    except OSError as exc:
        raise _refuse(dest, exc.strerror or str(exc)) from None
    if stat.S_ISLNK(mode):
        raise _refuse(dest, LINK_PROBLEM)
    if not stat.S_ISDIR(mode):
        raise _refuse(dest, f"it is {file_kind(mode)}, not a folder")
    try:
        names = set(os.listdir(dest))
    except OSError as exc:
        raise _refuse(dest, f"it cannot be read: {exc.strerror or exc}") from None
    problem = _entry_problems(names, lambda name: os.lstat(dest / name).st_mode, force, kind)
    if problem:
        raise _refuse(dest, problem)


def _open_dest(dest: Path) -> int:
    """Create ``dest`` if missing and open it as a folder without following a link."""
    try:
        if not os.path.lexists(dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(dest)
        flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        return os.open(dest, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(dest, LINK_PROBLEM) from None
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            raise _refuse(dest, "it (or a folder above it) is a file, not a folder") from None
        raise _refuse(dest, exc.strerror or str(exc)) from None


def copy_to_dest(folder: Path, manifest: Manifest, dest: Path, force: bool = False) -> None:
    """Copy the verified files of ``manifest`` from cache ``folder`` into ``dest`` (module rules).

    Raises:
        InvalidArgumentError: ``dest`` is refused or cannot be written (the reason is in the message).
    """
    dest = Path(dest)
    fd = _open_dest(dest)
    try:
        names = set(os.listdir(fd))
        mode_of = lambda name: os.lstat(name, dir_fd=fd).st_mode  # noqa: E731
        problem = _entry_problems(names, mode_of, force, manifest.kind)
        if problem:
            raise _refuse(dest, problem)
        for entry in manifest.files:
            _install(fd, folder / entry.path, entry.path, dest)
        if force:
            owned = ALLOWED_FILES if manifest.kind == ADAPTER else set(filter(is_model_file, names))
            for name in sorted(owned - {entry.path for entry in manifest.files}):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=fd)  # a link is removed itself, its target untouched
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise _refuse(dest, f"{exc.strerror or exc}{where}") from None
    finally:
        os.close(fd)


def _install(fd: int, source: Path, name: str, dest: Path) -> None:
    """Write ``source`` to ``name`` in the folder open as ``fd``: temp file, then rename."""
    temp = f".{name}.{uuid.uuid4().hex[:16]}.partial"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    out_fd = os.open(temp, flags, 0o644, dir_fd=fd)
    try:
        with open(source, "rb") as src, os.fdopen(out_fd, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        try:
            os.replace(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except IsADirectoryError:
            raise _refuse(dest, f"{name} in it is a folder, not a file (remove it first)") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=fd)
        raise

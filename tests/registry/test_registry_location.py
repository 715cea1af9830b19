"""Where the default local registry is: the XDG data dir (not the cache), ``$LORASWAP_HOME`` still
first, and a registry left at the old default used in place, never moved, announced once."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraswap import paths
from loraswap.registry import open_registry
from loraswap.registry.location import NOTICE_MARKER


@pytest.fixture
def user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's home with no loraswap variable set."""
    home = tmp_path / "user"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("LORASWAP_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    return home


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _notices(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "loraswap.registry.location"]


def test_the_default_registry_is_data_not_cache(
    user_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    new = user_home / ".local" / "share" / "loraswap" / "registry"
    assert paths.default_registry_dir() == new
    assert paths.legacy_registry_dir() == user_home / ".cache" / "loraswap" / "registry"
    assert paths.models_dir() == user_home / ".cache" / "loraswap" / "models"  # caches stay in the cache
    assert open_registry().url == f"file://{new}"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    assert paths.default_registry_dir() == tmp_path / "xdg-data" / "loraswap" / "registry"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/data")  # not absolute: ignored, as the XDG spec says
    assert paths.default_registry_dir() == new


def test_loraswap_home_still_holds_the_registry(
    user_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    old = user_home / ".cache" / "loraswap" / "registry"
    (old / "blobs").mkdir(parents=True)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("LORASWAP_HOME", str(tmp_path / "lh"))
    assert paths.default_registry_dir() == tmp_path / "lh" / "registry"
    assert paths.legacy_registry_dir() is None
    with caplog.at_level(logging.WARNING):
        assert open_registry().url == f"file://{tmp_path / 'lh' / 'registry'}"
    assert _notices(caplog) == []
    assert not (tmp_path / "xdg-data").exists()


def test_an_old_registry_is_used_in_place_announced_once_and_never_moved(
    user_home: Path, make_adapter, caplog: pytest.LogCaptureFixture
) -> None:
    old = user_home / ".cache" / "loraswap" / "registry"
    new = user_home / ".local" / "share" / "loraswap" / "registry"
    digest = open_registry(old).push(make_adapter(), "bot").digest
    before = _tree(old)

    with caplog.at_level(logging.WARNING):
        first = open_registry()
        second = open_registry()
    assert first.url == second.url == f"file://{old}"
    [notice] = _notices(caplog)
    assert str(old) in notice and str(new) in notice
    assert _tree(old) == before and not new.exists()
    assert (new.parent / NOTICE_MARKER).is_file()
    assert first.resolve("bot").digest == digest

    # The command the notice gives moves it; the registry is then opened at its new place, silently.
    command = notice.split("until you move it: ", 1)[1].split(" (this notice", 1)[0]
    subprocess.run(command, shell=True, check=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        moved = open_registry()
    assert moved.url == f"file://{new}" and moved.resolve("bot").digest == digest
    assert not old.exists() and _notices(caplog) == []


def test_the_command_line_shows_the_notice_once(user_home: Path) -> None:
    old = user_home / ".cache" / "loraswap" / "registry"
    (old / "blobs").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LORASWAP_HOME", "XDG_DATA_HOME")}
    runs = [
        subprocess.run(
            [sys.executable, "-m", "loraswap.cli", "registry", "list"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "HOME": str(user_home)},
            check=True,
        )
        for _ in range(2)
    ]
    assert f"yours is still at {old}" in runs[0].stderr and " mv " in runs[0].stderr
    assert runs[1].stderr == ""

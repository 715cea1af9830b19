"""pyproject.toml's package list against the source tree (a wheel holds only the packages listed)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _folders_as_packages(package_dir: dict[str, str]) -> set[str]:
    """Every folder under a mapped root, named as Python imports it (``server/engine`` is
    ``loraswap.server.engine``); a folder without ``__init__.py`` still imports, as a namespace package."""
    names = set()
    for package, folder in package_dir.items():
        root = ROOT / folder
        for path in [root, *root.rglob("*")]:
            if path.is_dir() and "__pycache__" not in path.parts:
                names.add(".".join([package, *path.relative_to(root).parts]))
    return names


def test_every_source_folder_is_a_listed_package_and_every_listed_package_exists() -> None:
    config = _setuptools_config()
    listed = set(config["packages"])
    on_disk = _folders_as_packages(config["package-dir"])
    assert on_disk - listed == set(), "folders a wheel leaves out: add them to [tool.setuptools] packages"
    assert listed - on_disk == set(), "packages listed in pyproject.toml without a folder"


def test_package_data_covers_the_demo_data() -> None:
    config = _setuptools_config()
    patterns = config["package-data"]["loraswap.demo_data"]
    files = sorted((ROOT / "loraswap" / "demo_data").iterdir())
    assert files and all(any(f.match(p) for p in patterns) for f in files)

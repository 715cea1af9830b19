"""``make setup`` checks the Python version first: another version is refused with one clear message,
before the virtualenv is made. A fake interpreter prints the version the check asks for."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make(target: str, python: str, venv: Path) -> subprocess.CompletedProcess:
    # Without the variables of a make this test may run under (`make test`): only these settings count.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), target, f"PYTHON={python}", f"VENV={venv}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def _fake_python(folder: Path, version: str) -> Path:
    """An executable that answers any question with ``version``, as a real one asked for its version."""
    fake = folder / f"python-{version}"
    fake.write_text(f"#!/bin/sh\necho {version}\n")
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("version", ["3.13.1", "3.10.14"])
def test_setup_refuses_another_python_before_making_the_venv(tmp_path: Path, version: str) -> None:
    venv = tmp_path / "venv"
    out = _make("setup", str(_fake_python(tmp_path, version)), venv)
    assert out.returncode != 0
    assert "needs Python 3.11 or 3.12" in out.stderr and f"is Python {version}." in out.stderr
    assert "make setup PYTHON=python3.12" in out.stderr
    assert not venv.exists()


def test_a_python_that_does_not_run_is_named(tmp_path: Path) -> None:
    out = _make("check-python", str(tmp_path / "no-such-python"), tmp_path / "venv")
    assert out.returncode != 0
    assert f"PYTHON={tmp_path / 'no-such-python'} is not a Python that runs here" in out.stderr


@pytest.mark.parametrize("version", ["3.11.0", "3.12.9"])
def test_the_supported_versions_pass(tmp_path: Path, version: str) -> None:
    out = _make("check-python", str(_fake_python(tmp_path, version)), tmp_path / "venv")
    assert (out.returncode, out.stderr) == (0, "")


def test_the_interpreter_running_the_tests_passes(tmp_path: Path) -> None:
    """The venv's own interpreter (a real one, 3.11 or 3.12 as pyproject.toml requires)."""
    out = _make("check-python", sys.executable, tmp_path / "venv")
    assert (out.returncode, out.stderr) == (0, "")

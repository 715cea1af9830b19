"""The ``loraswap`` entry point: building the parser and light commands import no heavy library, and
every subcommand's ``--help`` still shows its flags (``serve``'s are added on first use)."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import pytest

from loraswap.cli import build_parser, main

HEAVY = ("torch", "transformers", "peft", "bitsandbytes")

# What ``loraswap health`` does, in a fresh interpreter: then the heavy libraries it loaded.
HEALTH_THEN_MODULES = """
import sys
from loraswap.cli import build_parser, main
build_parser()
code = main(["health", sys.argv[1], "--timeout", "10"])
print(code, sorted(name for name in {heavy!r} if name in sys.modules))
"""


def _closed_port() -> int:
    """A local port nothing listens on (a connection to it is refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_building_the_parser_and_health_import_no_heavy_library() -> None:
    address = f"127.0.0.1:{_closed_port()}"
    out = subprocess.run(
        [sys.executable, "-c", HEALTH_THEN_MODULES.format(heavy=HEAVY), address],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.stdout == "1 []\n", out.stderr
    assert out.stderr.startswith(f"loraswap: error: health check of {address} failed: UNAVAILABLE")


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every subcommand path under ``parser`` (``("registry", "push")``, ...)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(*path, name), *_subcommands(sub, (*path, name))]
    return found


def test_every_subcommand_shows_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    paths = _subcommands(build_parser())
    assert {("health",), ("serve",), ("train",), ("merge",), ("registry", "push")} <= set(paths)
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0, path
        assert f"usage: loraswap {' '.join(path)}" in capsys.readouterr().out, path


def test_serve_flags_are_added_on_first_use(capsys: pytest.CaptureFixture[str]) -> None:
    """Parsing ``serve`` and showing its help each see the settings' flags, with nothing else done first."""
    args = build_parser().parse_args(["serve", "--adapter-slots", "3", "--port", "0"])
    assert (args.adapter_slots, args.port) == ("3", "0")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    serve = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[
        "serve"
    ]
    assert "--adapter-slots" in serve.format_help()
    assert "--adapter-slots" in serve.format_usage()

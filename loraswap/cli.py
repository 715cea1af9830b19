"""The ``loraswap`` command line: one entry point, a subcommand per area.

Each area module exposes ``add_commands(subparsers)``; a subcommand stores its handler in ``func``.
Heavy libraries (torch, transformers, peft) are imported inside handlers, so that building the parser,
``--help`` and light commands such as ``health`` import none of them. A subcommand whose flags come from
a heavy module (``serve``'s from the engine's configuration) passes ``populate=`` to ``add_parser``: its
flags are added the first time that subcommand parses or shows its help (:class:`DeferredParser`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from loraswap import __version__
from loraswap.errors import LoraswapError

# Modules that contribute subcommands; a module that is not there yet is skipped.
COMMAND_MODULES = (
    "loraswap.registry.cli",
    "loraswap.models.cli",
    "loraswap.server.cli",
    "loraswap.server.health_cli",
    "loraswap.trainer.cli",
    "loraswap.merge.cli",
)


class DeferredParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose arguments may be added on first use rather than when it is built.

    Args:
        populate: Called once with the parser, before it first parses or formats its usage or help;
            None: a plain parser.
    """

    def __init__(
        self, *args: Any, populate: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _ensure_populated(self) -> None:
        populate, self._populate = self._populate, None
        if populate is not None:
            populate(self)

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._ensure_populated()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._ensure_populated()
        return super().format_usage()

    def format_help(self) -> str:
        self._ensure_populated()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    """The ``loraswap`` parser, a subcommand per :data:`COMMAND_MODULES` entry (none imports torch)."""
    parser = argparse.ArgumentParser(
        prog="loraswap",
        description="Adapter registry and hot-swap multi-LoRA inference server.",
    )
    parser.add_argument("--version", action="version", version=f"loraswap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=DeferredParser)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_commands(subparsers)
    return parser


def quiet_third_party_notices() -> None:
    """Drop two third-party notices that tell a loraswap user nothing, narrowly (by logger or by
    message, category and module): bitsandbytes' "Failed to load CPU gemm_4bit_forward" line, logged
    on import on some CPUs, and the FutureWarning peft triggers by reading a deprecated transformers
    attribute."""
    from loraswap.models.quantization import quiet_bitsandbytes_import

    quiet_bitsandbytes_import()
    warnings.filterwarnings(
        "ignore",
        message="`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module="transformers.modeling_utils",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_third_party_notices()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LoraswapError as exc:
        print(f"loraswap: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loraswap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``loraswap`` command line: one entry point, a subcommand per area.

Each area module exposes ``add_commands(subparsers)``; a subcommand stores its handler in ``func``.
Heavy libraries (torch, transformers) are imported inside handlers so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraswap",
        description="Adapter registry and hot-swap multi-LoRA inference server.",
    )
    parser.add_argument("--version", action="version", version=f"loraswap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
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

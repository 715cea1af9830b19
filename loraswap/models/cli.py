"""``loraswap model …``: prepare and inspect base models."""

from __future__ import annotations

import argparse
import json


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="prepare and inspect base models")
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    prepare = sub.add_parser(
        "prepare",
        help="convert the embedded default model (once) or check a local model folder; print its details",
    )
    prepare.add_argument("--base", default="default", help="'default' (SmolLM2-135M-Instruct) or a folder")
    prepare.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    from loraswap.models import base_fingerprint, resolve_base

    ref = resolve_base(args.base)
    info = {"model_id": ref.model_id, "path": str(ref.path), "fingerprint": base_fingerprint(ref.path)}
    print(json.dumps(info, indent=2))
    return 0

"""``loraswap merge``: fold one or more adapters into a base model and write a standalone HF folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Merge LoRA adapters into the base model's own weights (in fp32) and write a standalone HF model folder
that plain transformers loads, with loraswap-merge.json recording exactly what was merged.

An --adapter is a local PEFT adapter folder (an existing path) or a registry reference (name, name:tag,
name@sha256:...). Methods (PEFT's add_weighted_adapter combinations):
  linear, ties, dare_linear, dare_ties, magnitude_prune   combine the A and B matrices separately
      (weights sqrt-split between them): every adapter needs the same rank and the same target modules;
      the result is not the weighted sum of the deltas
  cat            exact: the weighted sum of the deltas (ranks add up; any ranks and targets)
  svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd   combine the full deltas, then
      re-factor by a truncated SVD to --svd-rank (default: the largest adapter rank)
ties*, dare_* and magnitude_prune* need --density; ties and dare_ties elect signs (--majority-sign).
One adapter merges with linear: W + weight * scaling * B @ A."""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from loraswap.merge.methods import MAJORITY_SIGNS, METHODS

    parser = subparsers.add_parser(
        "merge",
        help="merge adapters into a base model (a standalone HF folder)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", default="default", metavar="MODEL", help="'default' (SmolLM2) or a folder")
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="REF",
        help="adapter folder or registry reference (repeat to merge several)",
    )
    parser.add_argument("--weights", metavar="W1,W2,...", help="one weight per adapter (default: 1.0 each)")
    parser.add_argument("--method", default="linear", metavar="M", help=f"one of: {', '.join(METHODS)}")
    parser.add_argument("--density", type=float, metavar="D", help="fraction of entries kept, in (0, 1]")
    parser.add_argument(
        "--majority-sign", choices=MAJORITY_SIGNS, help="sign election of ties/dare_ties (default total)"
    )
    parser.add_argument("--svd-rank", type=int, metavar="R", help="rank of an *svd method's delta")
    parser.add_argument("--svd-clamp", type=float, metavar="Q", help="clamp the SVD factors to quantile Q")
    parser.add_argument("--seed", type=int, metavar="N", help="seed of DARE's random masks (default 0)")
    parser.add_argument("--output", required=True, metavar="DIR", help="the merged model folder to create")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="weight dtype (default: base's)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--push", metavar="NAME[:TAG]", help="push the merged model to the registry")
    parser.add_argument(
        "--registry",
        metavar="URL",
        help="registry of references and --push (default: $LORASWAP_REGISTRY or local)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_merge)


def _weights(text: str | None) -> list[float] | None:
    from loraswap.errors import InvalidArgumentError

    if text is None:
        return None
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise InvalidArgumentError(f"--weights expects comma-separated numbers, got {text!r}") from None


def _push_target(spec: str) -> tuple[str, str | None]:
    """``NAME[:TAG]`` checked by the registry's rules (before the merge, not after it)."""
    from loraswap.registry.names import check_name, check_tag

    name, sep, tag = spec.partition(":")
    check_name(name)
    if sep:
        check_tag(tag)
    return name, tag if sep else None


def _merge(args: argparse.Namespace) -> int:
    from loraswap.errors import InvalidArgumentError
    from loraswap.merge import merge_adapters, resolve_adapter
    from loraswap.models import resolve_base
    from loraswap.registry import Registry, open_registry

    if args.push:
        _push_target(args.push)
    options = {
        "method": args.method,
        "weights": _weights(args.weights),
        "density": args.density,
        "majority_sign": args.majority_sign or "total",
        "svd_rank": args.svd_rank,
        "svd_clamp": args.svd_clamp,
        "seed": args.seed if args.seed is not None else 0,
        "dtype": args.dtype,
        "force": args.force,
        "progress": not args.quiet and sys.stderr.isatty(),
    }
    from loraswap.merge.methods import METHODS, check_params

    check_params(
        args.method,
        len(args.adapter),
        options["weights"],
        density=args.density,
        majority_sign=options["majority_sign"],
        svd_rank=args.svd_rank,
        svd_clamp=args.svd_clamp,
    )  # before any adapter is pulled
    spec = METHODS[args.method]
    if args.majority_sign and not spec.elects_sign:
        raise InvalidArgumentError(f"method {args.method!r} elects no signs: --majority-sign is not used")
    if args.seed is not None and spec.prune != "random":
        raise InvalidArgumentError(f"method {args.method!r} draws no random masks: --seed is not used by it")
    base = resolve_base(args.base)
    registry: Registry | None = None  # opened for the first reference that is not a folder
    sources = []
    for ref in args.adapter:
        if registry is None and not Path(ref).expanduser().is_dir():
            registry = open_registry(args.registry, progress=sys.stderr.isatty())
        sources.append(resolve_adapter(ref, registry))
    record = merge_adapters(base, sources, args.output, **options)
    adapters = ", ".join(f"{a.name}@{a.digest} x{a.weight:g}" for a in record.adapters)
    what = f"{record.method}, {record.dtype}, {record.merged_modules} weights"
    print(f"merged {adapters} into {args.output} ({what})")
    if args.push:
        manifest = open_registry(args.registry).push_model(args.output, args.push)
        print(f"pushed {manifest.name}@{manifest.digest}")
    return 0

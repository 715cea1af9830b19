"""``loraswap registry …``: push, pull, list, show, tag, untag, rm, gc, verify adapters and merged models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REGISTRY_HELP = (
    "registry URL: a folder, file:///path or s3://bucket/prefix "
    "(default: $LORASWAP_REGISTRY, else $LORASWAP_HOME/registry when set, else "
    "$XDG_DATA_HOME/loraswap/registry, i.e. ~/.local/share/loraswap/registry)"
)
REF_HELP = "adapter or model reference: NAME (= NAME:latest), NAME:TAG or NAME@sha256:HEX"
EPILOG = """\
S3: endpoint from $LORASWAP_S3_ENDPOINT or $AWS_ENDPOINT_URL, credentials from the standard AWS
variables; add ?conditional=false to an s3:// URL for stores that ignore If-Match/If-None-Match.
Requests give up after $LORASWAP_S3_CONNECT_TIMEOUT (5 s) to connect, $LORASWAP_S3_READ_TIMEOUT (60 s)
without a byte, $LORASWAP_S3_MAX_ATTEMPTS (3) tries.
refused (one line naming the problem, exit code 1, the store unchanged): links, pipes or devices in a
pushed folder; a pull into a file, a link or a non-empty folder (without --force); names, tags and
references that do not match their pattern exactly; adapters or models that fail validation; a
merged model pushed under an adapter's name (or the reverse).
examples:
  loraswap registry push ./out/adapter --name support-bot --tag prod --base default
  loraswap registry push --model ./out/merged support-bot-merged:v1
  loraswap registry pull support-bot:prod ./adapter
  loraswap registry show support-bot --json
"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``registry`` and its actions to the ``loraswap`` parser."""
    parser = subparsers.add_parser(
        "registry",
        help="push, pull and manage LoRA adapters and merged models in a registry",
        description="Store LoRA adapters and merged models as immutable, content-addressed versions "
        "with movable tags.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--registry", metavar="URL", default=None, help=REGISTRY_HELP)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="URL", default=argparse.SUPPRESS, help=REGISTRY_HELP)
    sub = parser.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    _add_push(sub, common)
    _add_read_actions(sub, common)
    _add_write_actions(sub, common)


def _add_push(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    push = sub.add_parser(
        "push",
        parents=[common],
        usage="%(prog)s DIR --name NAME [--tag TAG ...] [--base MODEL] [--description TEXT] [--max-bytes N]\n"
        "       %(prog)s --model DIR NAME[:TAG] [--tag TAG ...] [--description TEXT]",
        help="validate an adapter (or --model: a merged model) folder and store it as a new version "
        "(moves 'latest')",
        description="Validate a PEFT adapter folder (or, with --model, a merged model folder) and push "
        "it; prints the version's digest.",
    )
    push.add_argument(
        "folder",
        metavar="DIR | NAME[:TAG]",
        nargs="?",
        help="PEFT adapter folder (save_pretrained output); with --model: the model's NAME[:TAG]",
    )
    push.add_argument(
        "--model",
        metavar="DIR",
        type=Path,
        help="push this merged model folder (loraswap merge output: config, safetensors, tokenizer, "
        "loraswap-merge.json) as a model version",
    )
    push.add_argument("--name", help="adapter name: [a-z0-9][a-z0-9._-]{0,63}")
    push.add_argument("--tag", action="append", default=[], metavar="TAG", help="also set TAG (repeatable)")
    push.add_argument(
        "--base",
        metavar="MODEL",
        help="base model ('default' or an HF folder): check the adapter fits it, record its fingerprint",
    )
    push.add_argument("--description", metavar="TEXT", help="free text kept with the version")
    push.add_argument(
        "--max-bytes",
        type=int,
        metavar="N",
        help="largest adapter accepted, a positive number of bytes "
        "(default: $LORASWAP_MAX_ADAPTER_BYTES, else 2 GiB)",
    )
    push.set_defaults(func=_push)


def _add_read_actions(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    pull = sub.add_parser("pull", parents=[common], help="download a version (verified, cached)")
    pull.add_argument("ref", metavar="REF", help=REF_HELP)
    pull.add_argument(
        "dest",
        metavar="DEST",
        nargs="?",
        type=Path,
        help="copy the files into this new or empty folder (never a link or a file; default: cache only)",
    )
    pull.add_argument(
        "--force",
        action="store_true",
        help="DEST may hold other files: replace the adapter's files there (adapter_config.json, "
        "adapter_model.safetensors, README.md, training_metadata.json: written to temporary names, then "
        "renamed; links are replaced, never followed), remove those this version lacks, leave the rest",
    )
    pull.add_argument(
        "--rehash",
        action="store_true",
        help="hash the cached copy in full even if its file stats are unchanged (damage stat cannot see)",
    )
    pull.set_defaults(func=_pull)
    listing = sub.add_parser("list", parents=[common], help="list adapters, versions and tags")
    listing.add_argument("name", metavar="NAME", nargs="?", help="only this adapter")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_list)
    show = sub.add_parser(
        "show", parents=[common], help="print a version's manifest (incl. training lineage)"
    )
    show.add_argument("ref", metavar="REF", help=REF_HELP)
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_show)
    verify = sub.add_parser(
        "verify", parents=[common], help="re-hash everything; exit 1 if anything is corrupt"
    )
    verify.add_argument(
        "--cache",
        action="store_true",
        help="re-hash the local adapter and model caches instead of the registry; damaged copies are removed "
        "(their next pull fetches them again)",
    )
    verify.set_defaults(func=_verify)


def _add_write_actions(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    tag = sub.add_parser("tag", parents=[common], help="point a tag at a version")
    tag.add_argument("ref", metavar="REF", help=REF_HELP)
    tag.add_argument("tag", metavar="TAG", help="tag to set or move")
    tag.set_defaults(func=_tag)
    untag = sub.add_parser("untag", parents=[common], help="remove a tag (the version stays)")
    untag.add_argument("ref", metavar="NAME:TAG", help="the tag to remove")
    untag.set_defaults(func=_untag)
    rm = sub.add_parser("rm", parents=[common], help="delete a version (refused while tagged)")
    rm.add_argument("ref", metavar="REF", help=REF_HELP)
    rm.add_argument("--force", action="store_true", help="delete a tagged version and its tags")
    rm.set_defaults(func=_rm)
    gc = sub.add_parser("gc", parents=[common], help="delete blobs no version uses")
    gc.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="keep unreferenced blobs younger than this (pushes in progress; default 3600)",
    )
    gc.set_defaults(func=_gc)


def _open(args: argparse.Namespace, **options: object):
    from loraswap.registry import open_registry

    return open_registry(args.registry, progress=sys.stderr.isatty(), **options)


def _push(args: argparse.Namespace) -> int:
    from loraswap.errors import InvalidArgumentError
    from loraswap.models import resolve_base

    if args.model is not None:
        return _push_model(args)
    if args.folder is None or args.name is None:
        raise InvalidArgumentError(
            "push needs DIR --name NAME (or --model DIR NAME[:TAG] for a merged model)"
        )
    base = resolve_base(args.base) if args.base else None
    options = {"max_bytes": args.max_bytes} if args.max_bytes is not None else {}
    manifest = _open(args, **options).push(Path(args.folder), args.name, args.tag, base, args.description)
    tags = ", ".join(dict.fromkeys(["latest", *args.tag]))
    print(f"pushed {manifest.name}@{manifest.digest} ({manifest.size} bytes; tags: {tags})")
    return 0


def _push_model(args: argparse.Namespace) -> int:
    from loraswap.errors import InvalidArgumentError

    for option, value in (("--base", args.base), ("--max-bytes", args.max_bytes)):
        if value is not None:
            raise InvalidArgumentError(f"{option} applies to adapters, not to --model")
    if (args.folder is None) == (args.name is None):
        raise InvalidArgumentError("push --model DIR needs the model's NAME[:TAG] (once)")
    ref = args.folder if args.folder is not None else args.name
    manifest = _open(args).push_model(args.model, ref, args.description, tags=args.tag)
    own = [ref.partition(":")[2]] if ":" in ref else []
    tags = ", ".join(dict.fromkeys(["latest", *own, *args.tag]))
    print(f"pushed model {manifest.name}@{manifest.digest} ({manifest.size} bytes; tags: {tags})")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from loraswap.errors import InvalidArgumentError

    if args.force and args.dest is None:
        raise InvalidArgumentError("--force needs a DEST folder")
    print(_open(args).pull(args.ref, args.dest, rehash=args.rehash, force=args.force))
    return 0


def _warn(problems: list[str]) -> int:
    """Print skipped entries to stderr; the exit code (1 if there were any)."""
    for problem in problems:
        print(f"loraswap: warning: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _list(args: argparse.Namespace) -> int:
    problems: list[str] = []
    entries = _open(args).list(args.name, on_problem=problems.append)
    if args.json:
        rows = [{**e.manifest.to_dict(), "tags": list(e.tags)} for e in entries]
        print(json.dumps(rows, indent=2))
        return _warn(problems)
    print(f"{'NAME':<24} {'KIND':<7} {'DIGEST':<19} {'RANK':>4} {'SIZE':>12}  {'CREATED':<25} TAGS")
    for entry in entries:
        m = entry.manifest
        short, rank = m.digest[:19], m.rank if m.kind == "adapter" else "-"
        tags = ",".join(entry.tags)
        print(f"{m.name:<24} {m.kind:<7} {short:<19} {rank:>4} {m.size:>12}  {m.created:<25} {tags}")
    return _warn(problems)


def _show(args: argparse.Namespace) -> int:
    info = _open(args).resolve(args.ref, kind=None).to_dict()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("name", "kind", "digest", "created", "description", "size"):
        print(f"{key + ':':<18}{info[key]}")
    if info["kind"] == "model":
        return _show_model(info)
    adapter, base = info["adapter"], info["base"]
    print(f"{'rank / alpha:':<18}{adapter['rank']} / {adapter['alpha']} (rslora: {adapter['use_rslora']})")
    print(f"{'targets:':<18}{', '.join(adapter['target_modules'])}")
    print(f"{'dtype:':<18}{adapter['dtype']}")
    print(f"{'base:':<18}{base['model_id']} ({base['fingerprint'] or 'no fingerprint'})")
    print("files:")
    for entry in info["files"]:
        print(f"  {entry['path']:<28}{entry['size']:>12}  {entry['digest']}")
    training = info.get("training")
    print("training:" + (" none" if not training else "\n" + json.dumps(training, indent=2)))
    return 0


def _show_model(info: dict) -> int:
    model, base, lineage = info["model"], info["base"], info["lineage"]
    print(f"{'architecture:':<18}{model['architecture'] or '-'} ({model['model_type']})")
    print(f"{'dtype:':<18}{model['dtype']}")
    print(f"{'parameters:':<18}{model['parameters']}")
    sizes = ", ".join(f"{key} {model[key]}" for key in ("num_hidden_layers", "hidden_size", "vocab_size"))
    print(f"{'shape:':<18}{sizes}")
    print(f"{'base:':<18}{base['model_id']} ({base['fingerprint'] or 'no fingerprint'})")
    print("files:")
    for entry in info["files"]:
        print(f"  {entry['path']:<36}{entry['size']:>14}  {entry['digest']}")
    if not lineage:
        print("lineage: none (no loraswap-merge.json)")
        return 0
    print(f"lineage:\n  {'method:':<16}{lineage['method']} {json.dumps(lineage['parameters'])}")
    for adapter in lineage["adapters"]:
        what = adapter["ref"] or adapter["name"] or "-"
        print(f"  {'adapter:':<16}{adapter['weight']:g} x {what} {adapter['digest']}")
    by = f"loraswap {lineage['loraswap_version']} at {lineage['created']} (dtype {lineage['dtype']})"
    print(f"  {'merged by:':<16}{by}")
    return 0


def _tag(args: argparse.Namespace) -> int:
    manifest = _open(args).tag(args.ref, args.tag)
    print(f"tagged {manifest.name}@{manifest.digest} as {manifest.name}:{args.tag}")
    return 0


def _untag(args: argparse.Namespace) -> int:
    from loraswap.errors import InvalidArgumentError

    name, sep, tag = args.ref.partition(":")
    if not sep:
        raise InvalidArgumentError(f"untag needs NAME:TAG, got {args.ref!r}")
    _open(args).untag(name, tag)
    print(f"removed tag {name}:{tag}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    manifest = _open(args).rm(args.ref, force=args.force)
    print(f"removed {manifest.name}@{manifest.digest} (run `loraswap registry gc` to free its blobs)")
    return 0


def _gc(args: argparse.Namespace) -> int:
    report = _open(args).gc(grace_seconds=args.grace)
    print(
        f"removed {len(report.removed)} blobs ({report.freed_bytes} bytes); "
        f"kept {report.kept_young} unreferenced blobs younger than {args.grace:g}s"
    )
    return _warn(report.problems)


def _verify(args: argparse.Namespace) -> int:
    registry = _open(args)
    if args.cache:
        return _verify_cache(registry)
    problems = registry.verify()
    for problem in problems:
        print(problem)
    if problems:
        print(f"loraswap: error: {len(problems)} problems in {registry.url}", file=sys.stderr)
        return 1
    print(f"{registry.url}: ok")
    return 0


def _verify_cache(registry) -> int:
    from loraswap import paths

    report = registry.verify_cache()
    for problem in report.problems:
        print(problem)
    for digest in report.unverified:
        print(f"cached version {digest}: no manifest found to check it against; its next pull hashes it")
    cache = f"{paths.adapter_cache_dir()} and {paths.model_cache_dir()}"
    if report.problems:
        print(f"loraswap: error: {len(report.problems)} damaged versions in {cache}", file=sys.stderr)
        return 1
    print(f"{cache}: ok ({len(report.intact)} versions hashed)")
    return 0

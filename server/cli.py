"""``loraswap serve | generate | adapters … | info``: run the server and talk to it.

Client commands take ``--target`` (env ``LORASWAP_TARGET``), ``--token`` (env ``LORASWAP_TOKEN``; admin
commands read ``LORASWAP_ADMIN_TOKEN`` first) and TLS options.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict

DEFAULT_TARGET = "127.0.0.1:50051"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the gRPC inference server",
        description="Run the gRPC inference server. Settings: flags > LORASWAP_* env > --config YAML "
        "> defaults.",
        populate=_serve_arguments,  # on first use: the settings import the engine's config, and torch
    )
    serve.set_defaults(func=_serve)

    gen = subparsers.add_parser(
        "generate", help="generate text on a running server (streams to the terminal)"
    )
    _client_args(gen, admin=False)
    gen.add_argument("prompt", help="prompt text ('-' reads stdin)")
    gen.add_argument(
        "--adapter", default="", help="adapter reference: name, name:tag or name@sha256:… (empty = base)"
    )
    gen.add_argument("--chat", action="store_true", help="send the prompt as one user chat message")
    gen.add_argument("--max-new-tokens", type=int, default=0, help="0 = the server's default")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument(
        "--json", action="store_true", help="print the final result as JSON instead of streaming"
    )
    gen.set_defaults(func=_generate)

    adapters = subparsers.add_parser("adapters", help="manage adapters resident on a running server")
    sub = adapters.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    lst = sub.add_parser("list", help="adapters the server knows, with their tiers")
    _client_args(lst, admin=True)
    lst.set_defaults(func=_adapters_list)
    load = sub.add_parser("load", help="warm an adapter into a tier ahead of traffic")
    _client_args(load, admin=True)
    load.add_argument("ref")
    load.add_argument("--tier", choices=("device", "host", "disk"), default="device")
    load.set_defaults(func=_adapters_action, action="load")
    for action, text in (
        ("unload", "drop from every tier"),
        ("pin", "keep on device"),
        ("unpin", "allow eviction"),
    ):
        p = sub.add_parser(action, help=text)
        _client_args(p, admin=True)
        p.add_argument("ref")
        p.set_defaults(func=_adapters_action, action=action)

    for action, text in (
        ("promote", "merge into a route of its own (no LoRA work per token) and switch its requests there"),
        ("demote", "send its requests back to the shared base and free its route"),
    ):
        p = sub.add_parser(action, help=text)
        _client_args(p, admin=True)
        p.add_argument("ref")
        p.set_defaults(func=_route_action, action=action)

    routes = subparsers.add_parser("routes", help="the routes of a running server to merged models")
    _client_args(routes, admin=True)
    routes.set_defaults(func=_routes)

    info = subparsers.add_parser("info", help="base model, device, capacities and limits of a running server")
    _client_args(info, admin=True)
    info.set_defaults(func=_info)


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from loraswap.server.settings import add_arguments

    add_arguments(parser)


def _client_args(parser: argparse.ArgumentParser, admin: bool) -> None:
    env_token = "LORASWAP_ADMIN_TOKEN or LORASWAP_TOKEN" if admin else "LORASWAP_TOKEN"
    parser.add_argument(
        "--target", default=None, help=f"server host:port (env LORASWAP_TARGET; {DEFAULT_TARGET})"
    )
    parser.add_argument("--token", default=None, help=f"bearer token (env {env_token})")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca", default=None, help="PEM CA bundle of the server certificate (implies --tls)")
    parser.add_argument("--cert", default=None, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--key", default=None, help="PEM key of --cert")
    parser.add_argument("--timeout", type=float, default=None, help="deadline per call, seconds")
    parser.set_defaults(admin_token=admin)


def _client(args: argparse.Namespace):  # -> Client
    from loraswap.server.grpc.client import Client

    token = args.token
    if token is None and args.admin_token:
        token = os.environ.get("LORASWAP_ADMIN_TOKEN")
    if token is None:
        token = os.environ.get("LORASWAP_TOKEN")
    target = args.target or os.environ.get("LORASWAP_TARGET") or DEFAULT_TARGET
    return Client(
        target,
        token=token,
        tls=args.tls,
        root_certificates=args.ca,
        client_cert=args.cert,
        client_key=args.key,
        timeout=args.timeout,
    )


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from loraswap.server.grpc.server import serve
    from loraswap.server.settings import flags_from_args, load_settings

    settings = load_settings(flags_from_args(args), config_file=args.config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    status = serve(settings, stop)
    # serve() has drained and closed everything it owns. Worker threads still inside a registry pull or a
    # merge would hold the interpreter's exit (it joins pool threads) past the grace period the operator
    # set, so leave now: the supervisor's SIGKILL must never be what stops us.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


def _generate(args: argparse.Namespace) -> int:
    from loraswap.server.engine.api import ChatMessage, SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    kwargs = {"adapter": args.adapter, "sampling": sampling}
    if args.chat:
        kwargs["messages"] = [ChatMessage("user", prompt)]
    else:
        kwargs["prompt"] = prompt
    with _client(args) as client:
        if args.json:
            print(json.dumps(asdict(client.generate(**kwargs)), indent=2))
            return 0
        for event in client.stream(**kwargs):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            if event.result is not None:
                r = event.result
                print(
                    f"\n[{r.finish_reason}; {r.prompt_tokens} prompt + {r.completion_tokens} generated; "
                    f"ttft {r.timings.ttft_s:.3f}s, total {r.timings.total_s:.3f}s]",
                    file=sys.stderr,
                )
    return 0


def _adapters_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        adapters = client.list_adapters()
    print(f"{'NAME':24} {'DIGEST':20} {'TIERS':18} {'PIN':4} {'RANK':>4} {'BYTES':>10} {'HITS':>6}")
    for a in adapters:
        digest = a.digest.removeprefix("sha256:")[:12]
        pin = "yes" if a.pinned else ""
        tiers = ",".join(a.tiers)
        print(f"{a.name:24} {digest:20} {tiers:18} {pin:4} {a.rank:>4} {a.size_bytes:>10} {a.hits:>6}")
    return 0


def _adapters_action(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "load":
            status = client.load_adapter(args.ref, args.tier)
        elif args.action == "unload":
            client.unload_adapter(args.ref)
            print(f"unloaded {args.ref}")
            return 0
        else:
            status = client.pin(args.ref) if args.action == "pin" else client.unpin(args.ref)
    print(json.dumps(asdict(status), indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(asdict(client.info()), indent=2))
    return 0


def _route_action(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "promote":
            print(json.dumps(asdict(client.promote(args.ref)), indent=2))
        else:
            print(f"demoted {args.ref}: {client.demote(args.ref)} bytes freed")
    return 0


def _routes(args: argparse.Namespace) -> int:
    with _client(args) as client:
        routes = client.routes()
    print(f"{'ADAPTER':24} {'STATE':8} {'VERSION':14} {'METHOD':8} {'BYTES':>12} {'PROMOTED':8} MODEL")
    for r in routes:
        version = r.adapter_digest.removeprefix("sha256:")[:12] or "(by name)"
        held = r.weights_bytes + r.kv_cache_bytes
        promoted = "yes" if r.promoted else ""
        print(f"{r.adapter:24} {r.state:8} {version:14} {r.method:8} {held:>12} {promoted:8} {r.model}")
    return 0

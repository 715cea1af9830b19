"""Chaos soak (issue 23, "never hang, never lose"): clients on ``loraswap serve`` under injected faults.

Many clients use the server while the registry's S3 endpoint, the server and its disk cache fail on a
schedule.

A real server (``loraswap serve`` in a subprocess, fp32) serves random rank-8 PEFT adapters from an S3
registry (moto's server in its own process, behind a TCP proxy the bench controls). Clients (one gRPC
channel each, a deadline on every request) ask for ``name:prod``, ``name``, ``name@digest`` and scratch
names, a share of them streaming, greedy with EOS ignored. Meanwhile a tag mover, a pusher and
``rm`` + ``gc`` change the registry, and the faults of :mod:`bench.chaos_faults` happen at fixed places
of the run: the endpoint stalled, refused, reset, blackholed and killed (its objects kept), the server
SIGKILLed during an adapter download and started again, cached files damaged.

Reported (:mod:`bench.chaos_check`): outcomes by gRPC code; answers checked token by token against
PEFT with the version the server names in the result; requests lost (NOT_FOUND for an adapter never
removed) and hung (no answer nor status within the deadline plus a margin, or still inside the server
at the end); the server's RSS at every ``--rss-every`` requests and its least-squares slope over the
last half; ``loraswap registry verify`` at the end. Exits 1 when anything hung, any answer is wrong,
anything was lost, the server crashed on its own, the slope is 1 MiB per thousand requests or more,
or verify is not clean.

Run: ``python -m bench.chaos [--requests 10000 --clients 64 --adapters 32] [--base default|tiny|DIR]
[--out results.json] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.chaos_check import (
    AnswerCheck,
    Outcome,
    check_answers,
    classify,
    fault_outcomes,
    last_half,
    rss_slope,
    table,
    trace,
)
from bench.chaos_control import FaultController, Rig, schedule
from bench.chaos_faults import KINDS, PROD, Catalog, Churn, ServerSupervisor
from bench.chaos_load import Load, LoadSettings, RssSampler, stuck_at_end
from bench.chaos_net import CREDENTIALS, FaultProxy, MotoServer, free_port
from bench.grpc_load import PROMPTS as LOAD_PROMPTS
from loraswap.models import resolve_base

PROMPTS = [*LOAD_PROMPTS, "0123456789", "Rome is the capital of", "The lazy dog"]
TARGETS = ("q_proj", "v_proj")
RANK = 8
BUCKET, PREFIX = "chaos-registry", "reg"
FULL_FAULTS = [
    "s3-stall", "server-kill", "cache-overwrite", "s3-refuse", "s3-kill", "cache-truncate", "server-kill",
    "s3-blackhole", "s3-reset", "cache-replace", "s3-kill", "s3-stall", "cache-overwrite", "s3-blackhole",
    "s3-refuse",
]  # fmt: skip
FULL_KILL_LAST = 0.35  # server kills only before this fraction: the last half's RSS is one process's
FULL = {
    "requests": 10_000, "clients": 64, "adapters": 32, "base": "default", "window": 8.0, "rss_every": 1000,
    "slots": 8, "batch": 32, "rate": 0.0, "deadline": 30.0, "margin": 15.0, "churn_period": 1.5,
    "gc_grace": 120.0,
}  # fmt: skip
QUICK = {
    "requests": 72, "clients": 8, "adapters": 4, "base": "tiny", "window": 1.0, "rss_every": 12, "slots": 2,
    "batch": 8, "rate": 12.0, "deadline": 10.0, "margin": 5.0, "churn_period": 0.5, "gc_grace": 30.0,
}  # fmt: skip
SIZES = (
    ("requests", int, "requests in all"),
    ("clients", int, "concurrent clients, one channel each"),
    ("adapters", int, "served adapter names (a quarter with three versions)"),
    ("base", str, "'default' (embedded SmolLM2), 'tiny' (random tiny Llama) or a model folder"),
    ("window", float, "seconds an S3 outage lasts"),
    ("rss_every", int, "requests between RSS samples"),
    ("slots", int, "the server's adapter slots"),
    ("batch", int, "the server's max batch size"),
    ("rate", float, "requests per second over all clients (0: closed loop)"),
    ("deadline", float, "every request's deadline, seconds"),
    ("margin", float, "past the deadline by this much with no outcome, a request is hung"),
    ("churn_period", float, "seconds between tag moves (pushes every 2, rm + gc every 3)"),
    ("gc_grace", float, "gc's grace period, seconds"),
)
"""The options whose defaults :data:`FULL` and :data:`QUICK` give: (name, type, help)."""


def full_plan(requests: int) -> list[tuple[int, str]]:
    """The full run's faults: the server kills between 10 % of the run and ``FULL_KILL_LAST``, the others
    between 4 % and 90 %."""
    kills = [k for k in FULL_FAULTS if k == "server-kill"]
    others = [k for k in FULL_FAULTS if k != "server-kill"]
    return sorted(schedule(kills, requests, 0.1, FULL_KILL_LAST) + schedule(others, requests, 0.04, 0.9))


def make_adapters(base_dir: Path, out: Path, count: int, seed: int) -> list[Path]:
    """``count`` random rank-8 PEFT LoRA adapters for ``base_dir`` (A and B drawn at random, no training),
    each saved with ``save_pretrained``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGETS), lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    folders = []
    for i in range(count):
        generator = torch.Generator().manual_seed(seed * 100_003 + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:  # A: [rank, in], B: [out, rank]
                    fan_in = param.shape[1]
                    param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
        folders.append(out / f"adapter-{i:03d}")
        peft_model.save_pretrained(folders[-1])
    return folders


def writer_registry(endpoint: str) -> Any:
    """The registry the bench writes with: through the proxy, with short S3 timeouts and one retry."""
    import boto3
    from botocore.config import Config

    from loraswap.registry import Registry
    from loraswap.registry.s3_store import S3Store

    config = Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"})
    client = boto3.client("s3", endpoint_url=endpoint, config=config, **CREDENTIALS)
    return Registry(S3Store(BUCKET, PREFIX, client=client))


def prepare(work: Path, base_dir: Path, registry: Any, adapters: int, cold: int, seed: int) -> Catalog:
    """Make and push the adapters: ``adapters`` served names (every fourth with two more versions, one
    of them tagged ``prod``), scratch names for the pusher and remover, ``cold`` never-requested ones."""
    extra, scratch = adapters // 4, max(2, adapters // 8)
    folders = make_adapters(base_dir, work / "adapters", adapters + 2 * extra + 2 * scratch + cold, seed)
    base, catalog = resolve_base(base_dir), Catalog()

    def push(name: str, folder: Path, tags: tuple[str, ...] = ()) -> str:
        digest = registry.push(folder, name, tags=list(tags), base=base).digest
        catalog.record(name, digest, folder)
        return digest

    for i in range(adapters):
        name = f"chaos-{i:02d}"
        more = [folders.pop() for _ in range(2)] if i < extra else []
        catalog.served[name] = [push(name, f) for f in more] + [push(name, folders.pop(0), (PROD,))]
    for i in range(scratch):
        name = f"scratch-{i}"
        catalog.scratch[name] = [folders.pop(0), folders.pop(0)]
        push(name, catalog.scratch[name][0], (PROD,))
    for i in range(cold):
        name = f"cold-{i}"
        catalog.cold.append((name, push(name, folders.pop(0))))
    return catalog


def make_jobs(catalog: Catalog, requests: int, seed: int, stream_share: float) -> list[Outcome]:
    """The requests, in order: mostly served names (``name:prod``, ``name``, ``name@digest``), a few
    scratch names."""
    rnd, served, scratch = random.Random(seed), sorted(catalog.served), sorted(catalog.scratch)
    jobs = []
    for i in range(requests):
        if scratch and rnd.random() < 0.08:
            name = rnd.choice(scratch)
            ref, kind = (f"{name}:{PROD}" if rnd.random() < 0.5 else name), "scratch"
        else:
            name, pick = rnd.choice(served), rnd.random()
            kind = "tag" if pick < 0.4 else "latest" if pick < 0.7 else "digest"
            version = rnd.choice(catalog.served[name])
            ref = {"tag": f"{name}:{PROD}", "latest": name, "digest": f"{name}@{version}"}[kind]
        jobs.append(Outcome(i, ref, name, kind, rnd.choice(PROMPTS), rnd.random() < stream_share))
    return jobs


def quick_plan(requests: int) -> list[tuple[int, str]]:
    """The quick run's faults: each kind once, the server kill third (something is cached by then)."""
    kinds = [k for k in KINDS if k != "server-kill"]
    return schedule([*kinds[:2], "server-kill", *kinds[2:]], requests, 0.04, 0.9)


def base_folder(spec: str, work: Path) -> Path:
    """``tiny`` (a random tiny Llama built in ``work``), ``default`` (the embedded SmolLM2) or a folder."""
    if spec == "tiny":
        from loraswap.devtools.tiny import build_tiny_llama

        return build_tiny_llama(work / "tiny")
    return resolve_base(spec).path


def server_args(base_dir: Path, url: str, args: argparse.Namespace, host_bytes: int) -> list[str]:
    """``loraswap serve`` flags: fp32, fixed ports, fewer slots than adapters, a host cache of about
    ``host_bytes`` so that adapters keep coming back from disk, tags trusted for 2 s."""
    flags = {
        "--base": base_dir, "--registry": url, "--port": free_port(), "--metrics-port": free_port(),
        "--quantization": "fp32", "--adapter-slots": args.slots, "--max-rank": RANK,
        "--max-batch-size": args.batch, "--max-seq-len": 128, "--max-queue": 4 * args.clients,
        "--host-cache-bytes": host_bytes, "--tag-ttl-s": 2,
    }  # fmt: skip
    return [str(part) for flag, value in flags.items() for part in (flag, value)]


def run_verify(url: str, endpoint: str) -> dict[str, Any]:
    """``loraswap registry verify`` on the registry (straight to moto): its exit code and output."""
    command = [sys.executable, "-m", "loraswap.cli", "registry", "--registry", url, "verify"]
    done = subprocess.run(command, env=s3_env(endpoint), capture_output=True, text=True, timeout=600)
    return {"exit_code": done.returncode, "output": (done.stdout + done.stderr)[-4000:]}


@contextlib.contextmanager
def work_folder(path: Path | None) -> Iterator[Path]:
    """``path`` (kept), or a temporary folder (removed)."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="loraswap-chaos-") as tmp:
        yield Path(tmp)


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Set everything up, run the load under the faults, take everything down; the raw figures."""
    base_dir = base_folder(args.base, work)
    moto = MotoServer(work / "moto.log")
    moto.start()
    try:
        moto.client().create_bucket(Bucket=BUCKET)
        proxy = FaultProxy(moto.port)
        try:
            return _soak(args, work, base_dir, moto, proxy)
        finally:
            proxy.close()
    finally:
        moto.kill()


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment of a process that uses the registry at ``endpoint`` (moto's credentials)."""
    return {
        **os.environ,
        "LORASWAP_S3_ENDPOINT": endpoint,
        "AWS_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": CREDENTIALS["region_name"],
    }


def _soak(args: argparse.Namespace, work: Path, base_dir: Path, moto: MotoServer, proxy: FaultProxy) -> dict:
    registry, url = writer_registry(proxy.url), f"s3://{BUCKET}/{PREFIX}"
    plan = quick_plan(args.requests) if args.quick else full_plan(args.requests)
    plan = [(at, kind) for at, kind in plan if kind in args.faults]
    cold = sum(kind == "server-kill" for _, kind in plan)
    catalog = prepare(work, base_dir, registry, args.adapters, cold, args.seed)
    size = max(p.joinpath("adapter_model.safetensors").stat().st_size for p in catalog.folders.values())
    env = {**s3_env(proxy.url), "LORASWAP_HOME": str(work / "server-home")}
    host_bytes = (args.slots + max(2, args.adapters // 8)) * size
    flags = server_args(base_dir, url, args, host_bytes)
    server = ServerSupervisor(flags, env, work / "server-home", work / "logs")
    churn = Churn(registry, catalog, resolve_base(base_dir), args.churn_period, args.gc_grace, args.seed)
    rig = Rig(proxy, moto, BUCKET, server, churn, catalog, args.window, args.deadline)
    try:
        server.start()
        raw = drive(args, rig, plan)
    finally:
        churn.stop()
        exit_code = server.stop()
    raw["server"]["exit_code"] = exit_code
    suspects = frozenset(
        f["detail"].get("digest", "") for f in raw["faults"] if f["kind"].startswith("cache")
    )
    how = AnswerCheck(base_dir, args.new_tokens, args.tie_tolerance, args.max_references, suspects, args.seed)
    raw["answers"] = check_answers(raw["outcomes"], catalog, how)
    raw["verify"] = run_verify(url, moto.url)
    raw["moto_starts"] = moto.starts
    return raw


def drive(args: argparse.Namespace, rig: Rig, plan: list[tuple[int, str]]) -> dict[str, Any]:
    """The load, the faults and the churn, from start to end; what the server holds at the end."""
    began = time.monotonic()
    clock = lambda: time.monotonic() - began  # noqa: E731
    controller = FaultController(rig, plan, args.seed, clock)
    settings = LoadSettings(args.clients, args.deadline, args.margin, args.new_tokens, args.rate)
    jobs = make_jobs(rig.catalog, args.requests, args.seed, args.stream_share)
    load = Load(rig.server.server.target, jobs, settings, controller, clock)  # type: ignore[union-attr]
    sampler = RssSampler(rig.server, args.rss_every, lambda: load.completed)
    sampler.start()
    rig.churn.start()
    controller.start()
    outcomes = load.run()
    wall = clock()
    controller.join()
    rig.churn.stop()
    sampler.stop()
    server = rig.server
    stuck = stuck_at_end(server.server.metrics_url, args.margin)  # type: ignore[union-attr, arg-type]
    counts = {"starts": server.starts, "kills": server.kills, "crashes": server.crashes}
    return {
        "wall_s": round(wall, 1),
        "outcomes": outcomes,
        "faults": [asdict(r) for r in controller.records],
        "churn": {"done": dict(rig.churn.done), "errors": dict(rig.churn.errors)}
        | {"unexpected": rig.churn.unexpected[:20]},
        "server": {**counts, "startup_s": server.startup_s, "stuck_at_end": stuck},
        "rss_samples": sampler.samples,
    }


def report(args: argparse.Namespace, raw: dict[str, Any]) -> dict[str, Any]:
    """The figures and the verdict (``checks``: True passed, False failed, None not applicable)."""
    outcomes: list[Outcome] = raw.pop("outcomes")
    counts = classify(outcomes)
    fault_outcomes(raw["faults"], outcomes)
    points = last_half(raw["rss_samples"], args.requests)
    slope = rss_slope(points)
    span = points[-1][0] - points[0][0] if points else 0
    rss_ok = None if span < args.rss_min_span or slope is None else slope < 1.0
    server = raw["server"]
    checks = {
        "hung": counts["hung"] == 0 and server["stuck_at_end"] == 0,  # -1: could not tell
        "wrong": not raw["answers"]["wrong"],
        "lost": counts["lost"] == 0,
        "crashes": not server["crashes"],
        "rss": rss_ok,
        "verify": raw["verify"]["exit_code"] == 0,
    }
    config = {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}
    rss = {
        "samples": raw.pop("rss_samples"),
        "last_half": points,
        "slope_mib_per_1000": None if slope is None else round(slope, 3),
        "min_span": args.rss_min_span,
    }
    return {
        "config": config, "requests": len(outcomes), **raw, "outcomes": counts, "rss": rss,
        "checks": checks, "passed": all(v is not False for v in checks.values()), "trace": trace(outcomes),
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = parser.add_argument_group("sizes (defaults: the full soak, or --quick's)")
    for key, kind, text in SIZES:
        help_text = f"{text} (full: {FULL[key]}; --quick: {QUICK[key]})"
        preset.add_argument("--" + key.replace("_", "-"), type=kind, default=None, help=help_text)
    parser.add_argument("--quick", action="store_true", help="a small run of every fault once (tiny model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--faults",
        type=lambda text: [k for k in text.split(",") if k],
        default=list(KINDS),
        help=f"the fault kinds to inject, comma-separated (default all: {','.join(KINDS)}; '' for none)",
    )
    parser.add_argument("--new-tokens", type=int, default=4, help="tokens per answer (greedy)")
    parser.add_argument("--stream-share", type=float, default=0.25, help="share of requests that stream")
    parser.add_argument("--tie-tolerance", type=float, default=1e-3, help="logit gap of a near tie")
    refs = "most (version, prompt) pairs whose answers are checked token by token against PEFT"
    parser.add_argument("--max-references", type=int, default=160, help=refs)
    span = "fewest requests the last half must span for the RSS check"
    parser.add_argument("--rss-min-span", type=int, default=2000, help=span)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the work files (logs) here")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.requests < 1 or args.clients < 1 or args.adapters < 1:
        parser.error("--requests, --clients and --adapters need values >= 1")
    if unknown := set(args.faults) - set(KINDS):
        parser.error(f"unknown fault kinds {sorted(unknown)}; the kinds are {', '.join(KINDS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with work_folder(args.workdir) as work:
        result = report(args, soak(args, work))
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Ray Serve scale-out: adapter loads and throughput with 2 engine replicas against 1, on the same traffic.

One local Ray cluster (127.0.0.1), a local registry of ``--adapters`` adapters for the tiny random Llama
(or ``--base`` a folder), and for each replica count a fresh application behind Ray Serve's gRPC proxy.
Each run warms every adapter with one request, then ``--clients`` threads send the same seeded
mixed-adapter sequence of ``--requests`` requests (``--tokens`` greedy tokens each). The table gives
the failures, the multiplexed loads per adapter across replicas (1.0 = each adapter loaded on one
replica only), and the generated tokens per second of the timed phase. On a machine with fewer cores
than replicas need, throughput cannot scale; the loads column is what shows the affinity.

Run: ``python -m bench.ray_bench [--requests 400] [--clients 8] [--adapters 6] [--replicas 1,2]``.
"""

from __future__ import annotations

import argparse
import itertools
import random
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: argparse.Namespace, replicas: int, base: Path, registry_url: str, sequence: list[str]) -> dict:
    import grpc
    from ray import serve

    from loraswap.server.engine import EngineConfig
    from loraswap.server.grpc.pb import inference_pb2, inference_pb2_grpc
    from loraswap.server.ray.app import build
    from loraswap.server.ray.config import APP_NAME, RayAppConfig
    from loraswap.server.ray.deployment import REPLICA_DEPLOYMENT
    from loraswap.server.settings import ServeSettings

    engine = EngineConfig(
        base=str(base), quantization="fp32", registry=registry_url, adapter_slots=args.adapters,
        max_rank=8, max_batch_size=16, max_seq_len=128,
    )  # fmt: skip
    settings = ServeSettings(engine=engine, metrics_port=-1)
    config = RayAppConfig(min_replicas=replicas, max_replicas=replicas, replica_cpus=1.0)
    serve.run(build(config, settings), name=APP_NAME, route_prefix="/")
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{args.grpc_port}"))

    def call(ref: str) -> int:
        request = inference_pb2.GenerateRequest(
            adapter=ref, prompt="hello there", max_new_tokens=args.tokens, sampling={"ignore_eos": True}
        )
        return stub.Generate(request, timeout=300).usage.completion_tokens

    for ref in sorted(set(sequence)):
        call(ref)
    failures: Counter[str] = Counter()
    tokens = [0]
    lock = threading.Lock()
    index = itertools.count()

    def client() -> None:
        while (i := next(index)) < len(sequence):
            try:
                n = call(sequence[i])
            except grpc.RpcError as exc:
                with lock:
                    failures[exc.code().name] += 1
                continue
            with lock:
                tokens[0] += n

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=APP_NAME)
    reports: dict = {}
    while len(reports) < replicas:
        report = handle.describe.remote().result(timeout_s=120)
        reports[report.replica_id] = report
    loads = Counter()
    for report in reports.values():
        loads.update(report.loads)
    serve.delete(APP_NAME)
    return {
        "replicas": replicas,
        "failures": sum(failures.values()),
        "loads": sum(loads.values()),
        "loads_per_adapter": sum(loads.values()) / args.adapters,
        "max_loads": max(loads.values()),
        "tokens_s": tokens[0] / seconds,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts, run in turn")
    parser.add_argument("--base", default=None, help="a local HF Llama folder (default: the tiny random one)")
    parser.add_argument("--cpus", type=int, default=4, help="CPUs of the local Ray cluster")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.grpc_port = _free_port()

    import ray
    from ray import serve

    from loraswap.devtools.tiny import build_tiny_llama, make_peft_adapter
    from loraswap.models import resolve_base
    from loraswap.registry import open_registry
    from loraswap.server.ray.app import grpc_options

    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    base = Path(args.base) if args.base else build_tiny_llama(work / "base")
    registry_url = f"file://{work / 'registry'}"
    registry = open_registry(registry_url)
    names = [f"bench{i}" for i in range(args.adapters)]
    for seed, name in enumerate(names):
        registry.push(make_peft_adapter(base, work / name, r=8, seed=seed), name, base=resolve_base(base))
    rng = random.Random(args.seed)
    sequence = [rng.choice(names) for _ in range(args.requests)]  # the same traffic for every run
    env = {"LORASWAP_HOME": str(work / "home")}
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, runtime_env={"env_vars": env})
    rows = []
    try:
        serve.start(grpc_options=grpc_options(args.grpc_port), http_options={"host": "127.0.0.1", "port": 0})
        for replicas in (int(r) for r in args.replicas.split(",")):
            rows.append(_run(args, replicas, base, registry_url, sequence))
    finally:
        serve.shutdown()
        ray.shutdown()
    shape = f"{args.requests} requests x {args.tokens} tokens, {args.adapters} adapters"
    shape += f", {args.clients} clients"
    print(f"\n{shape}")
    print("| replicas | failures | loads | loads/adapter | max loads of one adapter | tokens/s | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['replicas']} | {r['failures']} | {r['loads']} | {r['loads_per_adapter']:.2f} | "
            f"{r['max_loads']} | {r['tokens_s']:.0f} | {r['seconds']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

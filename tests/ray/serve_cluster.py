"""The Ray Serve cluster of the tests in this folder (one per module, the ``cluster`` fixture of conftest.py):
a local Ray cluster on 127.0.0.1, two
engine replicas sharing one S3 registry (moto in server mode), Ray Serve's gRPC and HTTP proxies, the
application built by the Serve builder from its ``args``, with the bearer tokens given as an operator
gives them (``LORASWAP_INFERENCE_TOKENS`` / ``LORASWAP_ADMIN_TOKENS`` in the builder's environment).

Nothing here imports ``ray``, ``boto3`` or ``moto`` at module level: the test modules skip themselves
when the extras are missing. The test modules import the constants and helpers from here.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from loraswap.devtools.tiny import make_peft_adapter
from loraswap.models import resolve_base
from loraswap.registry import open_registry
from loraswap.server.grpc.client import Client
from loraswap.server.grpc.pb import inference_pb2, inference_pb2_grpc
from loraswap.server.ray.config import APP_NAME
from loraswap.server.ray.deployment import REPLICA_DEPLOYMENT, ReplicaReport

ADAPTERS = [f"task{i}" for i in range(4)]
SETTLE_S = 120.0  # upper bound of polls that wait for Ray to act (replicas up, tags re-resolved)
INFERENCE_TOKEN, ADMIN_TOKEN = "ray-inference-token", "ray-admin-token"
MAX_SEQ_LEN = 384  # room for a generation far longer than the test's steps around it


def free_port() -> int:
    """A free port below the kernel's ephemeral range. A port the kernel picked (bind to 0) is one it
    may also hand out as the source port of any outgoing connection (Ray opens many while it starts)
    before Ray's proxy binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(20000, min(low, 32768)), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def wait_for_http(url: str) -> None:
    """Until Ray Serve's HTTP proxy answers its health route (bounded attempts, short timeouts)."""
    last: Exception | None = None
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"{url}/-/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"Ray Serve's HTTP proxy never answered on {url}: {last}")


def warm_http_app(url: str, attempts: int = 6, timeout: float = 20.0) -> int:
    """Until the application answers through Ray's HTTP proxy (``/v1/models``, which asks a replica for
    the engine info first); the attempts it took. The proxy's health route answers before the proxy has
    a working route to the application: once in a long suite the first request through it was never
    answered (120 s), so the first ones get a short timeout and are sent again, and the tests' own requests
    meet a proxy that has answered one."""
    last: Exception | None = None
    request = urllib.request.Request(f"{url}/v1/models", headers=bearer(INFERENCE_TOKEN))
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if response.status == 200:
                    return attempt
        except OSError as exc:
            last = exc
    raise AssertionError(f"the application never answered through Ray's HTTP proxy on {url}: {last}")


class Cluster:
    """The running application: its gRPC stub and target, HTTP URL, registry and the replica handle."""

    def __init__(self, grpc_port: int, http_port: int, registry: Any, folders: dict[str, Path]) -> None:
        from ray import serve

        self.target = f"127.0.0.1:{grpc_port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.registry, self.folders = registry, folders
        self.replicas = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=APP_NAME)

    def generate(
        self, adapter: str, tokens: int = 4, token: str | None = INFERENCE_TOKEN, **fields: Any
    ) -> inference_pb2.GenerateResponse:
        """One Generate through Ray's gRPC proxy with the stock stub (``token``: None sends none)."""
        request = inference_pb2.GenerateRequest(adapter=adapter, prompt="hello there", max_new_tokens=tokens)
        metadata = tuple(bearer(token).items()) if token is not None else ()
        return self.stub.Generate(request, timeout=SETTLE_S, metadata=metadata, **fields)

    def client(self, token: str | None = ADMIN_TOKEN) -> Client:
        """The project's client (Inference and Admin) through Ray's gRPC proxy."""
        return Client(self.target, token=token, timeout=SETTLE_S)

    def reports(self, count: int) -> dict[str, ReplicaReport]:
        """One report from each of ``count`` distinct running replicas (asked until all have answered)."""
        found: dict[str, ReplicaReport] = {}
        deadline = time.monotonic() + SETTLE_S
        while len(found) < count:
            assert time.monotonic() < deadline, f"only {len(found)} of {count} replicas answered"
            report = self.replicas.describe.remote().result(timeout_s=SETTLE_S)
            found[report.replica_id] = report
        return found


def scrape(report: ReplicaReport) -> dict[str, list]:
    """A replica's /metrics, family name → samples."""
    assert report.metrics_url is not None
    with urllib.request.urlopen(report.metrics_url, timeout=30) as response:
        text = response.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def start_cluster(tmp: Path, tiny_base: Path) -> Iterator[Cluster]:
    """The running cluster (a generator: stops everything when closed), its files under ``tmp``."""
    import boto3
    from moto import server as moto_server

    moto_port = free_port()
    moto = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    env = {
        "LORASWAP_S3_ENDPOINT": f"http://127.0.0.1:{moto_port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "LORASWAP_HOME": str(tmp / "replica-home"),
    }
    operator = {"LORASWAP_INFERENCE_TOKENS": INFERENCE_TOKEN, "LORASWAP_ADMIN_TOKENS": ADMIN_TOKEN}
    saved = {k: os.environ.get(k) for k in (*env, *operator)}
    os.environ.update({k: v for k, v in env.items() if k != "LORASWAP_HOME"} | operator)
    try:
        bucket = f"ray-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=env["LORASWAP_S3_ENDPOINT"]).create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/reg"
        registry = open_registry(url)
        folders = {}
        for seed, name in enumerate(ADAPTERS):
            folders[name] = make_peft_adapter(tiny_base, tmp / name, r=4, seed=70 + seed)
            registry.push(folders[name], name, base=resolve_base(tiny_base), tags=["prod"])  # pushed once
        yield from _serve(url, tiny_base, env, registry, folders)
    finally:
        moto.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _serve(url: str, tiny_base: Path, env: dict[str, str], registry: Any, folders: dict) -> Iterator[Cluster]:
    """Ray, Serve's proxies and the application, for as long as the fixture lasts."""
    import ray
    from ray import serve

    from loraswap.server.ray.app import build_app, grpc_options

    ray.init(
        address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env},
        namespace=f"loraswap-test-{uuid.uuid4().hex[:6]}",
    )  # fmt: skip
    try:
        grpc_port, http_port = free_port(), free_port()
        serve.start(
            grpc_options=grpc_options(grpc_port), http_options={"host": "127.0.0.1", "port": http_port}
        )
        settings = {
            "base": str(tiny_base), "quantization": "fp32", "registry": url, "adapter_slots": len(ADAPTERS),
            "max_rank": 8, "max_batch_size": 8, "max_seq_len": MAX_SEQ_LEN, "tag_ttl_s": 1.0,
            "metrics_host": "127.0.0.1", "metrics_port": 0, "metrics_adapters": ADAPTERS,
        }  # fmt: skip
        args = {"min_replicas": 2, "max_replicas": 2, "replica_cpus": 1.0, "settings": settings}
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")  # tokens: from the environment
        wait_for_http(f"http://127.0.0.1:{http_port}")
        tries = warm_http_app(f"http://127.0.0.1:{http_port}")
        print(f"the HTTP app answered through Ray's proxy at attempt {tries}", file=sys.stderr)
        yield Cluster(grpc_port, http_port, registry, folders)
    finally:
        serve.shutdown()
        ray.shutdown()

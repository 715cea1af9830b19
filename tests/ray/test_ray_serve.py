"""loraswap on Ray Serve: a local Ray cluster on 127.0.0.1, two engine replicas sharing one S3 registry (moto
in server mode), traffic through Ray Serve's gRPC proxy with the stock ``loraswap.v1`` stub.

Shows that requests for an adapter land where it is warm (one load per adapter across the cluster, read
from each replica's own /metrics and load counts), that a moved tag moves traffic, that the OpenAI API
answers through Ray's HTTP proxy, and that killing a replica mid-traffic loses no request the client
retries, the other replicas taking over its adapters; the recovery time is printed.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra (ray[serve]) is not installed")
serve = pytest.importorskip("ray.serve")
boto3 = pytest.importorskip("boto3", reason="the [s3] extra is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (the [dev] extra) is not installed")

import grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from loraswap.devtools.tiny import make_peft_adapter  # noqa: E402
from loraswap.models import resolve_base  # noqa: E402
from loraswap.registry import open_registry  # noqa: E402
from loraswap.server.engine import EngineConfig  # noqa: E402
from loraswap.server.grpc.pb import inference_pb2, inference_pb2_grpc  # noqa: E402
from loraswap.server.metrics import LORA_INFO_METRIC  # noqa: E402
from loraswap.server.ray.app import build, grpc_options  # noqa: E402
from loraswap.server.ray.config import APP_NAME, RayAppConfig  # noqa: E402
from loraswap.server.ray.deployment import REPLICA_DEPLOYMENT, ReplicaReport  # noqa: E402
from loraswap.server.settings import ServeSettings  # noqa: E402

pytestmark = pytest.mark.slow
ADAPTERS = [f"task{i}" for i in range(4)]
SETTLE_S = 120.0  # upper bound of polls that wait for Ray to act (replicas up, tags re-resolved)


def _free_port() -> int:
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
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=timeout) as response:
                if response.status == 200:
                    return attempt
        except OSError as exc:
            last = exc
    raise AssertionError(f"the application never answered through Ray's HTTP proxy on {url}: {last}")


class Cluster:
    """The running application: its gRPC stub, HTTP URL, registry and the replica handle."""

    def __init__(self, grpc_port: int, http_port: int, registry, folders: dict[str, Path]) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.registry, self.folders = registry, folders
        self.replicas = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=APP_NAME)

    def generate(self, adapter: str, tokens: int = 4, **fields) -> inference_pb2.GenerateResponse:
        request = inference_pb2.GenerateRequest(adapter=adapter, prompt="hello there", max_new_tokens=tokens)
        return self.stub.Generate(request, timeout=SETTLE_S, **fields)

    def reports(self, count: int) -> dict[str, ReplicaReport]:
        """One report from each of ``count`` distinct running replicas (asked until all have answered)."""
        found: dict[str, ReplicaReport] = {}
        deadline = time.monotonic() + SETTLE_S
        while len(found) < count:
            assert time.monotonic() < deadline, f"only {len(found)} of {count} replicas answered"
            report = self.replicas.describe.remote().result(timeout_s=SETTLE_S)
            found[report.replica_id] = report
        return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("ray")
    moto_port = _free_port()
    moto = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    env = {
        "LORASWAP_S3_ENDPOINT": f"http://127.0.0.1:{moto_port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "LORASWAP_HOME": str(tmp / "replica-home"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if k != "LORASWAP_HOME"})
    try:
        bucket = f"ray-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=env["LORASWAP_S3_ENDPOINT"]).create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/reg"
        registry = open_registry(url)
        folders = {}
        for seed, name in enumerate(ADAPTERS):
            folders[name] = make_peft_adapter(tiny_base, tmp / name, r=4, seed=70 + seed)
            registry.push(folders[name], name, base=resolve_base(tiny_base), tags=["prod"])  # pushed once
        ray.init(
            address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env},
            namespace=f"loraswap-test-{uuid.uuid4().hex[:6]}",
        )  # fmt: skip
        try:
            grpc_port, http_port = _free_port(), _free_port()
            serve.start(
                grpc_options=grpc_options(grpc_port), http_options={"host": "127.0.0.1", "port": http_port}
            )
            engine = EngineConfig(
                base=str(tiny_base), quantization="fp32", registry=url, adapter_slots=len(ADAPTERS),
                max_rank=8, max_batch_size=8, max_seq_len=96, tag_ttl_s=1.0,
            )  # fmt: skip
            settings = ServeSettings(
                engine=engine, metrics_host="127.0.0.1", metrics_port=0, metrics_adapters=tuple(ADAPTERS)
            )
            config = RayAppConfig(min_replicas=2, max_replicas=2, replica_cpus=1.0)
            serve.run(build(config, settings), name=APP_NAME, route_prefix="/")
            wait_for_http(f"http://127.0.0.1:{http_port}")
            tries = warm_http_app(f"http://127.0.0.1:{http_port}")
            print(f"the HTTP app answered through Ray's proxy at attempt {tries}", file=sys.stderr)
            yield Cluster(grpc_port, http_port, registry, folders)
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        moto.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _scrape(report: ReplicaReport) -> dict[str, list]:
    assert report.metrics_url is not None
    with urllib.request.urlopen(report.metrics_url, timeout=30) as response:
        text = response.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _loads(families: dict[str, list]) -> float:
    return sum(s.value for s in families["loraswap_adapter_loads"] if s.name.endswith("_total"))


def _tokens_by_adapter(families: dict[str, list]) -> dict[str, float]:
    samples = families["loraswap_generated_tokens"]
    return {s.labels["adapter"]: s.value for s in samples if s.name.endswith("_total") and s.value}


def _traffic(cluster: Cluster, requests: list[str], workers: int = 4) -> list[inference_pb2.GenerateResponse]:
    out: list = [None] * len(requests)
    index = itertools.count()

    def work() -> None:
        while (i := next(index)) < len(requests):
            out[i] = cluster.generate(requests[i])

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_requests_land_where_the_adapter_is_warm(cluster: Cluster) -> None:
    digests = {name: cluster.registry.resolve(f"{name}:prod").digest for name in ADAPTERS}
    for name in ADAPTERS:  # the first request of each adapter, one at a time: its load is announced
        assert cluster.generate(f"{name}:prod").adapter_digest == digests[name]
    mixed = [f"{ADAPTERS[i % len(ADAPTERS)]}:prod" for i in range(48)]  # repeated mixed-adapter traffic
    responses = _traffic(cluster, mixed)  # a failed request raises here
    assert [r.adapter_digest for r in responses] == [digests[ref.split(":")[0]] for ref in mixed]
    reports = cluster.reports(2)
    loads = Counter()
    for report in reports.values():
        loads.update(report.loads)
        families = _scrape(report)
        assert _loads(families) == sum(report.loads.values())  # every multiplexed load is one engine load
        (gauge,) = families[LORA_INFO_METRIC]
        assert gauge.labels["max_lora"] == str(len(ADAPTERS))
    print(f"\nloads per adapter across 2 replicas: {sorted(loads.values())}")
    assert set(loads) == set(digests.values())
    # Without affinity every adapter ends up on both replicas (2 loads each); Ray's router may still send
    # a request elsewhere when the warm replica is slow to answer its probe (a busy machine), so "close
    # to 1" is: at most 1.5 on average, and no adapter on more replicas than there are.
    assert sum(loads.values()) <= 1.5 * len(ADAPTERS) and max(loads.values()) <= 2
    for report in reports.values():  # tokens for an adapter only where that replica loaded it
        for name in _tokens_by_adapter(_scrape(report)):
            assert digests[name] in report.loads
    assert all(r.resident for r in reports.values())  # both replicas hold adapters


def test_a_moved_tag_moves_traffic_and_http_answers(cluster: Cluster) -> None:
    old = cluster.registry.resolve("task0:prod").digest
    moved = cluster.registry.push(cluster.folders["task1"], "task0", tags=["prod"])  # another version
    assert moved.digest != old
    deadline = time.monotonic() + SETTLE_S
    while (digest := cluster.generate("task0:prod").adapter_digest) == old:  # within the tag TTL
        assert time.monotonic() < deadline, "the moved tag was never picked up"
    assert digest == moved.digest
    body = json.dumps({"model": "task2:prod", "prompt": "hello there", "max_tokens": 3, "temperature": 0})
    request = urllib.request.Request(
        f"{cluster.http_url}/v1/completions", data=body.encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=SETTLE_S) as response:
        completion = json.loads(response.read())
    assert completion["usage"]["completion_tokens"] == 3
    with pytest.raises(grpc.RpcError) as info:
        cluster.generate("no-such-adapter")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_killing_a_replica_loses_no_retried_request(cluster: Cluster) -> None:
    before = cluster.reports(2)
    victim = max(before.values(), key=lambda r: len(r.resident))
    survivor = next(r for r in before.values() if r.replica_id != victim.replica_id)
    orphans = {
        name for name in ADAPTERS if cluster.registry.resolve(f"{name}:prod").digest in victim.resident
    }
    assert orphans
    failures: Counter[str] = Counter()
    done: list[tuple[float, str]] = []  # (finish time, adapter) of every request, after its retries
    killed_at: list[float] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(worker: int) -> None:
        for i in itertools.count(worker):
            if stop.is_set():
                return
            name = ADAPTERS[i % len(ADAPTERS)]
            while True:  # the client's retry loop: UNAVAILABLE means "send it again"
                try:
                    cluster.generate(f"{name}:prod")
                    break
                except grpc.RpcError as exc:
                    with lock:
                        failures[exc.code().name] += 1
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
            with lock:
                done.append((time.monotonic(), name))

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        while len(done) < 20:  # traffic is flowing
            time.sleep(0.01)
        ray.kill(ray.get_actor(victim.actor_name, namespace="serve"), no_restart=True)
        killed_at.append(time.monotonic())
        deadline = killed_at[0] + SETTLE_S
        # Until every adapter the victim held has been served again after the kill.
        while not orphans <= {name for at, name in list(done) if at > killed_at[0]}:
            assert time.monotonic() < deadline, "the victim's adapters were never served again"
            assert all(t.is_alive() for t in threads), "a client saw a non-retryable error"
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    recovered = max(min(at for at, name in done if name == o and at > killed_at[0]) for o in orphans)
    print(
        f"\nreplica {victim.replica_id} killed; its adapters {sorted(orphans)} served again after "
        f"{recovered - killed_at[0]:.2f}s; {len(done)} requests succeeded, retried failures: {dict(failures)}"
    )
    assert set(failures) <= {"UNAVAILABLE"}
    after = cluster.reports(2)  # Ray Serve replaces the dead replica (min_replicas=2)
    assert victim.replica_id not in after and survivor.replica_id in after
    takers = {
        rid: [name for name in orphans if cluster.registry.resolve(f"{name}:prod").digest in r.loads]
        for rid, r in after.items()
    }
    print(f"the victim's adapters were loaded again on: {takers} (survivor {survivor.replica_id})")
    assert {name for names in takers.values() for name in names} == orphans

"""loraswap on Ray Serve (the cluster: tests/ray/serve_cluster.py): traffic through Ray Serve's gRPC proxy
with the stock ``loraswap.v1`` stubs and the project's client, and through its HTTP proxy.

Shows that requests for an adapter land where it is warm (one load per adapter across the cluster, read
from each replica's own /metrics and load counts), that a moved tag moves traffic, that the OpenAI API
answers through Ray's HTTP proxy, that both proxies take the single server's bearer tokens, that the Admin
service acts on the replicas, that a call's deadline drops its engine work, and that killing a replica
mid-traffic loses no request the client retries, the other replicas taking over its adapters; the recovery
time is printed.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra (ray[serve]) is not installed")
serve = pytest.importorskip("ray.serve")
boto3 = pytest.importorskip("boto3", reason="the [s3] extra is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (the [dev] extra) is not installed")

import grpc  # noqa: E402
import openai  # noqa: E402
from serve_cluster import (  # noqa: E402
    ADAPTERS,
    ADMIN_TOKEN,
    INFERENCE_TOKEN,
    MAX_SEQ_LEN,
    SETTLE_S,
    Cluster,
    bearer,
    scrape,
)

from loraswap.devtools.tiny import make_peft_adapter  # noqa: E402
from loraswap.errors import (  # noqa: E402  # noqa: E402
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from loraswap.models import resolve_base  # noqa: E402
from loraswap.server.grpc.pb import inference_pb2  # noqa: E402
from loraswap.server.metrics import LORA_INFO_METRIC  # noqa: E402
from loraswap.server.ray.config import APP_NAME  # noqa: E402
from loraswap.server.ray.ingress import INGRESS_DEPLOYMENT  # noqa: E402

pytestmark = pytest.mark.slow
DEADLINE_S = 6.0  # the paused call's deadline: ample for its first token on a busy machine


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
        families = scrape(report)
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
        for name in _tokens_by_adapter(scrape(report)):
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
    completion = _openai(cluster, INFERENCE_TOKEN).completions.create(
        model="task2:prod", prompt="hello there", max_tokens=3, temperature=0
    )
    assert completion.usage.completion_tokens == 3
    with pytest.raises(grpc.RpcError) as info:
        cluster.generate("no-such-adapter")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _openai(cluster: Cluster, key: str) -> openai.OpenAI:
    """The real ``openai`` client through Ray's HTTP proxy."""
    return openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key=key, max_retries=0, timeout=SETTLE_S)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_tokens_guard_both_proxies(cluster: Cluster) -> None:
    # gRPC Inference: no token or an unknown one is UNAUTHENTICATED; an admin token may call it too
    assert _code(lambda: cluster.generate("task1:prod", token=None)) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: cluster.generate("task1:prod", token="guess")) == grpc.StatusCode.UNAUTHENTICATED
    request = inference_pb2.GenerateRequest(adapter="task1:prod", prompt="hello there", max_new_tokens=4)
    stream = cluster.stub.GenerateStream(request, timeout=SETTLE_S)
    assert _code(lambda: list(stream)) == grpc.StatusCode.UNAUTHENTICATED
    assert cluster.generate("task1:prod", token=ADMIN_TOKEN).usage.completion_tokens == 4
    # gRPC Admin: an inference token is PERMISSION_DENIED, no token UNAUTHENTICATED (the project's client)
    with cluster.client(INFERENCE_TOKEN) as client, pytest.raises(PermissionDeniedError):
        client.list_adapters()
    with cluster.client(None) as client, pytest.raises(UnauthenticatedError):
        client.info()
    # HTTP: inference tokens only (401 without a known one, 403 for an admin token), as a single server
    completion = {"model": "task1:prod", "prompt": "hello there", "max_tokens": 2}
    with pytest.raises(openai.AuthenticationError):
        _openai(cluster, "guess").completions.create(**completion)
    with pytest.raises(openai.PermissionDeniedError):
        _openai(cluster, ADMIN_TOKEN).completions.create(**completion)
    assert _openai(cluster, INFERENCE_TOKEN).completions.create(**completion).usage.completion_tokens == 2


def _pinned(report) -> float:
    (sample,) = scrape(report)["loraswap_adapter_cache_pinned_adapters"]
    return sample.value


def test_admin_acts_on_the_replicas(cluster: Cluster, tiny_base: Path, tmp_path: Path) -> None:
    admin = cluster.client()
    assert admin.info().adapter_slots == len(ADAPTERS) and admin.info().max_seq_len == MAX_SEQ_LEN
    # a version loaded ahead of traffic becomes a multiplexed model of the one replica Ray routes it to
    folder = make_peft_adapter(tiny_base, tmp_path / "fresh", r=4, seed=90)
    fresh = cluster.registry.push(folder, "fresh", base=resolve_base(tiny_base), tags=["prod"])
    loaded = admin.load_adapter("fresh:prod")
    assert loaded.digest == fresh.digest and "device" in loaded.tiers
    holders = [r for r in cluster.reports(2).values() if fresh.digest in r.resident]
    assert [r.loads[fresh.digest] for r in holders] == [1]
    # ListAdapters merges the replicas' views: one entry per version, its hits summed over replicas
    digest = cluster.registry.resolve("task2:prod").digest
    hits = {s.digest: s.hits for s in admin.list_adapters()}.get(digest, 0)
    for _ in range(3):
        cluster.generate("task2:prod")
    listed = admin.list_adapters()
    assert len({s.digest for s in listed}) == len(listed) and fresh.digest in {s.digest for s in listed}
    assert {s.digest: s.hits for s in listed}[digest] == hits + 3
    # pin and unpin act on every replica (each one's own gauge)
    assert admin.pin("task2:prod").pinned
    reports = cluster.reports(2).values()
    assert [_pinned(r) for r in reports] == [1, 1]
    assert not admin.unpin("task2:prod").pinned and [_pinned(r) for r in reports] == [0, 0]
    # unload drops it from every replica's device and host tiers; the next request loads it again
    admin.unload_adapter("task2:prod")
    assert not [s for s in admin.list_adapters() if s.digest == digest and {"device", "host"} & set(s.tiers)]
    assert cluster.generate("task2:prod").adapter_digest == digest
    # errors as a single server answers them (the client raises the status table's classes)
    with pytest.raises(NotFoundError):
        admin.load_adapter("no-such-adapter")
    with pytest.raises(FailedPreconditionError, match="not served on Ray Serve"):
        admin.promote("task2:prod")
    with pytest.raises(FailedPreconditionError, match="not served on Ray Serve"):
        admin.demote("task2:prod")
    admin.close()


def _ingress_pid() -> int:
    """The ingress replica's process (the GCS actor table: the test cluster runs no dashboard)."""
    from ray._private.state import actors

    name = f"{APP_NAME}#{INGRESS_DEPLOYMENT}#"
    (pid,) = [a["Pid"] for a in actors().values() if a["State"] == "ALIVE" and name in a["Name"]]
    return pid


def _tokens_so_far(reports) -> float:
    """Tokens generated after the first of their request, all replicas together."""
    samples = [s for r in reports for s in scrape(r)["loraswap_inter_token_latency_seconds"]]
    return sum(s.value for s in samples if s.name.endswith("_count"))


def _busy_with(reports, name: str) -> bool:
    """Whether any replica's engine runs or queues a request for adapter ``name``."""
    for report in reports:
        (gauge,) = scrape(report)[LORA_INFO_METRIC]
        labels = gauge.labels["running_lora_adapters"] + "," + gauge.labels["waiting_lora_adapters"]
        if any(ref.startswith(f"{name}@") for ref in labels.split(",")):
            return True
    return False


def test_a_passed_deadline_drops_the_engine_work(cluster: Cluster) -> None:
    """As on a single server, the deadline goes with the request to the engine, which drops the request
    once it passes. So that nothing else can stop the work, the engine replicas are paused (SIGSTOP) until
    the deadline has passed, and the ingress, through which Ray's cancellation would come, until the
    engines are idle again: a request that ran on would generate every token it asked for."""
    tokens = MAX_SEQ_LEN - 16
    assert cluster.generate("task3:prod").usage.completion_tokens == 4  # warm: its first token comes fast
    reports = list(cluster.reports(2).values())
    before = _tokens_so_far(reports)
    request = inference_pb2.GenerateRequest(
        adapter="task3:prod", prompt="hello there", max_new_tokens=tokens,
        sampling=inference_pb2.SamplingParameters(ignore_eos=True),
    )  # fmt: skip
    stream = cluster.stub.GenerateStream(
        request, timeout=DEADLINE_S, metadata=tuple(bearer(INFERENCE_TOKEN).items())
    )
    ingress, engines = _ingress_pid(), [r.pid for r in reports]
    try:
        next(stream)  # an engine is generating it
        for pid in (ingress, *engines):
            os.kill(pid, signal.SIGSTOP)
        assert _code(lambda: list(stream)) == grpc.StatusCode.DEADLINE_EXCEEDED
        for pid in engines:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + SETTLE_S
        while _busy_with(reports, "task3"):
            assert time.monotonic() < deadline, "the engine never let go of the request"
            time.sleep(0.05)
        generated = _tokens_so_far(reports) - before + 1
    finally:
        for pid in (*engines, ingress):
            os.kill(pid, signal.SIGCONT)
    print(f"\nthe paused request generated {generated:.0f} of the {tokens} tokens it asked for")
    assert generated < tokens
    assert cluster.generate("task3:prod").usage.completion_tokens == 4  # the cluster serves on


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

"""The adapter manager when the registry misbehaves: every request gets an answer, and an outage does not
stop the adapters already served (issue 23).

Real parts: a real local registry, and an S3 registry on a moto server of this module's own that the
tests stop and start again (an outage with the data kept, as when a store's endpoint goes away).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from loraswap.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_key
from loraswap.errors import MissingDependencyError, RegistryUnavailableError
from loraswap.registry.registry import Registry, open_registry
from loraswap.server.adapters.manager import AdapterManager
from loraswap.server.adapters.reader import BaseShape
from loraswap.server.adapters.resolver import Resolver
from loraswap.server.engine.api import NullObserver
from loraswap.server.lora.layer import install_lora_layers

WAIT_S = 60  # a bound on waiting for a future that must complete: far above any expected time


def _adapter(folder: Path, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    tensors = {
        lora_key("q_proj", "A"): torch.randn(4, 16, generator=gen),
        lora_key("q_proj", "B"): torch.randn(16, 4, generator=gen),
    }
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj"]}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    return folder


class Stale(NullObserver):
    def __init__(self) -> None:
        self.stale = 0
        self.failures: list[str] = []

    def on_stale_resolution(self) -> None:
        self.stale += 1

    def on_load_failure(self, reason: str) -> None:
        self.failures.append(reason)


def _manager(registry_factory, observer=None, workers: int = 2, ttl: float = 0.0) -> AdapterManager:
    root = nn.Module()
    root.q_proj = nn.Linear(16, 16, bias=False)
    _, layers = install_lora_layers(root, 2, 8, torch.float32)
    return AdapterManager(
        registry_factory=registry_factory,
        base=BaseShape({n: (m.in_features, m.out_features) for n, m in layers.items()}, 8, "tiny"),
        layers=layers,
        num_slots=2,
        host_budget=1 << 30,
        dtype=torch.float32,
        tag_ttl_s=ttl,
        workers=workers,
        observer=observer or NullObserver(),
        stale_grace_s=3600.0,
    )


class Endpoint:
    """A moto S3 server on a fixed local port that can be stopped and started again with its data
    (moto keeps its state in this process, not in the server thread)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._make = lambda: ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server = self._make()
        self.server.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = self._make()
        self.server.start()


@pytest.fixture
def s3_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Endpoint, str]]:
    """A registry URL on an S3 endpoint of the test's own (stopped and restarted by the test)."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    endpoint = Endpoint()
    for key, value in {
        "LORASWAP_S3_ENDPOINT": endpoint.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",  # a refused connection fails at once, not after botocore's retries
        "AWS_RETRY_MODE": "standard",
    }.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint.url).create_bucket(Bucket="outage")
    yield endpoint, "s3://outage/reg"
    endpoint.stop()


def test_a_tag_serves_its_last_version_while_the_registry_is_down(s3_registry, tmp_path: Path) -> None:
    """Defect: once its tag TTL passed, a loaded adapter failed as soon as the registry was down, because
    the tag was asked again and the last known version was not used. Also: a new adapter failed as
    INTERNAL "internal error" instead of naming the registry."""
    endpoint, url = s3_registry
    registry = open_registry(url)
    digest = registry.push(_adapter(tmp_path / "a", 1), "a", tags=["prod"]).digest
    observer = Stale()
    manager = _manager(lambda: open_registry(url), observer)  # TTL 0: every request asks again
    try:
        assert manager.request("a:prod").result(timeout=WAIT_S).digest == digest
        endpoint.stop()
        assert manager.request("a:prod").result(timeout=WAIT_S).digest == digest  # served stale
        assert observer.stale == 1
        with pytest.raises(RegistryUnavailableError, match="s3://outage/reg"):
            manager.request("never-seen").result(timeout=WAIT_S)
        endpoint.start()
        moved = registry.push(_adapter(tmp_path / "b", 2), "a", tags=["prod"]).digest
        assert manager.request("a:prod").result(timeout=WAIT_S).digest == moved  # fresh again
        assert observer.stale == 1
    finally:
        manager.close()


def test_a_cached_digest_never_needs_the_registry(s3_registry, tmp_path: Path) -> None:
    """A digest reference whose version is in the disk cache loads while the registry is down, in a new
    manager (a restarted server) that never reached the registry."""
    endpoint, url = s3_registry
    registry = open_registry(url)
    digest = registry.push(_adapter(tmp_path / "a", 1), "a").digest
    registry.pull(f"a@{digest}")  # in the disk cache
    endpoint.stop()
    manager = _manager(lambda: open_registry(url))
    try:
        assert manager.request(f"a@{digest}").result(timeout=WAIT_S).digest == digest
        with pytest.raises(RegistryUnavailableError):
            manager.request("a").result(timeout=WAIT_S)  # a tag never resolved: nothing to serve
    finally:
        manager.close()


def test_stale_answers_end_with_the_grace(tmp_path: Path) -> None:
    """Past ``stale_grace_s`` after the registry's last answer, the outage error stands."""
    registry = open_registry(tmp_path / "reg")
    registry.push(_adapter(tmp_path / "a", 1), "a")
    down = [False]
    now = [0.0]

    def reach() -> Registry:
        if down[0]:
            raise RegistryUnavailableError("registry at test:// cannot be reached")
        return registry

    resolver = Resolver(reach, ttl_s=5.0, stale_grace_s=100.0, clock=lambda: now[0])
    first = resolver.resolve("a")
    down[0] = True
    now[0] = 6.0  # past the TTL: asked again, answered stale
    assert resolver.resolve("a") == first
    now[0] = 9.0  # within a TTL of that attempt: not asked again
    assert resolver.cached("a") == first
    now[0] = 101.0  # past the grace
    with pytest.raises(RegistryUnavailableError):
        resolver.resolve("a")


@pytest.mark.parametrize(
    "error",
    [ImportError("No module named 'boto3'"), RuntimeError("botocore blew up"), MissingDependencyError("x")],
)
def test_any_failure_opening_the_registry_reaches_the_request(error: BaseException) -> None:
    """Defect: only loraswap's own errors were caught on the load path; anything else (boto3 missing,
    an unknown AWS profile) was swallowed by the pool and the request waited forever."""

    def broken() -> Registry:
        raise error

    observer = Stale()
    manager = _manager(broken, observer)
    try:
        with pytest.raises(type(error)):
            manager.request("a:prod").result(timeout=WAIT_S)
        assert observer.failures == ["internal" if not isinstance(error, MissingDependencyError) else
                                     "MissingDependencyError"]  # fmt: skip
    finally:
        manager.close()


class BlockingPulls(Registry):
    """A real local registry whose pulls of names starting with ``cold`` wait for :attr:`release`."""

    def __init__(self, store) -> None:
        super().__init__(store)
        self.release = threading.Event()
        self.pulling = threading.Semaphore(0)

    def pull(self, ref: str, *args, **kwargs) -> Path:
        if ref.startswith("cold"):
            self.pulling.release()
            assert self.release.wait(WAIT_S)
        return super().pull(ref, *args, **kwargs)


def test_hot_adapters_do_not_wait_for_cold_pulls(tmp_path: Path) -> None:
    """Defect: every adapter request went through the two load workers, so two slow pulls of cold
    adapters held up the requests of adapters already in memory, tags re-resolving included."""
    registry = BlockingPulls(open_registry(tmp_path / "reg").store)
    for name, seed in (("hot", 1), ("cold1", 2), ("cold2", 3)):
        registry.push(_adapter(tmp_path / name, seed), name)
    manager = _manager(lambda: registry, workers=2, ttl=3600.0)
    try:
        manager.request("hot").result(timeout=WAIT_S)  # in host memory now
        colds = [manager.request("cold1"), manager.request("cold2")]
        for _ in colds:  # both load workers are inside a pull
            assert registry.pulling.acquire(timeout=WAIT_S)
        assert manager.request("hot").done()  # resolved and joined inline: no worker needed
        manager.resolver.ttl_s = 0.0  # the tag must be asked again: the resolve lane, not the load lane
        assert manager.request("hot").result(timeout=WAIT_S).name == "hot"
        assert not any(c.done() for c in colds)
        registry.release.set()
        assert [c.result(timeout=WAIT_S).name for c in colds] == ["cold1", "cold2"]
    finally:
        registry.release.set()
        manager.close()


class SilentRegistry(Registry):
    """A real local registry whose look-ups, once :attr:`silent` is set, wait for :attr:`release` (a
    store that accepts connections and does not answer)."""

    def __init__(self, store) -> None:
        super().__init__(store)
        self.silent, self.release = threading.Event(), threading.Event()

    def resolve(self, ref: str, kind: str | None = "adapter"):
        if self.silent.is_set():
            assert self.release.wait(WAIT_S)
        return super().resolve(ref, kind)


def test_a_silent_registry_delays_a_served_tag_by_the_refresh_wait_only(tmp_path: Path) -> None:
    """Defect (found by the chaos soak): a registry that accepted connections and never answered held a
    served tag's requests for the S3 client's timeouts (minutes), past their deadlines, before the last
    known version was served. Now the last answer is served after ``refresh_wait_s`` while the look-up
    goes on, and the look-up's answer is used once it comes."""
    registry = SilentRegistry(open_registry(tmp_path / "reg").store)
    first = registry.push(_adapter(tmp_path / "a", 1), "a", tags=["prod"]).digest
    stale: list[int] = []
    now = [0.0]
    resolver = Resolver(lambda: registry, ttl_s=5.0, stale_grace_s=100.0, on_stale=lambda: stale.append(1),
                        clock=lambda: now[0], refresh_wait_s=0.05)  # fmt: skip
    try:
        assert resolver.resolve("a:prod").digest == first
        moved = registry.push(_adapter(tmp_path / "b", 2), "a", tags=["prod"]).digest
        registry.silent.set()
        now[0] = 6.0  # past the TTL: asked again; the registry does not answer
        assert resolver.resolve("a:prod").digest == first and stale == [1]
        registry.release.set()  # the look-up still in flight gets its answer...
        for _ in range(WAIT_S * 100):
            if resolver.cached("a:prod") is not None and resolver.cached("a:prod").digest == moved:
                break
            threading.Event().wait(0.01)
        assert resolver.resolve("a:prod").digest == moved  # ...and it is used from then on
    finally:
        registry.release.set()
        resolver.close()

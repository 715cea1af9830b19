"""Every Prometheus metric of the server, declared here and nowhere else.

:class:`Metrics` owns a dedicated ``CollectorRegistry`` (never the global one), is the engine's
:class:`~loraswap.server.engine.api.EngineObserver`, records per-call outcomes from the gRPC interceptor and
per-request figures from the servicer, and computes cache residency, queue depth and memory at scrape
time from the engine. Labels are bounded: adapter names outside ``tracked_adapters``, and RPC methods the
server did not register (:meth:`Metrics.track_methods`), count as ``other``. HTTP requests of the
OpenAI-compatible API are counted in the same ``loraswap_requests`` / ``loraswap_rpc_duration_seconds``
families: ``method`` is the path (``/v1/chat/completions``; unknown paths are ``other``) and ``code`` the
HTTP status (``200``, ``404``, ...); their tokens and time to first token go to the per-adapter families.

For Kubernetes inference gateways (the Gateway API Inference Extension, llm-d), the scrape also carries
vLLM's ``vllm:lora_requests_info`` gauge under the same name and labels (:func:`lora_requests_info`), so
their LoRA-affinity scorer reads loraswap pods as it reads vLLM's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from loraswap.registry.names import ref_name
from loraswap.server.engine.api import GenerationResult, Tier

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    import grpc  # a finished call's code, read by name only

log = logging.getLogger(__name__)

TIERS: tuple[Tier, ...] = ("device", "host", "disk")
BASE_LABEL, OTHER_LABEL = "base", "other"
LORA_INFO_METRIC = "vllm:lora_requests_info"
"""vLLM's name for the gauge that gateways' LoRA-affinity scorers read (colons are legal in metric names)."""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's metrics and the engine observer that feeds them."""

    def __init__(self, tracked_adapters: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry()
        self.tracked_adapters = frozenset(tracked_adapters)
        r = self.registry
        self.build_info = Info("loraswap_build", "Base model and capacities of this server", registry=r)
        self.requests = Counter(
            "loraswap_requests", "Finished RPCs by method and status code", ["method", "code"], registry=r
        )
        self.rpc_duration = Histogram(
            "loraswap_rpc_duration_seconds", "RPC time in the server's handler, by method", ["method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.rpc_methods: frozenset[str] = frozenset()
        self.prompt_tokens = Counter(
            "loraswap_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r
        )
        self.generated_tokens = Counter(
            "loraswap_generated_tokens", "Tokens generated", ["adapter"], registry=r
        )
        self.ttft = Histogram(
            "loraswap_time_to_first_token_seconds", "From arrival to the first token", ["adapter"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "loraswap_request_duration_seconds", "From arrival to the last token", ["adapter"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "loraswap_queue_time_seconds",
            "Waiting for admission to the batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "loraswap_inter_token_latency_seconds", "Between consecutive tokens of a request",
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "loraswap_batch_size", "Sequences per engine step", buckets=COUNT_BUCKETS, registry=r
        )
        self.step_adapters = Histogram(
            "loraswap_step_distinct_adapters",
            "Distinct adapters per engine step",
            buckets=COUNT_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "loraswap_step_duration_seconds", "Engine step time", buckets=TOKEN_BUCKETS, registry=r
        )
        self.prefill_tokens = Counter(
            "loraswap_prefill_tokens", "Prompt tokens prefilled in steps", registry=r
        )
        self.cache_lookups = Counter(
            "loraswap_adapter_cache_lookups", "Adapter cache lookups by tier", ["tier"], registry=r
        )
        self.cache_hits = Counter(
            "loraswap_adapter_cache_hits", "Adapter cache hits by tier", ["tier"], registry=r
        )
        self.loads = Counter("loraswap_adapter_loads", "Adapter loads by source tier", ["source"], registry=r)
        self.load_duration = Histogram(
            "loraswap_adapter_load_duration_seconds", "Adapter load time by source tier", ["source"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.evictions = Counter(
            "loraswap_adapter_evictions",
            "Adapter evictions by tier and reason",
            ["tier", "reason"],
            registry=r,
        )
        self.load_failures = Counter(
            "loraswap_adapter_load_failures", "Adapter loads that failed, by reason", ["reason"], registry=r
        )
        self.stale_resolutions = Counter(
            "loraswap_registry_stale_resolutions",
            "Tag resolutions answered with the last known version because the registry could not be reached",
            registry=r,
        )
        self.promotions = Counter(
            "loraswap_route_promotions", "Adapter promotions to a route, by outcome", ["outcome"], registry=r
        )
        self._http: WSGIServer | None = None

    # --- labels ---

    def adapter_label(self, ref: str) -> str:
        name = ref_name(ref)
        if not name:
            return BASE_LABEL
        return name if name in self.tracked_adapters else OTHER_LABEL

    def track_methods(self, methods: Iterable[str]) -> None:
        """Give these RPC methods (``/package.Service/Method``) their own ``method`` label."""
        self.rpc_methods |= frozenset(methods)

    def method_label(self, method: str) -> str:
        return method if method in self.rpc_methods else OTHER_LABEL

    # --- wiring ---

    def attach_engine(self, engine: Any) -> None:
        """Publish the build info and register the scrape-time collector over ``engine``."""
        info = engine.info()
        self.build_info.info(
            {
                "base_model": info.base_model,
                "fingerprint": info.base_fingerprint,
                "quantization": info.quantization,
                "dtype": info.dtype,
                "device": info.device,
                "max_rank": str(info.max_rank),
                "slots": str(info.adapter_slots),
                "version": info.versions.get("loraswap", ""),
            }
        )
        self.registry.register(EngineCollector(engine))

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint on its own port (0 = a free one); return the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # --- from the gRPC layer ---

    def on_call(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        label = self.method_label(method)
        self.requests.labels(method=label, code=code.name).inc()
        self.rpc_duration.labels(method=label).observe(seconds)

    def on_http(self, path: str, status: int, seconds: float) -> None:
        """One finished HTTP request: ``method`` is the path, ``code`` the status (a bounded set)."""
        label = self.method_label(path)
        self.requests.labels(method=label, code=str(status)).inc()
        self.rpc_duration.labels(method=label).observe(seconds)

    def on_result(self, adapter: str, result: GenerationResult) -> None:
        label = self.adapter_label(adapter)
        self.prompt_tokens.labels(label).inc(result.prompt_tokens)
        self.generated_tokens.labels(label).inc(result.completion_tokens)
        t = result.timings
        if result.completion_tokens:
            self.ttft.labels(label).observe(t.ttft_s)
        self.request_duration.labels(label).observe(t.total_s)
        self.queue_time.observe(t.queue_s)

    # --- EngineObserver ---

    def on_step(self, batch_size: int, distinct_adapters: int, prefill_tokens: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.step_adapters.observe(distinct_adapters)
        self.step_duration.observe(seconds)
        self.prefill_tokens.inc(prefill_tokens)

    def on_cache_lookup(self, tier: Tier, hit: bool) -> None:
        self.cache_lookups.labels(tier).inc()
        if hit:
            self.cache_hits.labels(tier).inc()

    def on_adapter_load(self, source: str, seconds: float) -> None:
        self.loads.labels(source).inc()
        self.load_duration.labels(source).observe(seconds)

    def on_eviction(self, tier: Tier, reason: str) -> None:
        self.evictions.labels(tier, reason).inc()

    def on_promotion(self, outcome: str) -> None:
        self.promotions.labels(outcome).inc()

    def attach_router(self, router: Any) -> None:
        """Register the scrape-time route gauges over ``router`` (:class:`RouteCollector`)."""
        self.registry.register(RouteCollector(router))

    def on_load_failure(self, reason: str) -> None:
        self.load_failures.labels(reason).inc()

    def on_stale_resolution(self) -> None:
        self.stale_resolutions.inc()

    def on_token(self, request_id: str, adapter: str, inter_token_s: float | None) -> None:
        if inter_token_s is not None:
            self.inter_token.observe(inter_token_s)


class EngineCollector(Collector):
    """Gauges computed at scrape time: cache residency per tier, queue depth, memory, and the gateways'
    LoRA gauge (:func:`lora_requests_info`)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.nvml = NvmlUtilization()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        adapters = GaugeMetricFamily(
            "loraswap_adapter_cache_resident_adapters", "Adapters resident per tier", labels=["tier"]
        )
        size = GaugeMetricFamily(
            "loraswap_adapter_cache_resident_bytes", "Adapter bytes per tier", labels=["tier"]
        )
        statuses = self.engine.list_adapters()
        for tier in TIERS:
            resident = [s for s in statuses if tier in s.tiers]
            adapters.add_metric([tier], len(resident))
            size.add_metric([tier], sum(s.size_bytes for s in resident))
        pinned = GaugeMetricFamily("loraswap_adapter_cache_pinned_adapters", "Pinned adapters")
        pinned.add_metric([], sum(s.pinned for s in statuses))
        queue = GaugeMetricFamily("loraswap_queue_depth", "Requests waiting for admission")
        queue.add_metric([], self.engine.queue_depth())
        yield from (adapters, size, pinned, queue, *memory_metrics(self.engine.info().device, self.nvml))
        yield lora_requests_info(self.engine)


class RouteCollector(Collector):
    """Routes to merged models, by state (``serving``, ``stale``), and the memory they hold, by kind
    (``weights``, ``kv_cache``), at scrape time; no label per route, so the series stay bounded."""

    def __init__(self, router: Any) -> None:
        self.router = router

    def collect(self) -> Iterator[GaugeMetricFamily]:
        statuses = self.router.route_statuses()
        routes = GaugeMetricFamily("loraswap_routes", "Routes to merged models, by state", labels=["state"])
        for state in ("serving", "stale"):
            routes.add_metric([state], sum(s.state == state for s in statuses))
        memory = GaugeMetricFamily(
            "loraswap_route_memory_bytes", "Memory held by routes, by kind", labels=["kind"]
        )
        memory.add_metric(["weights"], sum(s.weights_bytes for s in statuses))
        memory.add_metric(["kv_cache"], sum(s.kv_cache_bytes for s in statuses))
        yield from (routes, memory)


def lora_requests_info(engine: Any, now: float | None = None) -> GaugeMetricFamily:
    """vLLM's ``vllm:lora_requests_info``, as the engine stands at this scrape: one sample whose labels are
    ``running_lora_adapters`` (comma-separated adapter references, as requested, with sequences in the
    running batch: resident in a device slot and decoding or prefilling), ``waiting_lora_adapters``
    (references of requests not yet admitted: the adapter loading, or no free slot or KV row) and
    ``max_lora`` (the engine's adapter slots). Its value is the scrape's Unix time (``now``), as vLLM sets
    it with ``set_to_current_time()``: a gateway that sees several label sets takes the newest one.

    vLLM keeps a series per label set it has ever seen; this one is computed at scrape time, so it has
    only the current one. Base-model requests are not listed (vLLM lists LoRA requests only).
    """
    running, waiting = engine.lora_activity()
    gauge = GaugeMetricFamily(
        LORA_INFO_METRIC,
        "Running stats on lora requests.",
        labels=["running_lora_adapters", "max_lora", "waiting_lora_adapters"],
    )
    slots = str(engine.info().adapter_slots)
    gauge.add_metric([",".join(running), slots, ",".join(waiting)], time.time() if now is None else now)
    return gauge


def memory_metrics(device: str, nvml: NvmlUtilization) -> list[GaugeMetricFamily]:
    """Host RSS always; device memory on CUDA (via :mod:`loraswap.device`); utilization from ``nvml``."""
    from loraswap import device as dev

    rss = GaugeMetricFamily("loraswap_host_memory_rss_bytes", "Resident set size of the server process")
    rss.add_metric([], dev.host_rss_bytes())
    out = [rss]
    if device.startswith("cuda"):
        import torch

        used_total = dev.device_memory(torch.device(device))
        if used_total is not None:
            used = GaugeMetricFamily(
                "loraswap_device_memory_used_bytes", "Device memory in use", labels=["device"]
            )
            total = GaugeMetricFamily(
                "loraswap_device_memory_total_bytes", "Device memory", labels=["device"]
            )
            used.add_metric([device], used_total[0])
            total.add_metric([device], used_total[1])
            out += [used, total]
        if (util := nvml.read(torch.device(device).index or 0)) is not None:
            gauge = GaugeMetricFamily(
                "loraswap_device_utilization_ratio", "GPU busy ratio (NVML)", labels=["device"]
            )
            gauge.add_metric([device], util)
            out.append(gauge)
    return out


class NvmlUtilization:
    """GPU busy ratio from NVML (``pynvml``, from the ``nvidia-ml-py`` package).

    NVML is initialised once, on the first :meth:`read`; when that fails (``pynvml`` not installed, no
    driver, no permission) the failure is logged once and remembered, and every read returns None.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pynvml: Any = None
        self._tried = False

    def _library(self) -> Any:
        """The initialised ``pynvml`` module, or None; initialises on the first call only."""
        with self._lock:
            if not self._tried:
                self._tried = True
                self._pynvml = _init_nvml()
            return self._pynvml

    def read(self, index: int) -> float | None:
        """Busy ratio in [0, 1] of the GPU at NVML ``index``; None without NVML or when the query fails."""
        pynvml = self._library()
        if pynvml is None:
            return None
        try:
            return pynvml.nvmlDeviceGetUtilizationRates(pynvml.nvmlDeviceGetHandleByIndex(index)).gpu / 100.0
        except pynvml.NVMLError:  # e.g. a device that does not report utilization: no sample this scrape
            return None


def _init_nvml() -> Any:
    try:
        import pynvml
    except ImportError:
        log.warning("no GPU utilization metric: pynvml is not installed (package nvidia-ml-py)")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.warning("no GPU utilization metric: NVML did not initialise (%s)", exc)
        return None
    return pynvml

"""The route table: every request goes to a route's merged model or to the shared base engine.

:class:`Router` stands where the edges (gRPC, HTTP) expect an engine: ``submit``, ``info``, the adapter
admin calls and ``stop`` act on the shared base engine, except that a request whose adapter has a route
is answered by the route's engine. Routes come from ``serve --route REF=MODEL`` at start, or from
:meth:`Router.promote`, which merges an adapter in a background worker, starts its engine and switches
new requests to it in one assignment; :meth:`Router.demote` switches back, lets what runs on the route
finish and frees its memory.

The table is replaced, never changed in place, so a request reads one consistent table without a lock.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from loraswap import paths
from loraswap.device import available_bytes, serial_torch_thread
from loraswap.errors import InvalidArgumentError, LoraswapError, NotFoundError
from loraswap.merge.process import merge_in_process, stop_merges
from loraswap.merge.record import RECORD_FILE
from loraswap.merge.sources import AdapterSource
from loraswap.registry.names import ref_name
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.api import AdapterStatus, EngineInfo, GenerationRequest, Tier
from loraswap.server.routes.route import (
    Route,
    RouteMemory,
    RouteSpec,
    RouteStatus,
    check_budget,
    estimate_memory,
    model_folder,
    read_record,
    route_engine_config,
)

log = logging.getLogger(__name__)
MERGE_DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
"""A promotion merges into the dtype its route will run in (quantized routes: the checkpoint's)."""


class RouteObserver(Protocol):
    def on_promotion(self, outcome: str) -> None: ...


class _NoObserver:
    def on_promotion(self, outcome: str) -> None:
        pass


class Router:
    """The shared base engine plus the routes to merged models.

    Args:
        base: The started shared engine.
        route_max_batch_size: Sequences a route's engine decodes together (None: the base's).
        route_memory_bytes: Budget of all routes together (weights + KV caches); None: what the device
            (or the host, on CPU) has available when a route is added.
        drain_seconds: How long a demoted route's running requests may take to finish.
        observer: Told of every promotion's outcome (``ok``, ``failed``).
    """

    def __init__(
        self,
        base: Engine,
        route_max_batch_size: int | None = None,
        route_memory_bytes: int | None = None,
        drain_seconds: float = 30.0,
        observer: RouteObserver | None = None,
    ) -> None:
        self.base = base
        self.route_max_batch_size, self.route_memory_bytes = route_max_batch_size, route_memory_bytes
        self.drain_seconds = drain_seconds
        self.observer = observer or _NoObserver()
        self._routes: tuple[Route, ...] = ()
        self._lock = threading.Lock()  # one change of the table at a time
        self._builder = ThreadPoolExecutor(
            1, thread_name_prefix="route-builder", initializer=serial_torch_thread
        )  # merges run serially beside the serving step threads (loraswap/device.py)
        self._promoting: dict[str, Future[Route]] = {}

    # -- the engine surface the edges use ---------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.base.draining

    def submit(self, request: GenerationRequest) -> Any:
        route = self.route_for(request.adapter)
        return route.submit(request) if route is not None else self.base.submit(request)

    def generate(self, request: GenerationRequest) -> Any:
        return self.submit(request).result()

    def info(self) -> EngineInfo:
        return self.base.info()

    def list_adapters(self) -> list[AdapterStatus]:
        return self.base.list_adapters()

    def load_adapter(self, ref: str, tier: Tier = "device", timeout: float = 120.0) -> AdapterStatus:
        return self.base.load_adapter(ref, tier, timeout)

    def unload_adapter(self, ref: str) -> None:
        self.base.unload_adapter(ref)

    def pin(self, ref: str) -> AdapterStatus:
        return self.base.pin(ref)

    def unpin(self, ref: str) -> AdapterStatus:
        return self.base.unpin(ref)

    def queue_depth(self) -> int:
        return self.base.queue_depth() + sum(r.engine.queue_depth() for r in self._routes)

    def healthy(self) -> bool:
        """False once the shared engine's step loop has stopped for good (a route's engine that fails
        fails only its route's requests; the shared base still answers the rest)."""
        return self.base.healthy()

    @property
    def failure(self) -> str | None:
        return self.base.failure

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Drain the base and every route at once (each within ``drain_timeout``), then stop them."""
        routes = self._routes
        stoppers = [threading.Thread(target=r.stop, args=(drain_timeout,)) for r in routes]
        for thread in stoppers:
            thread.start()
        self.base.stop(drain_timeout=drain_timeout)
        for thread in stoppers:
            thread.join()
        self._builder.shutdown(wait=False, cancel_futures=True)
        stop_merges()

    # -- routing ----------------------------------------------------------------------------

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    def route_for(self, ref: str) -> Route | None:
        """The route answering ``ref``, or None (the shared base answers, and reports its errors)."""
        routes = self._routes  # one read: the table a request sees is consistent
        if not ref or not routes:
            return None
        for route in routes:
            if route.adapter_digest is None and route.spec.ref == ref:
                return route
        name = ref_name(ref)
        bound = [r for r in routes if r.adapter_digest is not None and ref_name(r.spec.ref) == name]
        if not bound:
            return None
        try:
            _, digest, _ = self.base.adapters.resolve(ref)  # tags re-resolved after the tag TTL
        except LoraswapError:
            return None
        match = next((r for r in bound if r.adapter_digest == digest), None)
        if match is None:  # REF names another version now: a route on a model tag may have moved with it
            for route in bound:
                self._follow_later(route)
        return match

    def _follow_later(self, route: Route) -> None:
        """Look in the background for a newer merged model under a route's model tag, at most once per
        tag TTL per route (:meth:`follow`)."""
        if not route.follows_tag:
            return
        now = time.monotonic()
        with self._lock:
            if route.following or now - route.checked_at < self.base.config.tag_ttl_s:
                return
            route.following, route.checked_at = True, now
        self._builder.submit(self._follow_logged, route)

    def _follow_logged(self, route: Route) -> None:
        try:
            self.follow(route)
        except Exception:
            log.exception("route %s: following its model tag failed", route.spec)
        finally:
            route.following = False

    def follow(self, route: Route) -> Route | None:
        """If ``route``'s model tag now names another merged model, made from the version its adapter
        reference names now, bring that model up and put it in ``route``'s place (its running requests
        finish on the old one, which is then freed). Returns the new route, or None when nothing moved
        or the new model does not answer for the reference's version yet (requests stay on the shared
        base until it does)."""
        manifest = self.base.adapters.registry.resolve_model(route.spec.model)
        if manifest.digest == route.model_digest:
            return None
        folder = self.base.adapters.registry.pull_model(f"{manifest.name}@{manifest.digest}")
        try:
            new = self._build(route.spec, False, folder, manifest.digest)
        except InvalidArgumentError as exc:
            log.info("route %s: %s is not for the current version yet: %s", route.spec, manifest.digest, exc)
            return None
        with self._lock:
            if route not in self._routes:  # demoted meanwhile
                new.stop(0)
                return None
            self._routes = tuple(new if r is route else r for r in self._routes)
        log.info("route %s moved to %s", route.spec, manifest.digest)
        route.stop(self.drain_seconds)
        return new

    def settle(self) -> None:
        """Wait until the background work queued so far (promotions, tag follows) is done."""
        self._builder.submit(lambda: None).result()

    def routed_to(self) -> dict[str, Route]:
        """Adapter digest → the route that answers for it (digest-bound routes only)."""
        return {r.adapter_digest: r for r in self._routes if r.adapter_digest is not None}

    def route_state(self, route: Route) -> str:
        """``serving``, or ``stale`` when the route's reference now resolves to another version (its
        requests go to the shared base until the reference points back or the route is demoted)."""
        if route.adapter_digest is None:
            return "serving"
        try:
            _, digest, _ = self.base.adapters.resolve(route.spec.ref)
        except LoraswapError:
            return "stale"
        return "serving" if digest == route.adapter_digest else "stale"

    def route_statuses(self) -> list[RouteStatus]:
        return [route.status(self.route_state(route)) for route in self._routes]

    # -- building routes --------------------------------------------------------------------

    def add_configured(self, specs: list[RouteSpec]) -> None:
        """Bring up the routes of ``serve --route`` (at start); the first that cannot be served raises,
        with its reason, and the ones already up are stopped."""
        try:
            for spec in specs:
                self._add(self._build(spec, promoted=False))
        except BaseException:
            for route in self._routes:
                route.stop(0)
            self._routes = ()
            raise

    def _build(
        self,
        spec: RouteSpec,
        promoted: bool,
        folder: Path | None = None,
        model_digest: str | None = None,
    ) -> Route:
        if folder is None:
            folder, model_digest = model_folder(spec.model, self.base.adapters.registry)
        record = read_record(folder)
        problems = []
        if record is not None and record.base_fingerprint != self.base.fingerprint:
            problems.append(
                f"{spec.model} was merged on base {record.base_model_id} ({record.base_fingerprint}), "
                f"not this server's {self.base.info().base_model} ({self.base.fingerprint})"
            )
        if record is not None and len(record.adapters) == 1 and record.adapters[0].source == "registry":
            merged = record.adapters[0]
            if ref_name(spec.ref) != merged.name:
                problems.append(f"{spec.model} was merged from adapter {merged.name!r}, not {spec.ref!r}")
            else:
                try:
                    _, digest, _ = self.base.adapters.resolve(spec.ref)
                except NotFoundError as exc:
                    problems.append(str(exc))
                else:
                    if digest != merged.digest:
                        problems.append(
                            f"{spec.ref} resolves to {digest}, but {spec.model} was merged from "
                            f"{merged.digest} (merge it again, or name that version)"
                        )
        if problems:
            raise InvalidArgumentError(f"route {spec} cannot be served", problems)
        config = self._route_config(folder)
        self._check_budget(spec, estimate_memory(folder, config, config.quantization))
        engine = Engine(config, registry=self.base.adapters.registry)
        engine.start()
        return Route(spec, folder, record, engine, model_digest, promoted)

    def _route_config(self, folder: Path) -> EngineConfig:
        """The engine config of a route over ``folder`` (the shared engine's precision and device)."""
        return route_engine_config(
            self.base.config, folder, self.route_max_batch_size, self.base.loaded.quantization,
            str(self.base.device),
        )  # fmt: skip

    def _check_budget(self, spec: RouteSpec, need: RouteMemory) -> None:
        """Refuse ``need`` past the budget (a route that replaces another holds both while it takes over).
        Routes are built one at a time (at start, then on the one builder thread), so the table read
        here cannot grow before the new route joins it."""
        if self.route_memory_bytes is None:
            check_budget(spec, need, 0, available_bytes(self.base.device))
        else:
            used = sum(r.memory.total for r in self._routes)
            check_budget(spec, need, used, self.route_memory_bytes)

    def _add(self, route: Route) -> None:
        with self._lock:
            clash = [r for r in self._routes if r.spec.ref == route.spec.ref]
            if clash or (route.adapter_digest and route.adapter_digest in self.routed_to()):
                route.stop(0)
                raise InvalidArgumentError(f"{route.spec.ref} already has a route")
            self._routes = (*self._routes, route)
        log.info("route up: %s (%s)", route.spec, route.status("serving"))

    # -- promotion and demotion -------------------------------------------------------------

    def promote(self, ref: str, timeout: float | None = None) -> Route:
        """Merge ``ref``'s current version into the base in a background worker, start its route and
        switch new requests for it there. Requests already running stay where they are. Promoting a
        version that is already routed returns its route."""
        name, digest, _ = self.base.adapters.resolve(ref)
        with self._lock:
            existing = self.routed_to().get(digest)
            future = None if existing else self._promoting.get(digest)
            if existing is None and future is None:
                future = self._builder.submit(self._promote, ref, name, digest)
                self._promoting[digest] = future
        if existing is not None:
            return existing
        assert future is not None
        try:
            route = future.result(timeout=timeout)
        except LoraswapError:
            self.observer.on_promotion("failed")
            raise
        return route

    def _promote(self, ref: str, name: str, digest: str) -> Route:
        try:
            registry = self.base.adapters.registry
            source = AdapterSource.from_registry(registry, f"{name}@{digest}")
            output = paths.home() / "routes" / digest.split(":", 1)[1][:32]
            quantization = self.base.loaded.quantization
            spec = RouteSpec(ref, str(output))
            # Before the merge (the merged model has the base's shapes): a route that cannot fit is
            # refused at once, not after minutes of merging.
            config = self._route_config(self.base.base_ref.path)
            self._check_budget(spec, estimate_memory(self.base.base_ref.path, config, quantization))
            if not (output / RECORD_FILE).is_file():
                output.parent.mkdir(parents=True, exist_ok=True)
                merge_in_process(  # a worker process: the merge never holds the serving process's GIL
                    self.base.base_ref, [source], output, dtype=MERGE_DTYPES.get(quantization), force=True
                )
            route = self._build(spec, promoted=True, folder=output)
            self._add(route)
            self.observer.on_promotion("ok")
            return route
        finally:
            with self._lock:
                self._promoting.pop(digest, None)

    def demote(self, ref: str) -> RouteMemory:
        """Send ``ref``'s requests back to the shared base, let the route's running requests finish, then
        free the route's memory (and a promoted route's merged folder). Returns what it held."""
        with self._lock:
            route = next((r for r in self._routes if r.spec.ref == ref), None)
            if route is None:
                try:
                    _, digest, _ = self.base.adapters.resolve(ref)
                except LoraswapError:
                    digest = None
                route = next((r for r in self._routes if digest and r.adapter_digest == digest), None)
            if route is None:
                raise NotFoundError(f"{ref} has no route")
            self._routes = tuple(r for r in self._routes if r is not route)
        memory = route.memory
        route.stop(self.drain_seconds)
        if route.promoted:
            shutil.rmtree(route.folder, ignore_errors=True)
        log.info("route down: %s", route.spec)
        return memory

"""The multi-LoRA engine: one resident base, per-request adapters, iteration-level batching.

A background thread (the engine thread) runs steps. Each step admits waiting requests (as the
:class:`~loraswap.server.engine.admission.AdmissionPolicy` picks them within the free KV rows and adapter
slots), asks the :class:`~loraswap.server.engine.scheduler.Scheduler` for one
packed batch of decode tokens plus bounded prefill chunks, runs one forward pass, samples, and streams
tokens back. Requests join and leave at step boundaries (or between the layers of a decode step, for
a prefill: see the scheduler).

Threads: callers submit from any thread (under ``_cv``); the request lists, the KV rows and the
scheduler's state belong to the engine thread, and admin operations take ``step_lock`` to act between
steps.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from importlib import metadata

import torch

from loraswap.device import pick_device, release_freed_host_memory, set_thread_torch_threads
from loraswap.errors import (
    CancelledError,
    DeadlineExceededError,
    DrainingError,
    InvalidArgumentError,
    OverloadedError,
    UnavailableError,
)
from loraswap.models import base_fingerprint, resolve_base
from loraswap.server.adapters.manager import AdapterManager
from loraswap.server.adapters.reader import BaseShape, HostAdapter
from loraswap.server.engine.admission import AdmissionPolicy, Resident, Waiter
from loraswap.server.engine.api import (
    AdapterStatus,
    EngineInfo,
    EngineObserver,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    NullObserver,
    Tier,
    TokenEvent,
    now,
)
from loraswap.server.engine.base_loader import load_base
from loraswap.server.engine.config import EngineConfig
from loraswap.server.engine.detok import TextStream
from loraswap.server.engine.forward import PackedForward
from loraswap.server.engine.kv_cache import KVCache
from loraswap.server.engine.request import RequestHandle, RequestState
from loraswap.server.engine.sampling import SamplerState, sample_batch
from loraswap.server.engine.scheduler import Plan, Scheduler
from loraswap.server.lora.context import LoraContext
from loraswap.server.lora.layer import install_lora_layers

log = logging.getLogger(__name__)
IDLE_WAKE_S = 0.05  # an idle step loop looks this often for cancelled and expired waiting requests


def _open_registry(url: str | None):
    from loraswap.registry import open_registry

    return open_registry(url)


class Engine:
    """Serves generation requests for many adapters over one base model.

    Args:
        config: Engine configuration (validated here; problems raise InvalidArgumentError).
        observer: Metrics hooks (default: none).
        registry: A registry object to use instead of opening ``config.registry``.
    """

    def __init__(
        self, config: EngineConfig, observer: EngineObserver | None = None, registry: object | None = None
    ) -> None:
        if config.problems():
            raise InvalidArgumentError("invalid engine configuration", config.problems())
        self.config = config
        self.observer = observer or NullObserver()
        self.device = pick_device(config.device)
        self.base_ref = resolve_base(config.base)
        self.fingerprint = base_fingerprint(self.base_ref.path)
        _check_architecture(self.base_ref.config, config.max_seq_len)
        self.loaded = load_base(self.base_ref, config.quantization, self.device)
        self.tokenizer = self.loaded.tokenizer
        model = self.loaded.model
        dtype = self.loaded.compute_dtype
        if config.adapter_slots:
            context, layers = install_lora_layers(model, config.adapter_slots, config.max_rank, dtype)
        else:  # a merged model's engine (a route): plain projections, no LoRA work per token
            context, layers = LoraContext(max_rank=config.max_rank), {}
        shape = BaseShape(
            {n: (m.in_features, m.out_features) for n, m in layers.items()}, config.max_rank, self.fingerprint
        )
        self.kv = KVCache.for_model(
            model.config, config.max_batch_size, config.max_seq_len, dtype, self.device
        )
        self.adapters = AdapterManager(
            registry_factory=(lambda: registry)
            if registry is not None
            else (lambda: _open_registry(config.registry)),
            base=shape,
            layers=layers,
            num_slots=config.adapter_slots,
            host_budget=config.host_cache_bytes,
            dtype=dtype,
            tag_ttl_s=config.tag_ttl_s,
            stale_grace_s=config.tag_stale_grace_s,
            refresh_wait_s=config.tag_refresh_wait_s,
            workers=config.load_workers,
            observer=self.observer,
        )
        self.forward = PackedForward(
            model, self.kv, context, self.adapters.ranks, config.lora_op, config.fuse_projections,
            config.pack_weights,
        )  # fmt: skip
        release_freed_host_memory()  # the plain weights that packing and fusing replaced
        self.eos_ids = _eos_ids(self.tokenizer, model)
        self._incoming: deque[RequestState] = deque()
        self._waiting: list[RequestState] = []
        self._running: list[RequestState] = []
        self._cv = threading.Condition()
        self.step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.step_threads: int | None = None  # the step thread's torch CPU threads, once it runs
        self._stopping = False
        self.scheduler = Scheduler(config.prefill_policy, config.prefill_chunk, config.prefill_between_layers)
        self.admission = AdmissionPolicy(config.admission())  # engine thread only, like the request lists
        self.draining = False
        self.failure: str | None = None  # why the step loop stopped for good (None while it serves)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background step loop."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine-steps", daemon=True)
            self._thread.start()

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish for up to ``drain_timeout`` s, then stop."""
        self.draining = True
        deadline = time.monotonic() + drain_timeout
        while self._pending() and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.02)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self.step_lock:
            for state in [*self._incoming, *self._waiting, *self._running]:
                state.fail(DrainingError("the server stopped before the request finished"))
                self._release(state)
            self._incoming.clear()
            self._waiting.clear()
            self._running.clear()
        self.adapters.close()

    def _pending(self) -> int:
        return len(self._incoming) + len(self._waiting) + len(self._running)

    def healthy(self) -> bool:
        """False once the step loop has stopped for good (it failed, or its thread is gone while the
        engine was not stopped): nothing will run again, health says NOT_SERVING."""
        thread = self._thread
        died = thread is not None and not thread.is_alive() and not self._stopping
        return self.failure is None and not died

    def queue_depth(self) -> int:
        return len(self._incoming) + len(self._waiting)

    # -- requests -----------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request``. Bad parameters, a full queue and draining are refused at once;
        adapter errors (unknown, invalid, incompatible) are raised from the handle."""
        if self.failure is not None:
            raise UnavailableError(f"the engine stopped: {self.failure}")
        if self.draining:
            raise DrainingError("the server is draining and takes no new requests")
        if request.adapter and not self.config.adapter_slots:
            raise InvalidArgumentError(
                f"this engine serves a merged model and has no adapter slots; adapter {request.adapter!r}"
                " cannot be applied"
            )
        prompt_ids = self._encode(request)
        with self._cv:
            if self.queue_depth() >= self.config.max_queue:
                raise OverloadedError(f"the request queue is full ({self.config.max_queue} waiting)")
            future = self.adapters.request(request.adapter) if request.adapter else None
            if future is not None:
                future.add_done_callback(self._adapter_ready)
            state = RequestState(
                request=request,
                prompt_ids=prompt_ids,
                text=TextStream(self.tokenizer, request.sampling.stop),
                adapter=future,
                sampler=SamplerState(request.sampling, prompt_ids),
            )
            self._incoming.append(state)
            self.scheduler.arrivals.set()
            self._cv.notify()
        return RequestHandle(state)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Submit and wait for the result."""
        return self.submit(request).result()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _adapter_ready(self, _future: object) -> None:
        self.scheduler.arrivals.set()  # looked at between the layers of a decode step
        self._wake()

    def _encode(self, request: GenerationRequest) -> list[int]:
        problems = request.sampling.problems()
        if (request.prompt is None) == (request.messages is None):
            problems.append("give exactly one of prompt or messages")
        ids: list[int] = []
        if request.prompt is not None:
            ids = self.tokenizer(request.prompt)["input_ids"]
        elif request.messages is not None:
            ids = self._chat_ids(request)
        if not ids and not problems:
            problems.append("the prompt is empty")
        if len(ids) >= self.config.max_seq_len:
            problems.append(
                f"the prompt has {len(ids)} tokens; this server's limit is {self.config.max_seq_len - 1}"
            )
        if problems:
            raise InvalidArgumentError("invalid generation request", problems)
        return list(ids)

    def _chat_ids(self, request: GenerationRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgumentError("the base model has no chat template; send a plain prompt")
        messages = [{"role": m.role, "content": m.content} for m in request.messages or ()]
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    # -- the step loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            if self.config.step_threads is not None:
                set_thread_torch_threads(self.config.step_threads)
            self.step_threads = torch.get_num_threads()  # what the step thread runs with, for tests/info
            self._steps()
        except BaseException as exc:  # the loop is gone: say so, fail everything, refuse new work
            log.exception("the engine's step loop stopped")
            self._give_up(f"its step loop failed ({type(exc).__name__}: {exc})")

    def _steps(self) -> None:
        failures = 0
        while True:
            with self._cv:
                while not self._stopping and not self._running and not self._ready_waiting():
                    self._cv.wait(timeout=IDLE_WAKE_S)
                if self._stopping:
                    return
                self.take_incoming()
            try:
                with self.step_lock:
                    self.step()
                failures = 0
            except Exception as exc:  # one failed step fails its batch; the server goes on
                failures += 1
                log.exception("engine step failed (%d in a row)", failures)
                with self.step_lock:
                    for state in self._running:
                        state.fail(RuntimeError("internal error while generating"))
                        self._release(state)
                    self._running.clear()
                if failures >= self.config.max_step_failures:
                    self._give_up(f"{failures} steps in a row failed, the last with {type(exc).__name__}")
                    return

    def _give_up(self, reason: str) -> None:
        """Stop serving for good: every request fails UNAVAILABLE, new ones are refused, health turns
        NOT_SERVING (:meth:`healthy`)."""
        self.failure = reason
        self.draining = True
        with self._cv:
            incoming = list(self._incoming)
            self._incoming.clear()
        with self.step_lock:
            for state in [*incoming, *self._waiting, *self._running]:
                state.fail(UnavailableError(f"the engine stopped: {reason}"))
                self._release(state)
            self._waiting.clear()
            self._running.clear()

    def take_incoming(self) -> None:
        """Move submitted requests to the waiting list (the step loop does this before every step)."""
        self._waiting.extend(self._incoming)
        self._incoming.clear()

    def _ready_waiting(self) -> bool:
        """Whether a waiting request needs the step loop: new, admissible, or to be dropped (its load
        failed, it was cancelled, its deadline passed), so none stays queued while the engine idles."""
        if self._incoming:
            return True
        t = now()
        return any(s.adapter is None or s.adapter.done() or _ended(s, t) for s in self._waiting)

    def step(self) -> None:
        """One iteration: drop dead requests, admit, run one packed forward, sample, stream."""
        self._drop_dead()
        self._admit()
        if not self._running:
            return
        plan = self.scheduler.plan(self._running)
        pausable = self.scheduler.begin(plan)
        started = time.perf_counter()
        self._run(plan, self._prefill_between_layers if pausable else None)
        self._observe(plan, time.perf_counter() - started - self.scheduler.step.nested_s)

    def _run(self, plan: Plan, between_layers: Callable[[], None] | None = None) -> None:
        logits = self.forward([chunk for _, chunk in plan], between_layers)
        self._advance(plan, logits)

    def _observe(self, plan: Plan, seconds: float) -> None:
        distinct = len({c.slot for _, c in plan if c.slot >= 0})
        prefill = sum(len(c.token_ids) for _, c in plan if len(c.token_ids) > 1)
        self.observer.on_step(len(plan), distinct, prefill, seconds)

    def _prefill_between_layers(self) -> None:
        """Called between two layers of a decode step: run the prefill the scheduler picks, if any
        (at most one per decode step), so first tokens do not wait for the step in flight."""
        if not self.scheduler.should_pause():
            return
        with self._cv:
            self.take_incoming()
        self._drop_dead(self._waiting)  # never running ones: the paused step still uses their rows
        self._admit()
        plan = self.scheduler.nested_plan(self._running)
        if not plan:
            return
        started = time.perf_counter()
        self._run(plan)
        seconds = time.perf_counter() - started
        self.scheduler.nested_done(seconds)
        self._observe(plan, seconds)

    def _drop_dead(self, states: list[RequestState] | None = None) -> None:
        """Fail and remove cancelled or expired requests among ``states`` (default: all)."""
        t = now()
        for state in list(states) if states is not None else [*self._waiting, *self._running]:
            error = _ended(state, t)
            loaded = state.adapter
            if error is None and state in self._waiting and loaded is not None and loaded.done():
                error = loaded.exception()
            if error is not None:
                state.fail(error)
                self._remove(state)

    def _admit(self) -> None:
        """One admission round: admit the waiting requests the admission policy picks, in the slots it
        picks, then copy the adapters it prefetches into free slots."""
        hosts: dict[str, HostAdapter] = {}
        waiting = []
        for state in self._waiting:
            future = state.adapter
            if future is None:
                waiting.append(Waiter(state, None))
            elif future.done() and future.exception() is None:  # a failed load is dropped next round
                hosts[future.result().digest] = future.result()
                waiting.append(Waiter(state, future.result().digest))
            else:  # still loading: later requests whose adapters are ready may pass it
                waiting.append(Waiter(state, None, ready=False))
        table, free_slots = self.adapters.slot_snapshot()
        residents = [Resident(digest, users, pinned) for digest, users, pinned in table]
        decision = self.admission.decide(waiting, residents, free_slots, self.kv.free_rows)
        for admission in decision.admit:
            state = admission.key
            if admission.adapter is not None:
                slot = self.adapters.activate(hosts[admission.adapter], admission.victim)
                if slot is None:  # the policy plans on a copy of the slot table made under the step lock
                    raise RuntimeError(f"admission planned a slot for {admission.adapter} that is not free")
                self.adapters.acquire(admission.adapter)
                state.slot, state.digest = slot, admission.adapter
            state.row = self.kv.allocate()
            state.admitted = now()
            self._waiting.remove(state)
            self._running.append(state)
        for digest in decision.prefetch:
            self.adapters.activate(hosts[digest])

    def _advance(self, plan: Plan, logits: torch.Tensor) -> None:
        """Account for the tokens ``plan`` ran and sample the next token of every chunk that asked for
        logits, the whole batch at once (one host transfer per step)."""
        sampled = []
        for state, chunk in plan:
            state.cached += len(chunk.token_ids)
            if chunk.want_logits:
                sampled.append(state)
        if not sampled:
            return
        tokens = sample_batch(logits, [s.sampler for s in sampled])
        for state, token in zip(sampled, tokens, strict=True):
            self._emit_token(state, token)

    def _emit_token(self, state: RequestState, token: int) -> None:
        t = now()
        self.observer.on_token(
            state.request.request_id,
            state.request.adapter,
            t - state.last_token if state.last_token else None,
        )
        state.first_token = state.first_token or t
        state.last_token = t
        state.output_ids.append(token)
        params = state.request.sampling
        is_eos = token in self.eos_ids and not params.ignore_eos
        delta = "" if is_eos else state.text.add(token)
        reason: FinishReason | None = None
        if is_eos:
            reason = "eos"
        elif state.text.stopped:
            reason = "stop"
        elif len(state.output_ids) >= params.max_new_tokens or state.cached + 1 >= self.config.max_seq_len:
            reason = "length"
        if reason is None:
            state.emit(TokenEvent(delta, (token,)))
            return
        delta += state.text.flush()
        state.emit(TokenEvent(delta, (token,), result=state.result(reason)))
        self._remove(state)

    def _remove(self, state: RequestState) -> None:
        if state in self._running:
            self._running.remove(state)
        if state in self._waiting:
            self._waiting.remove(state)
        self._release(state)

    def _release(self, state: RequestState) -> None:
        if state.row >= 0:
            self.kv.release(state.row)
            state.row = -1
        if state.slot >= 0:
            self.adapters.release(state.digest)
            state.slot = -1

    # -- admin --------------------------------------------------------------------------------

    def load_adapter(self, ref: str, tier: Tier = "device", timeout: float = 120.0) -> AdapterStatus:
        """Warm ``ref`` into ``tier`` ahead of traffic (``disk``: pull only; ``host``; ``device``)."""
        if tier not in ("device", "host", "disk"):
            raise InvalidArgumentError(f"tier must be device, host or disk, got {tier!r}")
        if tier == "disk":
            name, digest, _ = self.adapters.resolve(ref)
            self.adapters.registry.pull(f"{name}@{digest}")
            self.adapters.remember(name, digest)
            return self.adapters.status(digest)
        adapter = self.adapters.request(ref).result(timeout=timeout)
        if tier == "device":
            with self.step_lock:
                self._activate(adapter)
        return self.adapters.status(adapter.digest)

    def _activate(self, adapter: HostAdapter) -> None:
        """Put ``adapter`` in a device slot now (the caller holds the step lock)."""
        if self.adapters.activate(adapter) is None:
            raise OverloadedError("every adapter slot is pinned or in use")

    def unload_adapter(self, ref: str, keep_host: bool = False) -> None:
        """Drop ``ref`` from the device and host tiers (``keep_host``: from the device only, leaving the
        host copy to the host tier's byte budget); an idle slot is freed now, one in use stays."""
        _, digest, _ = self.adapters.resolve(ref)
        with self.step_lock:
            self.adapters.unload(digest, keep_host=keep_host)

    def pin(self, ref: str) -> AdapterStatus:
        """Load ``ref`` onto the device and keep it there."""
        adapter = self.adapters.request(ref).result(timeout=120.0)
        with self.step_lock:  # one hold: no step can evict it between the activation and the pin
            self._activate(adapter)
            self.adapters.set_pinned(adapter.digest, True)
        return self.adapters.status(adapter.digest)

    def unpin(self, ref: str) -> AdapterStatus:
        _, digest, _ = self.adapters.resolve(ref)
        with self.step_lock:
            self.adapters.set_pinned(digest, False)
        return self.adapters.status(digest)

    def list_adapters(self) -> list[AdapterStatus]:
        return self.adapters.statuses()

    def lora_activity(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Adapter references (as requested, sorted, each once) with running sequences, and with requests
        waiting for admission (adapter loading, or no slot or KV row yet); base-model requests are not
        listed. Any thread: a snapshot of the request lists, each copied in one step."""
        with self._cv:
            incoming = list(self._incoming)
        running, waiting = list(self._running), [*self._waiting, *incoming]
        return (
            tuple(sorted({s.request.adapter for s in running if s.request.adapter})),
            tuple(sorted({s.request.adapter for s in waiting if s.request.adapter})),
        )

    def info(self) -> EngineInfo:
        return EngineInfo(
            base_model=self.base_ref.model_id,
            base_fingerprint=self.fingerprint,
            quantization=self.loaded.quantization,
            dtype=str(self.loaded.compute_dtype).removeprefix("torch."),
            device=str(self.device),
            adapter_slots=self.config.adapter_slots,
            max_rank=self.config.max_rank,
            max_batch_size=self.config.max_batch_size,
            max_seq_len=self.config.max_seq_len,
            max_queue=self.config.max_queue,
            kv_cache_bytes=self.kv.nbytes,
            versions=dict(_versions()),
        )


def _ended(state: RequestState, t: float) -> BaseException | None:
    """The error of a request its caller has given up on at time ``t`` (cancelled, past its deadline)."""
    if state.cancelled.is_set():
        return CancelledError("the request was cancelled")
    if state.request.deadline is not None and t > state.request.deadline:
        return DeadlineExceededError("the request's deadline passed")
    return None


@functools.cache
def _versions() -> dict[str, str]:
    """The versions :meth:`Engine.info` reports, read once (the HTTP edge asks for every request)."""
    from loraswap import __version__

    return {
        "loraswap": __version__,
        "torch": torch.__version__,
        # package metadata, not imports: importing peft imports bitsandbytes on every start
        "transformers": metadata.version("transformers"),
        "peft": metadata.version("peft"),
    }


def _check_architecture(model_config: dict, max_seq_len: int) -> None:
    """Refuse what the packed forward does not implement (it has full causal attention only)."""
    window = model_config.get("sliding_window")
    uses_window = model_config.get("use_sliding_window", model_config.get("model_type") == "mistral")
    if uses_window and window and max_seq_len > window:
        raise InvalidArgumentError(
            f"the base uses sliding-window attention ({window} tokens), which loraswap does not implement; "
            f"set max_seq_len <= {window}"
        )


def _eos_ids(tokenizer, model) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids

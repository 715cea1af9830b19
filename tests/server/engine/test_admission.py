"""Admission under slot pressure: the policy stepped by hand against the real slot table, then the engine
on the tiny model with more distinct adapters than slots (FIFO against adapter-aware)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loraswap.errors import InvalidArgumentError
from loraswap.models import resolve_base
from loraswap.registry.registry import open_registry
from loraswap.server.adapters.slots import SlotTable
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.admission import (
    AdmissionConfig,
    AdmissionPolicy,
    Decision,
    Resident,
    Waiter,
)
from loraswap.server.engine.api import GenerationRequest, SamplingParams

# --- the policy, stepped -------------------------------------------------------------------------


@dataclass
class Bench:
    """A stepped world for the policy: the real slot table, a row budget and the waiting queue.

    Requests are ``name:adapter`` strings (``name:`` for the base). Admitted requests run until
    :meth:`finish` is called for them.
    """

    policy: AdmissionPolicy
    slots: SlotTable
    rows: int
    waiting: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    loading: set[str] = field(default_factory=set)

    @classmethod
    def make(cls, slots: int, rows: int, **config) -> Bench:
        return cls(AdmissionPolicy(AdmissionConfig(**config)), SlotTable(slots), rows)

    def arrive(self, *requests: str) -> None:
        self.waiting.extend(requests)

    def seed(self, *requests: str) -> None:
        """Requests already running (their adapters resident, in this order)."""
        for request in requests:
            adapter = _adapter(request)
            if adapter is not None:
                self.slots.place(adapter)
                self.slots.acquire(adapter)
            self.running.append(request)
            self.rows -= 1

    def round(self) -> Decision:
        """One admission round, carried out on the slot table as the engine does."""
        waiting = [Waiter(r, _adapter(r), r not in self.loading) for r in self.waiting]
        residents = [Resident(*entry) for entry in self.slots.residents()]
        decision = self.policy.decide(waiting, residents, self.slots.free_slots, self.rows)
        for admission in decision.admit:
            if admission.adapter is not None:
                _, evicted, _ = self.slots.place(admission.adapter, admission.victim)
                assert evicted == admission.victim
                self.slots.acquire(admission.adapter)
            self.waiting.remove(admission.key)
            self.running.append(admission.key)
            self.rows -= 1
        for adapter in decision.prefetch:
            assert self.slots.place(adapter)[1] is None  # a free slot: nothing evicted
        assert self.rows >= 0
        return decision

    def admitted(self) -> list[str]:
        return [a.key for a in self.round().admit]

    def finish(self, *requests: str) -> None:
        for request in requests:
            self.running.remove(request)
            self.rows += 1
            adapter = _adapter(request)
            if adapter is not None:
                self.slots.release(adapter)


def _adapter(request: str) -> str | None:
    return request.split(":")[1] or None


def test_fifo_stalls_behind_a_request_that_needs_a_slot_and_adapter_aware_fills_the_batch() -> None:
    for policy, expected in (("fifo", []), ("adapter-aware", ["a1:A", "b1:B", "base:"])):
        bench = Bench.make(slots=2, rows=6, policy=policy)
        bench.seed("a0:A", "b0:B")
        bench.arrive("c1:C", "a1:A", "b1:B", "base:")
        assert bench.admitted() == expected, policy
    assert bench.policy.stats.skips == 1  # c1 was passed over once
    bench.finish("a0:A", "a1:A")  # A is idle now: c1 takes its slot
    assert [(a.key, a.victim) for a in bench.round().admit] == [("c1:C", "A")]


def test_resident_first_then_a_free_slot_and_rows_in_arrival_order() -> None:
    bench = Bench.make(slots=3, rows=3)
    bench.seed("a0:A")
    bench.arrive("b1:B", "a1:A", "a2:A")
    assert bench.admitted() == ["a1:A", "a2:A"]  # rows are short: the resident adapter's requests first
    bench.finish("a0:A")
    assert bench.admitted() == ["b1:B"]  # a free slot: no eviction
    assert "A" in bench.slots


def test_an_idle_slot_is_given_up_by_fewest_waiters_then_least_recently_used() -> None:
    bench = Bench.make(slots=3, rows=8, max_skips=1)
    bench.seed("x0:X", "y0:Y", "z0:Z")
    bench.arrive("c1:C")
    assert bench.admitted() == []  # every slot in use: c1 passed over... by nobody, so no skip yet
    bench.arrive("z1:Z")
    assert bench.admitted() == ["z1:Z"]  # c1 passed over once: mandatory from now on
    assert bench.policy.is_mandatory("c1:C")
    bench.finish("x0:X", "y0:Y")  # X (least recently used) and Y idle; X has a waiter, Y none
    bench.loading.add("x2:X")  # a loading request does not count as a waiter
    bench.arrive("x1:X", "x2:X")
    decision = bench.round()
    assert [(a.key, a.victim) for a in decision.admit] == [("c1:C", "Y"), ("x1:X", None)]
    fifo = Bench.make(slots=3, rows=8, policy="fifo")
    fifo.seed("x0:X", "y0:Y", "z0:Z")
    fifo.finish("x0:X", "y0:Y")
    fifo.arrive("c1:C", "x1:X")
    # LRU alone: X goes though x1 waits for it, so x1 takes Y's slot (two copies instead of one)
    assert [(a.key, a.victim) for a in fifo.round().admit] == [("c1:C", "X"), ("x1:X", "Y")]


def test_a_request_passed_over_max_skips_times_drains_a_slot_and_is_admitted() -> None:
    """One slot, a stream of requests for the resident adapter: without the bound, the request for
    another adapter would wait for ever."""
    bench = Bench.make(slots=1, rows=2, max_skips=2, max_wait_rounds=1000)
    bench.seed("a0:A")
    bench.arrive("b:B", "a1:A")
    assert bench.admitted() == ["a1:A"]  # skip 1
    bench.finish("a0:A")
    bench.arrive("a2:A")
    assert bench.admitted() == ["a2:A"]  # skip 2: b is mandatory now
    assert bench.policy.is_mandatory("b:B") and bench.policy.stats.mandatory == 1
    bench.finish("a1:A")
    bench.arrive("a3:A")
    decision = bench.round()
    assert decision.admit == [] and decision.draining == "A"  # A admits nobody new
    assert bench.rows == 1  # a row is free, and kept for nobody but the slot's new owner
    bench.finish("a2:A")  # A's last sequence ends
    decision = bench.round()
    assert [(a.key, a.victim) for a in decision.admit] == [("b:B", "A")]
    assert bench.policy.stats.longest_mandatory_rounds == 1
    assert bench.policy.stats.longest_wait_rounds == 3
    assert bench.admitted() == []  # a3 waits for A's slot in its turn


def test_without_a_bound_the_stream_starves_the_other_adapter() -> None:
    bench = Bench.make(slots=1, rows=2, max_skips=10**6, max_wait_rounds=10**6)
    bench.seed("a0:A")
    bench.arrive("b:B")
    for i in range(1, 50):
        bench.arrive(f"a{i}:A")
        assert bench.admitted() == [f"a{i}:A"]
        bench.finish(f"a{i - 1}:A")
    assert bench.waiting == ["b:B"] and bench.policy.stats.skips == 49


def test_waiting_max_wait_rounds_makes_a_request_mandatory_without_skips() -> None:
    bench = Bench.make(slots=1, rows=1, max_skips=10**6, max_wait_rounds=3)
    bench.seed("a0:A")
    bench.arrive("b:B")
    for _ in range(3):
        assert not bench.policy.is_mandatory("b:B")
        assert bench.round().draining is None
    assert bench.policy.is_mandatory("b:B") and bench.policy.stats.skips == 0
    bench.arrive("a1:A")
    assert bench.round().draining == "A"
    bench.finish("a0:A")
    assert bench.admitted() == ["b:B"]  # first for the freed row, ahead of a1 which needs no slot


def test_one_slot_drains_at_a_time_and_mandatory_requests_go_in_arrival_order() -> None:
    bench = Bench.make(slots=3, rows=6, max_skips=0)
    bench.seed("a0:A", "b0:B", "b1:B", "e0:E")
    bench.slots.pin("E")
    bench.arrive("c:C", "d:D")
    decision = bench.round()  # max_skips 0: both mandatory after their first round
    assert decision.admit == [] and decision.draining is None
    decision = bench.round()
    assert decision.draining == "A"  # the fewest running sequences; never the pinned E
    bench.arrive("a1:A", "b2:B")
    assert bench.admitted() == ["b2:B"]  # the other slots keep filling; d waits its turn
    bench.finish("b0:B", "b1:B", "b2:B")  # B goes idle first, though A was the one draining
    assert [(a.key, a.victim) for a in bench.round().admit] == [("c:C", "B")]
    decision = bench.round()
    assert decision.draining == "A"  # now d's turn: the slot that was draining goes on draining
    assert decision.admit == []  # a1 (mandatory too, and younger than d) waits with A
    bench.finish("a0:A")
    assert [(a.key, a.victim) for a in bench.round().admit] == [("d:D", "A")]
    assert bench.slots.is_pinned("E") and "E" in bench.slots


def test_an_in_use_or_pinned_slot_is_never_given_up() -> None:
    bench = Bench.make(slots=2, rows=4, max_skips=0)
    bench.seed("p0:P")
    bench.finish("p0:P")
    bench.slots.place("U")
    bench.slots.acquire("U")
    bench.slots.pin("P")  # P idle but pinned, U in use
    bench.arrive("c:C")
    for _ in range(5):
        decision = bench.round()
        assert decision.admit == [] and decision.draining in (None, "U")
    assert "P" in bench.slots and "U" in bench.slots


def test_rows_short_prefetch_waiting_adapters_into_free_slots() -> None:
    for policy, prefetch in (("adapter-aware", ["B", "C"]), ("fifo", [])):
        bench = Bench.make(slots=4, rows=1, policy=policy)
        bench.seed("a0:A")
        bench.loading.add("d:D")  # no host copy yet: nothing to copy
        bench.arrive("d:D", "b:B", "c:C", "b2:B")
        decision = bench.round()
        assert decision.admit == [] and decision.prefetch == prefetch, policy
    assert bench.slots.free_slots == 3
    bench = Bench.make(slots=4, rows=1)
    bench.seed("a0:A")
    bench.arrive("b:B", "c:C")
    bench.round()
    assert "B" in bench.slots and "C" in bench.slots and bench.policy.stats.prefetched == 2
    bench.finish("a0:A")
    assert [(a.key, a.victim) for a in bench.round().admit] == [("b:B", None)]  # already resident


def test_loading_requests_are_passed_without_ageing_and_forgotten_requests_are_dropped() -> None:
    bench = Bench.make(slots=2, rows=4, max_skips=1)
    bench.loading.add("b:B")
    bench.arrive("b:B", "a:A")
    assert bench.admitted() == ["a:A"]
    assert not bench.policy.is_mandatory("b:B") and bench.policy.stats.skips == 0
    bench.slots.place("C")
    bench.slots.acquire("C")  # both slots in use now
    bench.loading.clear()
    bench.arrive("a2:A")
    assert bench.admitted() == ["a2:A"]
    assert bench.policy.is_mandatory("b:B")
    bench.waiting.remove("b:B")  # cancelled
    bench.round()
    assert not bench.policy.is_mandatory("b:B")


def test_bad_admission_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="admission_policy must be one of"):
        AdmissionPolicy(AdmissionConfig(policy="lifo"))
    problems = EngineConfig(admission_max_skips=-1, admission_max_wait_rounds=-2).problems()
    assert problems == [
        "admission_max_skips must be >= 0, got -1",
        "admission_max_wait_rounds must be >= 0, got -2",
    ]


def test_a_named_victim_must_be_idle_and_unpinned() -> None:
    table = SlotTable(2)
    table.place("a")
    table.place("b")
    table.acquire("a")
    assert not table.can_place("c", victim="a") and not table.can_place("c", victim="zz")
    with pytest.raises(RuntimeError, match="cannot evict a"):
        table.place("c", victim="a")
    table.release("a")
    assert table.place("c", victim="a") == (0, "a", True)  # not the least recently used b
    assert table.residents() == [("b", 0, False), ("c", 0, False)]


# --- the engine on the tiny model ----------------------------------------------------------------

ADAPTERS = [dict(r=4, target_modules=("q_proj", "v_proj"), seed=40 + i) for i in range(6)]
PROMPTS = ["The quick brown fox", "Paris is the capital", "def add(a, b):", "Adapters are small low"]


@pytest.fixture(scope="module")
def six_adapters(tmp_path_factory, tiny_base: Path, make_adapter):
    """A registry with six rank-4 q/v adapters ``ad-0`` .. ``ad-5`` for the tiny base."""
    registry = open_registry(tmp_path_factory.mktemp("admission-registry"))
    base = resolve_base(tiny_base)
    for i, spec in enumerate(ADAPTERS):
        registry.push(make_adapter(**spec), f"ad-{i}", base=base)
    return registry


class StepSizes:
    """Records each step's batch size (the engine's own step hook)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_step(self, batch_size: int, distinct_adapters: int, prefill_tokens: int, seconds: float) -> None:
        self.sizes.append(batch_size)

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _engine(tiny_base: Path, registry, observer: StepSizes, **overrides) -> Engine:
    config = EngineConfig(
        base=str(tiny_base),
        quantization="fp32",
        adapter_slots=2,
        max_rank=8,
        max_batch_size=4,
        max_seq_len=64,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return Engine(config, observer=observer, registry=registry)  # stepped by hand: deterministic


def _closed_loop(engine: Engine, requests: list[GenerationRequest], clients: int) -> list[tuple[int, ...]]:
    """``clients`` callers each sending the next request when their last one ends; the engine stepped by
    hand, each adapter's host copy loaded before the step that may admit it. Returns the token ids of
    every request, in order."""
    handles = []
    pending = list(requests)

    def send() -> None:
        handle = engine.submit(pending.pop(0))
        if handle.state.adapter is not None:
            handle.state.adapter.result(timeout=60)
        handles.append(handle)

    for _ in range(min(clients, len(pending))):
        send()
    finished: set[int] = set()
    try:
        while len(finished) < len(requests):
            engine.take_incoming()
            engine.step()
            for i, handle in enumerate(list(handles)):
                if i not in finished and handle.state.admitted and handle.state.row < 0:
                    finished.add(i)  # its caller sends the next request
                    if pending:
                        send()
        return [h.result(timeout=5).token_ids for h in handles]
    finally:
        engine.adapters.close()


def _workload(n: int, new_tokens: int, seed: int) -> list[GenerationRequest]:
    rnd = random.Random(seed)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [
        GenerationRequest(
            adapter=f"ad-{rnd.randrange(len(ADAPTERS))}", prompt=PROMPTS[i % 4], sampling=params
        )
        for i in range(n)
    ]


def test_adapter_aware_keeps_the_batch_fuller_than_fifo_with_the_same_tokens(
    tiny_base: Path, six_adapters
) -> None:
    """Six adapters on two slots, eight callers on four rows: FIFO stalls behind every request for a
    third adapter; adapter-aware admission runs the same requests in fewer, fuller steps."""
    requests = _workload(48, new_tokens=6, seed=3)
    runs = {}
    for policy in ("fifo", "adapter-aware"):
        sizes = StepSizes()
        engine = _engine(tiny_base, six_adapters, sizes, admission_policy=policy)
        tokens = _closed_loop(engine, requests, clients=8)
        runs[policy] = tokens, sizes.sizes, engine.admission.stats
    (fifo_tokens, fifo_sizes, fifo_stats), (aware_tokens, aware_sizes, aware_stats) = runs.values()
    assert aware_tokens == fifo_tokens  # greedy: the order of admission changes no token
    assert all(len(t) == 6 for t in aware_tokens)
    assert len(aware_sizes) < len(fifo_sizes)  # fewer steps for the same tokens
    assert sum(aware_sizes) / len(aware_sizes) > sum(fifo_sizes) / len(fifo_sizes)  # fuller batches
    assert fifo_stats.skips == 0 and aware_stats.skips > 0 and aware_stats.admitted == 48


def test_a_stream_for_one_adapter_cannot_starve_a_request_for_another(
    tiny_base: Path, six_adapters, greedy: Callable[..., SamplingParams]
) -> None:
    """One slot kept busy by a stream of ``ad-0`` requests: a request for ``ad-1`` is passed over
    ``max_skips`` times, then the slot drains and it runs; with no bound it would still be waiting."""
    stream = (
        GenerationRequest(adapter="ad-0", prompt=PROMPTS[i % 4], sampling=greedy(4)) for i in range(10**6)
    )
    other = GenerationRequest(adapter="ad-1", prompt=PROMPTS[1], sampling=greedy(4))
    life = 2 * (1 + 4)  # rounds of a request's life: a prefill and 4 tokens, at most two rounds a step
    for max_skips, max_wait_rounds in ((3, 10**6), (10**6, 6), (10**6, 10**6)):
        engine = _engine(
            tiny_base,
            six_adapters,
            StepSizes(),
            adapter_slots=1,
            max_batch_size=3,
            admission_max_skips=max_skips,
            admission_max_wait_rounds=max_wait_rounds,
        )
        try:
            handles, late, waited = [], None, None
            for _ in range(60):
                while sum(1 for h in handles if h.state.row >= 0 or not h.state.admitted) < 2:
                    handles.append(engine.submit(next(stream)))  # two ad-0 requests in flight
                    handles[-1].state.adapter.result(timeout=60)
                engine.take_incoming()
                engine.step()
                if late is None:  # ad-0 holds the slot now
                    late = engine.submit(other)
                    late.state.adapter.result(timeout=60)
                if late.state.admitted and waited is None:
                    waited = engine.admission.stats.longest_wait_rounds
            stats = engine.admission.stats
            if max_skips == max_wait_rounds == 10**6:
                assert not late.state.admitted and stats.mandatory == 0
                continue
            assert late.result(timeout=5).completion_tokens == 4 and stats.mandatory == 1
            # once mandatory, one drain of the slot: the ad-0 sequences in it end within a life
            assert stats.longest_mandatory_rounds <= life
            if max_wait_rounds < 10**6:
                assert waited <= max_wait_rounds + life
            else:
                assert stats.skips >= max_skips  # it was passed over that many times first
        finally:
            engine.adapters.close()


def test_the_policy_is_a_setting_and_a_bad_one_is_refused(tiny_base: Path, six_adapters) -> None:
    with pytest.raises(InvalidArgumentError):
        _engine(tiny_base, six_adapters, StepSizes(), admission_policy="random")
    engine = _engine(tiny_base, six_adapters, StepSizes())
    assert engine.admission.config == AdmissionConfig()  # adapter-aware by default
    engine.adapters.close()

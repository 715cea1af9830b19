"""The scheduling policy stepped by hand: alternation, the prefill budget, pauses between layers."""

from __future__ import annotations

from loraswap.server.engine.api import GenerationRequest, SamplingParams
from loraswap.server.engine.request import RequestState
from loraswap.server.engine.sampling import SamplerState
from loraswap.server.engine.scheduler import Scheduler


def _state(prompt_len: int, row: int, cached: int = 0, outputs: int = 0) -> RequestState:
    state = RequestState(
        request=GenerationRequest(prompt="x"),
        prompt_ids=list(range(prompt_len)),
        text=None,  # the scheduler never reads text
        adapter=None,
        sampler=SamplerState(SamplingParams(), []),
    )
    state.row, state.cached, state.output_ids = row, cached, list(range(outputs))
    return state


def _decoding(row: int) -> RequestState:
    return _state(4, row, cached=4, outputs=1)


def test_separate_policy_alternates_prefill_and_decode_steps() -> None:
    scheduler = Scheduler("separate", prefill_chunk=512, between_layers=True)
    new, old = _state(6, row=1), _decoding(row=0)
    first = scheduler.plan([old, new])
    assert [s for s, _ in first] == [new] and not scheduler.prefill_deferred
    second = scheduler.plan([old, new])  # the prompt is still pending: now the decodes get their turn
    assert [s for s, _ in second] == [old] and scheduler.prefill_deferred
    assert [s for s, _ in scheduler.plan([old, new])] == [new]


def test_mixed_policy_runs_both_in_one_step_decodes_first() -> None:
    scheduler = Scheduler("mixed", prefill_chunk=512, between_layers=False)
    new, old = _state(6, row=1), _decoding(row=0)
    plan = scheduler.plan([new, old])
    assert [s for s, _ in plan] == [old, new]
    assert [len(c.token_ids) for _, c in plan] == [1, 6]


def test_prefill_chunks_share_the_token_budget_and_mark_last_chunks() -> None:
    scheduler = Scheduler("separate", prefill_chunk=10, between_layers=True)
    a, b, c = _state(6, row=0), _state(7, row=1), _state(3, row=2)
    plan = scheduler.prefill_plan([a, b, c])
    assert [(s, len(ch.token_ids), ch.want_logits) for s, ch in plan] == [(a, 6, True), (b, 4, False)]
    b.cached = 4
    [(state, chunk)] = scheduler.prefill_plan([b])
    assert state is b and chunk.token_ids == [4, 5, 6] and chunk.start_pos == 4 and chunk.want_logits


def test_pause_between_layers_is_asked_once_per_arrival_and_runs_once_per_step() -> None:
    scheduler = Scheduler("separate", prefill_chunk=512, between_layers=True)
    old = _decoding(row=0)
    assert scheduler.begin(scheduler.plan([old]))  # a decode-only step may pause
    assert not scheduler.should_pause()  # nothing arrived
    scheduler.arrivals.set()
    assert scheduler.should_pause() and not scheduler.should_pause()  # one look per arrival
    new = _state(5, row=1)
    nested = scheduler.nested_plan([old, new])
    assert [s for s, _ in nested] == [new] and scheduler.last_step_prefilled
    scheduler.nested_done(0.25)
    assert scheduler.step.nested_s == 0.25
    scheduler.arrivals.set()
    assert not scheduler.should_pause()  # this step has had its prefill
    assert not scheduler.begin(scheduler.plan([_state(3, row=2)]))  # a prefill step never pauses


def test_a_nested_prefill_never_reruns_a_request_of_the_paused_step() -> None:
    scheduler = Scheduler("separate", prefill_chunk=4, between_layers=True)
    last_chunk = _state(5, row=0, cached=4)  # one prompt token left: it looks like a decode
    plan = scheduler.plan([last_chunk])
    assert scheduler.begin(plan)
    scheduler.arrivals.set()
    assert scheduler.should_pause()
    assert scheduler.nested_plan([last_chunk]) == [] and not scheduler.step.interrupted


def test_mixed_policy_and_disabled_pauses_never_pause() -> None:
    for scheduler in (Scheduler("mixed", 512, True), Scheduler("separate", 512, False)):
        assert not scheduler.begin(scheduler.plan([_decoding(row=0)]))

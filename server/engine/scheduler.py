"""The scheduling policy: which chunks a step runs, prefill/decode alternation, prefill between layers.

:class:`Scheduler` decides; the :class:`~loraswap.server.engine.engine.Engine` admits requests and runs
what it decides. All of its state is owned by the engine thread (the thread that runs steps), except
:attr:`Scheduler.arrivals`, an Event that any thread sets when there is new work for a step in flight
to look at (a request submitted, an adapter load finished).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from loraswap.server.engine.forward import SeqChunk, chunk_order
from loraswap.server.engine.request import RequestState

Plan = list[tuple[RequestState, SeqChunk]]
"""A step's chunks with the requests they belong to, in the order the packed forward runs them."""


@dataclass
class _StepInFlight:
    """The decode step that may be paused between layers for one prefill.

    Attributes:
        ids: ``id()`` of the requests of the step (never prefilled again by the nested step).
        interrupted: The step has had its nested prefill (at most one per step).
        nested_s: Seconds of that prefill, which the paused step does not count as its own.
    """

    ids: frozenset[int] = frozenset()
    interrupted: bool = False
    nested_s: float = 0.0


@dataclass
class Scheduler:
    """Plans steps for the ``separate`` or ``mixed`` prefill policy.

    With ``separate``, prefill steps and decode steps take turns: a new request's first token is not
    held up by a full decode batch, and decodes wait for at most one bounded prefill step. With
    ``prefill_between_layers`` on as well, a request that arrives while a decode step runs (or a prompt
    the alternation deferred) has its prefill run between two decoder layers of that step. With
    ``mixed``, prefill chunks ride along with every decode step.

    Attributes:
        policy: ``separate`` or ``mixed``.
        prefill_chunk: Prompt tokens per step, shared by all prefilling sequences.
        between_layers: Prefill between the layers of a decode step (``separate`` only).
        arrivals: Set by any thread when a request arrives or an adapter load finishes; cleared by the
            engine thread when it looks. Makes the between-layers check O(1).
    """

    policy: str
    prefill_chunk: int
    between_layers: bool
    arrivals: threading.Event = field(default_factory=threading.Event)
    last_step_prefilled: bool = False
    prefill_deferred: bool = False  # the current decode step's plan left admitted prompts for later
    step: _StepInFlight = field(default_factory=_StepInFlight)

    def plan(self, running: list[RequestState]) -> Plan:
        """This step's chunks for the admitted requests ``running``."""
        prefilling = [s for s in running if s.prefilling]
        decoding = [s for s in running if not s.prefilling]
        self.prefill_deferred = False
        if self.policy == "separate" and prefilling and decoding:
            run_prefill = not self.last_step_prefilled
            self.prefill_deferred = not run_prefill  # between layers of this decode step, if enabled
            prefilling, decoding = (prefilling, []) if run_prefill else ([], decoding)
        plan = [(s, SeqChunk(s.row, s.next_input(1), s.cached, s.slot, True)) for s in decoding]
        plan += self.prefill_plan(prefilling)
        self.last_step_prefilled = bool(prefilling)
        plan.sort(key=lambda item: chunk_order(item[1]))
        return plan

    def prefill_plan(self, prefilling: list[RequestState]) -> Plan:
        """Prompt chunks of ``prefilling``, in order, within the ``prefill_chunk`` token budget."""
        plan = []
        budget = self.prefill_chunk
        for state in prefilling:
            if budget <= 0:
                break
            tokens = state.next_input(budget)
            budget -= len(tokens)
            last = state.cached + len(tokens) == len(state.prompt_ids)
            plan.append((state, SeqChunk(state.row, tokens, state.cached, state.slot, last)))
        plan.sort(key=lambda item: chunk_order(item[1]))
        return plan

    def begin(self, plan: Plan) -> bool:
        """Start a step over ``plan``; True when it may be paused between layers for a prefill."""
        self.step = _StepInFlight(frozenset(id(state) for state, _ in plan))
        decode_only = all(len(chunk.token_ids) == 1 for _, chunk in plan)
        return decode_only and self.policy == "separate" and self.between_layers

    def should_pause(self) -> bool:
        """Between two layers of the step in flight: whether to look for a prefill to run now (O(1)):
        not yet paused, and a request arrived, an adapter became ready or a prompt waits its turn."""
        if self.step.interrupted or not (self.arrivals.is_set() or self.prefill_deferred):
            return False
        self.arrivals.clear()
        self.prefill_deferred = False
        return True

    def nested_plan(self, running: list[RequestState]) -> Plan:
        """The prefill to run between layers: prompts of ``running`` that are not part of the paused step
        (a one-token last prompt chunk counts as a decode there). Empty: nothing to run."""
        prefilling = [s for s in running if s.prefilling and id(s) not in self.step.ids]
        if not prefilling:
            return []
        self.step.interrupted = True
        self.last_step_prefilled = True
        return self.prefill_plan(prefilling)

    def nested_done(self, seconds: float) -> None:
        """The nested prefill took ``seconds`` (subtracted from the paused step's own time)."""
        self.step.nested_s = seconds

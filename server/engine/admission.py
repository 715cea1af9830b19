"""Admission under slot pressure: which waiting requests join the batch, which slot gives way, what to
prefetch, and a bound on every request's wait.

:class:`AdmissionPolicy` is pure bookkeeping (no tensors, no clock): each admission round the engine
hands it the waiting requests in arrival order, the resident adapters (with how many running sequences
use each and whether it is pinned), the free device slots and the free batch rows; it answers with a
:class:`Decision`. Time is counted in rounds (the engine runs one before every step and at most one more
inside a decode step, when it pauses between layers for a prefill), so the policy can be stepped by hand
and every outcome is deterministic.

``fifo`` admits in arrival order and stops at the first request that cannot be placed (every slot busy):
later requests wait behind it even when their adapters are resident. ``adapter-aware``:

* Requests whose adapter is resident (or that use the base) are admitted first, in arrival order; then
  those that need a slot take a free one, else evict an idle adapter (no running sequence, not pinned):
  the one with the fewest waiting requests, least recently used among equals. A request that finds no
  slot is passed over and the ones behind it go on filling the batch.
* A ready request passed over (a later arrival admitted while it was not) ``max_skips`` times, or left
  waiting ``max_wait_rounds`` rounds, becomes *mandatory*. Mandatory requests go first, oldest first, for
  rows and for free or idle slots. The oldest one that still finds no slot reserves a *draining* slot
  (the unpinned resident adapter with the fewest running sequences, then the fewest waiters, then the
  least recently used; the slot drained last round while it stays eligible, whichever mandatory request
  it was for, since it is the closest to free). A draining adapter admits nobody new (but older
  mandatory requests for it), so its running sequences finish and its slot goes to that request: the
  oldest mandatory request waits at most as long as the longest remaining generation in that slot (and
  for a row, which it gets first). One slot drains at a time, so mandatory requests are served in
  arrival order while the other slots keep the batch full: many requests turning mandatory at once (a
  queue deeper than the deadline) do not empty the batch by draining every slot.
* When batch rows, not slots, are what is short, the adapters of the requests left waiting are copied
  into free slots now (prefetch), so they are resident when rows free up. Host copies need no prefetch
  here: the adapter manager starts every request's host load when the request is submitted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from loraswap.server.adapters.slots import SlotTable

POLICIES = ("adapter-aware", "fifo")


@dataclass
class AdmissionConfig:
    """How the engine admits waiting requests when slots or rows are short.

    Attributes:
        policy: ``adapter-aware`` (admit requests whose adapters are resident ahead of those that need a
            slot, with a bound on every wait) or ``fifo`` (arrival order; the first request that finds
            every slot busy holds up all behind it).
        max_skips: With ``adapter-aware``: times a ready request may be passed over (a later arrival
            admitted while it was not) before it becomes mandatory and a slot is drained for it
            (0: after its first round waiting).
        max_wait_rounds: With ``adapter-aware``: admission rounds (one per step, plus one per pause
            between layers) a ready request may wait before it becomes mandatory, passed over or not.
    """

    policy: str = "adapter-aware"
    max_skips: int = 4
    max_wait_rounds: int = 32

    def problems(self) -> list[str]:
        """Every invalid field, as readable messages."""
        out = []
        if self.policy not in POLICIES:
            out.append(f"admission_policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("max_skips", "max_wait_rounds"):
            if getattr(self, name) < 0:
                out.append(f"admission_{name} must be >= 0, got {getattr(self, name)}")
        return out


@dataclass(frozen=True)
class Waiter:
    """A waiting request as the policy sees it.

    Attributes:
        key: Identifies the request across rounds (hashable; the engine passes its request state).
        adapter: The adapter's key (digest); None for the base model, which needs no slot.
        ready: The adapter's host copy is loaded; a request still loading is left for a later round and
            neither ages nor counts as passed over.
    """

    key: Hashable
    adapter: str | None
    ready: bool = True


@dataclass(frozen=True)
class Resident:
    """An adapter in a device slot.

    Attributes:
        adapter: Its key (digest).
        running: Running sequences that use it (a slot in use is never given up).
        pinned: Pinned by an operator (never given up).
    """

    adapter: str
    running: int = 0
    pinned: bool = False


@dataclass(frozen=True)
class Admission:
    """One request to admit now.

    Attributes:
        key: The request's :attr:`Waiter.key`.
        adapter: Its adapter (None: the base).
        victim: The idle resident adapter whose slot it takes; None when its adapter is resident, a slot
            is free, or it uses the base.
    """

    key: Hashable
    adapter: str | None
    victim: str | None = None


@dataclass
class Decision:
    """What one admission round decided, to be carried out in order.

    Attributes:
        admit: Requests to admit, in the order their slots were chosen.
        prefetch: Adapters to copy into free slots now (after the admissions), for requests left waiting.
        draining: The adapter whose slot is reserved for the oldest mandatory request that needs one:
            nobody new is admitted to it (None: no slot drains).
    """

    admit: list[Admission] = field(default_factory=list)
    prefetch: list[str] = field(default_factory=list)
    draining: str | None = None


@dataclass
class AdmissionStats:
    """Counters since the policy was made (rounds as defined in the module docstring).

    Attributes:
        rounds: Admission rounds decided.
        admitted: Requests admitted.
        skips: Times a ready request was passed over.
        mandatory: Requests that became mandatory.
        prefetched: Adapters copied into free slots ahead of their requests.
        longest_wait_rounds: Most rounds a request waited, ready, before it was admitted.
        longest_mandatory_rounds: Most rounds a request waited after becoming mandatory.
    """

    rounds: int = 0
    admitted: int = 0
    skips: int = 0
    mandatory: int = 0
    prefetched: int = 0
    longest_wait_rounds: int = 0
    longest_mandatory_rounds: int = 0


@dataclass
class _Age:
    skips: int = 0
    rounds: int = 0  # rounds waited while ready
    mandatory_rounds: int = -1  # rounds waited since it became mandatory; -1: not mandatory


class _Round:
    """One round's plan: a copy of the slot table (:meth:`SlotTable.restore`, so the rules are the
    table's own, never a mirror of them) and the free rows, as the round's admissions change them."""

    def __init__(self, residents: Sequence[Resident], free_slots: int, free_rows: int, lru_only: bool):
        self.table = SlotTable.restore([(r.adapter, r.running, r.pinned) for r in residents], free_slots)
        self.free_rows = free_rows
        self.lru_only = lru_only
        self.draining: str | None = None
        self.waiters: Counter[str] = Counter()

    @property
    def free_slots(self) -> int:
        return self.table.free_slots

    def resident(self, adapter: str) -> bool:
        return adapter in self.table

    def idle(self) -> list[str]:
        """Adapters whose slot may be given up now, least recently used first."""
        return [
            a
            for a, users, pinned in self.table.residents()
            if not users and not pinned and a != self.draining
        ]

    def place(self, waiter: Waiter, may_take_slot: bool = True) -> Admission | None:
        """Admit ``waiter`` if a row and a slot allow (``may_take_slot``: a free or idle slot, not only
        its resident adapter's); None when not."""
        adapter = waiter.adapter
        if self.free_rows == 0:
            return None
        victim = None
        if adapter is not None:
            if self.resident(adapter):
                if adapter == self.draining:
                    return None
            elif not may_take_slot:
                return None
            else:
                if not self.table.free_slots:
                    idle = self.idle()
                    if not idle:
                        return None
                    victim = idle[0]  # least recently used
                    if not self.lru_only:  # the fewest waiters, least recently used among equals
                        victim = min(idle, key=lambda a: (self.waiters[a], idle.index(a)))
                self.table.place(adapter, victim)
            self.table.acquire(adapter)
            self.waiters[adapter] -= 1
        self.free_rows -= 1
        return Admission(waiter.key, adapter, victim)

    def prefetch(self, adapter: str) -> None:
        """Copy ``adapter`` into a free slot ahead of its requests."""
        self.table.place(adapter)

    def drain_for(self, previous: str | None) -> str | None:
        """Reserve the slot to drain for the oldest mandatory request that found none: ``previous``
        (the slot drained last round, whoever it was for) while it stays eligible, else the unpinned
        adapter with the fewest running sequences, then the fewest waiters, then the least recently
        used (None when every resident adapter is pinned)."""
        users = {a: n for a, n, pinned in self.table.residents() if not pinned}
        eligible = list(users)
        if not eligible:
            return None
        if previous in eligible:
            choice = previous
        else:
            choice = min(eligible, key=lambda a: (users[a], self.waiters[a], eligible.index(a)))
        self.draining = choice
        return choice


class AdmissionPolicy:
    """Decides each admission round (see the module docstring for the rules).

    Args:
        config: The policy and its bounds.
    """

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config or AdmissionConfig()
        if self.config.problems():
            raise ValueError("; ".join(self.config.problems()))
        self.stats = AdmissionStats()
        self._ages: dict[Hashable, _Age] = {}
        self._draining: str | None = None  # the slot drained last round

    def is_mandatory(self, key: Hashable) -> bool:
        """Whether the waiting request ``key`` has become mandatory."""
        age = self._ages.get(key)
        return age is not None and age.mandatory_rounds >= 0

    def decide(
        self, waiting: Sequence[Waiter], residents: Sequence[Resident], free_slots: int, free_rows: int
    ) -> Decision:
        """One admission round.

        Args:
            waiting: The waiting requests, oldest first.
            residents: The adapters in device slots, least recently used first.
            free_slots: Empty device slots.
            free_rows: Free batch rows (sequences that may join).

        Returns:
            The requests to admit (and the slots they take), the adapters to prefetch and the slots held
            for mandatory requests. Requests no longer in ``waiting`` (finished elsewhere) are forgotten.
        """
        self.stats.rounds += 1
        present = {w.key for w in waiting}
        for key in [k for k in self._ages if k not in present]:
            del self._ages[key]
        ready = [w for w in waiting if w.ready]
        for w in ready:
            self._ages.setdefault(w.key, _Age())
        fifo = self.config.policy == "fifo"
        state = _Round(residents, free_slots, free_rows, lru_only=fifo)
        state.waiters.update(w.adapter for w in ready if w.adapter is not None)
        decision = Decision()
        if fifo:
            for w in ready:
                admission = state.place(w)
                if admission is None:
                    break  # FIFO: wait for a slot rather than let later requests pass this one
                decision.admit.append(admission)
        else:
            self._adapter_aware(ready, state, decision)
        decision.draining = self._draining = state.draining
        self._account(ready, decision)
        return decision

    def _adapter_aware(self, ready: list[Waiter], state: _Round, decision: Decision) -> None:
        admitted: set[Hashable] = set()

        def admit(admission: Admission | None) -> None:
            if admission is not None:
                decision.admit.append(admission)
                admitted.add(admission.key)

        mandatory = [w for w in ready if self.is_mandatory(w.key)]
        for w in mandatory:  # oldest first: each takes a row and a slot, else the oldest one short of a
            admission = state.place(w)  # slot reserves one to drain (one at a time)
            needs_slot = w.adapter is not None and not state.resident(w.adapter)
            if admission is None and needs_slot and state.draining is None:
                state.drain_for(self._draining)
            admit(admission)
        others = [w for w in ready if w.key not in admitted and not self.is_mandatory(w.key)]
        for w in others:  # resident adapters (and the base) first
            admit(state.place(w, may_take_slot=False))
        for w in others:  # then those that need a slot: a free one, else an idle one
            if w.key not in admitted:
                admit(state.place(w))
        if state.free_rows or not state.free_slots:
            return  # rows to spare: every ready request that could take a free slot has one
        for w in [*mandatory, *others]:  # rows are short: copy waiting adapters into free slots now
            if not state.free_slots:
                break
            if w.key not in admitted and w.adapter is not None and not state.resident(w.adapter):
                state.prefetch(w.adapter)
                decision.prefetch.append(w.adapter)

    def _account(self, ready: list[Waiter], decision: Decision) -> None:
        """Age the requests left waiting and record the admitted ones."""
        stats = self.stats
        stats.prefetched += len(decision.prefetch)
        admitted = {a.key for a in decision.admit}
        latest = max((i for i, w in enumerate(ready) if w.key in admitted), default=-1)
        config = self.config
        for i, w in enumerate(ready):
            age = self._ages[w.key]
            if w.key in admitted:
                del self._ages[w.key]
                stats.admitted += 1
                stats.longest_wait_rounds = max(stats.longest_wait_rounds, age.rounds)
                stats.longest_mandatory_rounds = max(stats.longest_mandatory_rounds, age.mandatory_rounds)
                continue
            age.rounds += 1
            if age.mandatory_rounds >= 0:
                age.mandatory_rounds += 1
                continue
            if i < latest:
                age.skips += 1
                stats.skips += 1
            if config.policy != "fifo" and (
                age.skips >= config.max_skips or age.rounds >= config.max_wait_rounds
            ):
                age.mandatory_rounds = 0
                stats.mandatory += 1

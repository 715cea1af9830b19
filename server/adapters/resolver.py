"""Adapter reference → version: the one resolver the engine's adapter manager and the Ray ingress share.

A digest reference (``name@sha256:…``) is resolved once and trusted forever (the registry's content
addressing makes it immutable). A tag (``name``, ``name:tag``) is trusted for ``ttl_s`` seconds, then
asked again, so a moved tag reaches the server within that time.

**Serve stale on error** (as a DNS resolver does, RFC 8767): when asking again fails because the
registry cannot be reached (:class:`~loraswap.errors.UnavailableError`: the store is down, times out
or refuses), the last version the tag resolved to keeps serving for up to ``stale_grace_s`` seconds
after that answer (asked again once per TTL meanwhile, not by every request). Each stale answer is
counted (``on_stale``) and the first of an outage is logged, so an operator sees that tags are frozen.
A registry that is slow rather than down (it accepts connections and does not answer: its client gives
up only after its own timeouts, a minute or more) counts the same once ``refresh_wait_s`` has passed (a
client response timer, as RFC 8767 has): the look-up goes on in the background, one per reference, and
its answer is used once it comes. An answer that the tag is gone (NOT_FOUND) is not an outage: it is
raised. Without a previous answer, or past the grace, the caller waits for the registry's own answer or
error.

Thread-safe: the table is guarded by one lock, never held during registry I/O.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from loraswap.errors import UnavailableError
from loraswap.server.adapters.lru import LRU

log = logging.getLogger(__name__)

MAX_RESOLVED = 10_000  # reference strings whose resolution is remembered
LOOKUP_WORKERS = 8  # registry look-ups in flight at once (one per reference)


@dataclass(frozen=True)
class Resolution:
    """What a reference resolved to.

    Attributes:
        name: The adapter's name.
        digest: The version's digest (``sha256:<hex>``).
        fingerprint: The base fingerprint recorded in the version's manifest (None when absent).
        at: ``time.monotonic()`` of the registry's answer.
    """

    name: str
    digest: str
    fingerprint: str | None
    at: float


class Resolver:
    """Resolves adapter references against a registry, with a TTL for tags and stale answers on outages.

    Args:
        registry: Returns the registry (called for each look-up that needs it, so a registry that could
            not be opened is tried again next time); its ``resolve(ref)`` returns a manifest.
        ttl_s: Seconds a tag's answer is trusted before asking the registry again.
        stale_grace_s: Seconds after the registry's last answer for a tag that the answer is still served
            when the registry cannot be reached (0: never serve stale).
        on_stale: Called each time a stale answer is served (a metric).
        refresh_wait_s: How long a look-up of a tag with an answer within the grace may take before
            that answer is served (the look-up goes on).
        local: Answers a digest reference without the registry (from a verified local copy), or None;
            asked before the registry, so a cached digest never needs it.
        clock: ``time.monotonic`` (replaced in tests).
    """

    def __init__(
        self,
        registry: Callable[[], object],
        ttl_s: float,
        stale_grace_s: float,
        on_stale: Callable[[], None] | None = None,
        local: Callable[[str], Resolution | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        refresh_wait_s: float = 1.0,
    ) -> None:
        self._registry, self.ttl_s, self.stale_grace_s = registry, ttl_s, stale_grace_s
        self.refresh_wait_s = refresh_wait_s
        self._on_stale = on_stale or (lambda: None)
        self._local = local or (lambda ref: None)
        self._clock = clock
        self._lock = threading.Lock()
        self._table: LRU[str, tuple[Resolution, float]] = LRU(MAX_RESOLVED)  # with when it was last asked
        self._outage = False  # logged once per outage: set by a stale answer, cleared by a fresh one
        self._asking: dict[str, Future[Resolution]] = {}  # the registry look-up in flight per reference
        self._pool = ThreadPoolExecutor(LOOKUP_WORKERS, thread_name_prefix="tag-lookup")

    def close(self) -> None:
        """Stop taking look-ups (those in flight end on their own)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def capacity(self) -> int:
        """References whose resolution is remembered (least recently asked for first out)."""
        return self._table.capacity or 0

    @capacity.setter
    def capacity(self, value: int) -> None:
        with self._lock:
            self._table.capacity = value

    def remembered(self) -> list[str]:
        """The references whose answers are remembered, least recently asked for first."""
        with self._lock:
            return self._table.keys()

    def cached(self, ref: str) -> Resolution | None:
        """The answer for ``ref`` that needs no registry I/O now (a digest seen before, a fresh tag)."""
        with self._lock:
            entry = self._table.get(ref)
        if entry is not None and ("@" in ref or self._clock() - entry[1] < self.ttl_s):
            return entry[0]
        return None

    def resolve(self, ref: str) -> Resolution:
        """What ``ref`` names now (blocking: registry I/O unless :meth:`cached` has it).

        Raises:
            NotFoundError: unknown adapter, tag or version.
            UnavailableError: the registry cannot be reached and no answer within the grace is known.
        """
        known = self.cached(ref)
        if known is not None:
            return known
        local = self._local(ref) if "@" in ref else None
        if local is not None:
            self._remember(ref, local)
            return local
        stale = self._stale(ref)
        asking = self._ask(ref)
        try:
            return asking.result(timeout=self.refresh_wait_s if stale is not None else None)
        except TimeoutError:
            if stale is None:
                raise
            return self._serve_stale(ref, stale, f"no answer in {self.refresh_wait_s:g} s")
        except UnavailableError as exc:
            if stale is None:
                raise
            return self._serve_stale(ref, stale, str(exc))

    def _ask(self, ref: str) -> Future[Resolution]:
        """The registry look-up of ``ref``: the one in flight, or a new one."""
        with self._lock:
            asking = self._asking.get(ref)
            if asking is None:
                asking = self._asking[ref] = self._pool.submit(self._look_up, ref)
        return asking

    def _look_up(self, ref: str) -> Resolution:
        try:
            manifest = self._registry().resolve(ref)  # type: ignore[attr-defined]
            fresh = Resolution(
                manifest.name, manifest.digest, getattr(manifest, "base_fingerprint", None), self._clock()
            )
            self._remember(ref, fresh)
            if self._outage:
                self._outage = False
                log.warning("registry reachable again; tags resolve afresh")
            return fresh
        finally:
            with self._lock:
                self._asking.pop(ref, None)

    def _serve_stale(self, ref: str, stale: Resolution, why: str) -> Resolution:
        self._remember(ref, stale)  # asked again after another TTL, not by every request meanwhile
        self._on_stale()
        if not self._outage:
            self._outage = True
            log.warning("registry unreachable (%s); serving the last known versions of tags", why)
        return stale

    def _remember(self, ref: str, found: Resolution) -> None:
        with self._lock:
            self._table.put(ref, (found, self._clock()))

    def _stale(self, ref: str) -> Resolution | None:
        with self._lock:
            entry = self._table.peek(ref)
        if entry is None or self._clock() - entry[0].at > self.stale_grace_s:
            return None
        return entry[0]

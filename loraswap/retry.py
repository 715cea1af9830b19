"""Trying an operation again: one policy and one loop for every retry in loraswap.

A :class:`RetryPolicy` says how many tries an operation gets, which errors are tried again, and how long
to wait between tries; :func:`retry` runs a function under it, :func:`aretry` a coroutine function. The
wait before retry ``n`` (1: the first retry) is ``d = min(max_backoff, backoff * multiplier ** (n - 1))``,
of which the fraction ``jitter`` is random: a wait in ``(d * (1 - jitter), d]`` (``jitter=1``, the
default, is "full jitter"), so that writers that collided once do not collide again in step. A
``deadline`` (on the clock's scale) ends the retries early: no wait runs past it. When the tries are
spent, or an error is not one to retry, the error is raised as it was.

The sleep, random and clock functions are parameters, so tests run without real waits.
"""

from __future__ import annotations

import asyncio
import random as _random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Retry:
    """One retry about to happen, as a ``before_retry`` hook sees it.

    Attributes:
        attempt: The try that failed (1: the first).
        error: What it raised.
        wait: Seconds slept before the next try.
    """

    attempt: int
    error: BaseException
    wait: float


@dataclass(frozen=True)
class RetryPolicy:
    """How an operation is tried again.

    Attributes:
        attempts: Tries in all, the first included (at least 1; 1 never retries).
        retry_on: Exception classes that are tried again; any other is raised at once.
        retry_if: A further test of a caught ``retry_on`` error (None: every one is tried again).
        backoff: Seconds of the wait before the first retry (0: retry at once, never sleeping).
        multiplier: Factor of each wait over the one before (1: the same wait every time).
        max_backoff: Cap on any one wait, in seconds, before jitter.
        jitter: Fraction of each wait that is random, in [0, 1] (0: exact waits; 1: uniform in (0, wait]).
    """

    attempts: int
    retry_on: tuple[type[BaseException], ...]
    retry_if: Callable[[BaseException], bool] | None = None
    backoff: float = 0.0
    multiplier: float = 2.0
    max_backoff: float = 1.0
    jitter: float = 1.0

    def __post_init__(self) -> None:
        problems = [
            text
            for text, bad in (
                (f"attempts must be >= 1, got {self.attempts}", self.attempts < 1),
                ("retry_on must name at least one exception class", not self.retry_on),
                (f"backoff must be >= 0, got {self.backoff}", self.backoff < 0),
                (f"multiplier must be >= 1, got {self.multiplier}", self.multiplier < 1),
                (f"max_backoff must be >= 0, got {self.max_backoff}", self.max_backoff < 0),
                (f"jitter must be in [0, 1], got {self.jitter}", not 0 <= self.jitter <= 1),
            )
            if bad
        ]
        if problems:
            raise ValueError("invalid retry policy: " + "; ".join(problems))

    def retries(self, error: BaseException) -> bool:
        """Whether ``error`` is one to try again (tries left aside)."""
        return isinstance(error, self.retry_on) and (self.retry_if is None or self.retry_if(error))

    def wait(self, retry: int, draw: float) -> float:
        """Seconds before retry number ``retry`` (1: the first), given a uniform ``draw`` in [0, 1)."""
        if self.backoff == 0:
            return 0.0
        capped = min(self.max_backoff, self.backoff * self.multiplier ** (retry - 1))
        return capped * (1 - self.jitter * draw)


def _next_wait(
    policy: RetryPolicy,
    attempt: int,
    error: BaseException,
    deadline: float | None,
    random: Callable[[], float],
    clock: Callable[[], float],
) -> float | None:
    """Seconds to wait before try ``attempt + 1``, or None to give up and raise ``error``."""
    if attempt >= policy.attempts or not policy.retries(error):
        return None
    wait = policy.wait(attempt, random())
    if deadline is not None and clock() + wait >= deadline:
        return None
    return wait


def retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    before_retry: Callable[[Retry], None] | None = None,
    deadline: float | None = None,
    sleep: Callable[[float], object] = time.sleep,
    random: Callable[[], float] = _random.random,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``fn`` until it returns, trying again as ``policy`` says.

    Args:
        fn: The operation (no arguments; a closure or ``functools.partial``).
        policy: Tries, errors to retry, waits.
        before_retry: Called before each wait (for logging), with the failed try.
        deadline: No wait runs past this time on ``clock``'s scale; None: no deadline.
        sleep: Waits a number of seconds.
        random: Uniform draws in [0, 1) for the jitter.
        clock: The time ``deadline`` is compared with.

    Returns:
        What ``fn`` returned.

    Raises:
        The last error of ``fn``, as it was: one not to retry, or one after the tries are spent.
    """
    attempt = 1
    while True:
        try:
            return fn()
        except policy.retry_on as error:
            wait = _next_wait(policy, attempt, error, deadline, random, clock)
            if wait is None:
                raise
            if before_retry is not None:
                before_retry(Retry(attempt, error, wait))
        if wait:
            sleep(wait)
        attempt += 1


async def aretry(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    before_retry: Callable[[Retry], None] | None = None,
    deadline: float | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    random: Callable[[], float] = _random.random,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """:func:`retry` for a coroutine function: awaits ``fn()`` and ``sleep`` (same arguments)."""
    attempt = 1
    while True:
        try:
            return await fn()
        except policy.retry_on as error:
            wait = _next_wait(policy, attempt, error, deadline, random, clock)
            if wait is None:
                raise
            if before_retry is not None:
                before_retry(Retry(attempt, error, wait))
        if wait:
            await sleep(wait)
        attempt += 1

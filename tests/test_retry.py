"""``loraswap.retry``: tries, which errors retry, waits with backoff, jitter and a cap, a deadline, the hook;
sync and async, with the sleep, random and clock functions injected (no real waits)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from loraswap.retry import Retry, RetryPolicy, aretry, retry


class Flaky:
    """Raises each of ``errors`` in turn on its calls, then returns ``"done"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


class FakeTime:
    """A clock that only ``sleep`` moves, and a record of the waits."""

    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)

    def clock(self) -> float:
        return self.now


def _run(fn: Callable[[], str], policy: RetryPolicy, fake: FakeTime, **kwargs) -> str:
    return retry(fn, policy, sleep=fake.sleep, clock=fake.clock, **kwargs)


def test_retries_the_listed_errors_until_it_succeeds() -> None:
    fake, flaky = FakeTime(), Flaky(KeyError("a"), KeyError("b"))
    assert _run(flaky, RetryPolicy(attempts=3, retry_on=(KeyError,)), fake) == "done"
    assert flaky.calls == 3 and fake.waits == []  # no backoff: no sleep at all


def test_the_last_error_is_raised_as_it_was_once_the_tries_are_spent() -> None:
    last = KeyError("third")
    flaky = Flaky(KeyError("first"), KeyError("second"), last)
    with pytest.raises(KeyError) as info:
        _run(flaky, RetryPolicy(attempts=3, retry_on=(KeyError,)), FakeTime())
    assert info.value is last and flaky.calls == 3
    assert info.value.__context__ is None  # not chained to the earlier tries


def test_other_errors_and_refused_ones_are_raised_at_once() -> None:
    flaky = Flaky(ValueError("not listed"))
    with pytest.raises(ValueError):
        _run(flaky, RetryPolicy(attempts=5, retry_on=(KeyError,)), FakeTime())
    assert flaky.calls == 1
    policy = RetryPolicy(attempts=5, retry_on=(KeyError,), retry_if=lambda e: e.args != ("fatal",))
    flaky = Flaky(KeyError("again"), KeyError("fatal"))
    with pytest.raises(KeyError, match="fatal"):
        _run(flaky, policy, FakeTime())
    assert flaky.calls == 2


def test_waits_grow_to_the_cap_and_jitter_takes_its_fraction() -> None:
    exact = RetryPolicy(attempts=6, retry_on=(KeyError,), backoff=0.1, max_backoff=0.5, jitter=0.0)
    fake, flaky = FakeTime(), Flaky(*[KeyError(i) for i in range(5)])
    assert _run(flaky, exact, fake, random=lambda: 0.99) == "done"
    assert fake.waits == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    half = RetryPolicy(
        attempts=3, retry_on=(KeyError,), backoff=1.0, multiplier=3.0, max_backoff=9, jitter=0.5
    )
    draws = iter([0.0, 1.0])
    fake = FakeTime()
    _run(Flaky(KeyError(1), KeyError(2)), half, fake, random=lambda: next(draws))
    assert fake.waits == pytest.approx([1.0, 1.5])  # 1 s untouched by a draw of 0; 3 s less half of it
    full = RetryPolicy(attempts=2, retry_on=(KeyError,), backoff=0.2)
    fake = FakeTime()
    _run(Flaky(KeyError(1)), full, fake, random=lambda: 0.75)
    assert fake.waits == pytest.approx([0.05])  # full jitter by default: (0, 0.2]


def test_the_hook_sees_each_failed_try_before_its_wait() -> None:
    seen: list[Retry] = []
    errors = [KeyError("a"), KeyError("b")]
    policy = RetryPolicy(attempts=3, retry_on=(KeyError,), backoff=0.1, jitter=0.0)
    _run(Flaky(*errors), policy, FakeTime(), before_retry=seen.append)
    assert seen == [Retry(1, errors[0], pytest.approx(0.1)), Retry(2, errors[1], pytest.approx(0.2))]


def test_a_deadline_ends_the_retries_before_a_wait_would_pass_it() -> None:
    policy = RetryPolicy(attempts=10, retry_on=(KeyError,), backoff=1.0, max_backoff=1.0, jitter=0.0)
    fake = FakeTime()
    flaky = Flaky(*[KeyError(i) for i in range(10)])
    with pytest.raises(KeyError, match="2"):
        _run(flaky, policy, fake, deadline=fake.now + 2.5)
    assert flaky.calls == 3 and fake.waits == [1.0, 1.0]  # a third wait would end at +3 s
    flaky = Flaky(KeyError("late"))
    with pytest.raises(KeyError):  # passed already: not even an immediate retry
        _run(flaky, RetryPolicy(attempts=3, retry_on=(KeyError,)), fake, deadline=fake.now)
    assert flaky.calls == 1


def test_async_retry_awaits_each_try_and_wait() -> None:
    fake, flaky = FakeTime(), Flaky(KeyError("a"), KeyError("b"))

    async def call() -> str:
        return flaky()

    policy = RetryPolicy(attempts=3, retry_on=(KeyError,), backoff=0.5, jitter=0.0)
    result = asyncio.run(aretry(call, policy, sleep=fake.asleep, clock=fake.clock))
    assert result == "done" and fake.waits == [0.5, 1.0]
    flaky = Flaky(*[KeyError(i) for i in range(3)])
    with pytest.raises(KeyError, match="1"):
        asyncio.run(aretry(call, RetryPolicy(attempts=2, retry_on=(KeyError,)), sleep=fake.asleep))


def test_a_policy_that_cannot_work_is_refused_when_made() -> None:
    with pytest.raises(ValueError) as info:
        RetryPolicy(attempts=0, retry_on=(), backoff=-1, multiplier=0.5, max_backoff=-1, jitter=2)
    for text in ("attempts", "retry_on", "backoff must", "multiplier", "max_backoff", "jitter"):
        assert text in str(info.value)

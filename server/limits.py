"""The server's request limits, checked the same way for every edge (gRPC, HTTP): no protobuf, no JSON;
and the one concurrency budget the edges share (:class:`InFlight`)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from loraswap.errors import OverloadedError
from loraswap.server.engine.api import ChatMessage, SamplingParams

if TYPE_CHECKING:
    from loraswap.server.settings import ServeSettings  # (it imports the engine's config, and torch)


def generation_problems(
    prompt: str | None,
    messages: tuple[ChatMessage, ...] | None,
    requested_max_new_tokens: int,
    sampling: SamplingParams,
    settings: ServeSettings,
    max_tokens_name: str = "max_new_tokens",
) -> list[str]:
    """Every way a generation breaks the server's limits or the sampling rules, as readable messages.

    Args:
        prompt: The raw prompt (None for chat).
        messages: The chat messages (None for a raw prompt).
        requested_max_new_tokens: The token budget the caller asked for (0 = the server's default).
        sampling: The sampling parameters built from the request.
        settings: The server's limits.
        max_tokens_name: How the caller's protocol names the token budget, for the messages.
    """
    problems: list[str] = []
    if messages is not None:
        chars = sum(len(m.content) for m in messages)
        if not messages:
            problems.append("chat must have at least one message")
        problems += [f"chat message {i} has no role" for i, m in enumerate(messages) if not m.role]
    else:
        chars = len(prompt or "")
    if chars > settings.max_prompt_chars:
        problems.append(f"prompt is {chars} characters, over the limit of {settings.max_prompt_chars}")
    if requested_max_new_tokens > settings.max_new_tokens:
        problems.append(
            f"{max_tokens_name} {requested_max_new_tokens} is over the limit of {settings.max_new_tokens}"
        )
    problems += sampling.problems()
    return problems


class InFlight:
    """The one budget of generations in progress, shared by every edge of a server (gRPC and HTTP): past
    ``limit`` a new generation is refused at once (:class:`~loraswap.errors.OverloadedError`: gRPC
    RESOURCE_EXHAUSTED, HTTP 429) instead of queueing without bound. Thread-safe.

    Args:
        limit: Generations in progress at once, all edges together (``max_concurrent_rpcs``).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    def acquire(self) -> None:
        """Take one unit of the budget, or raise OverloadedError when none is left."""
        with self._lock:
            if self._count >= self.limit:
                raise OverloadedError(
                    f"too many generations in progress (limit {self.limit}, gRPC and HTTP together); "
                    "retry later"
                )
            self._count += 1

    def release(self) -> None:
        with self._lock:
            self._count -= 1

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """One unit for the duration of a ``with`` block."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

"""The server's request limits, checked the same way for every edge (gRPC, HTTP): no protobuf, no JSON."""

from __future__ import annotations

from typing import TYPE_CHECKING

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

"""OpenAI request bodies → :class:`GenerationRequest` (under the server's limits), results → responses."""

from __future__ import annotations

from loraswap.errors import InvalidArgumentError
from loraswap.server.engine.api import ChatMessage, GenerationRequest, GenerationResult, SamplingParams
from loraswap.server.http.models import ChatCompletionRequest, CompletionRequest, Usage
from loraswap.server.limits import generation_problems
from loraswap.server.settings import ServeSettings

OPENAI_DEFAULT_TEMPERATURE = 1.0  # what the OpenAI API samples with when a request leaves it out
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


def unsupported(body: CompletionRequest | ChatCompletionRequest) -> list[str]:
    """Parameters that would change the result but are not implemented, each named (empty when none).

    A parameter at its neutral value (null, false, 0, empty) changes nothing and passes.
    """
    out = [f"unsupported parameter: {name}" for name, value in (body.model_extra or {}).items() if value]
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            out.append(f"unsupported parameter: {name} (only 0 is supported)")
    if body.n not in (None, 1):
        out.append(f"unsupported parameter: n={body.n} (only n=1 is supported)")
    if isinstance(body, ChatCompletionRequest):
        for i, m in enumerate(body.messages):
            out += [
                f"unsupported parameter: messages[{i}].{k}" for k, v in (m.model_extra or {}).items() if v
            ]
    return out


def _messages(body: ChatCompletionRequest, problems: list[str]) -> tuple[ChatMessage, ...]:
    out = []
    for i, m in enumerate(body.messages):
        if m.content is None or isinstance(m.content, str):
            content = m.content or ""
        else:
            kinds = {p.type for p in m.content} - {"text"}
            if kinds:
                problems.append(f"messages[{i}].content: only text parts are supported, got {sorted(kinds)}")
            content = "".join(p.text or "" for p in m.content if p.type == "text")
        out.append(ChatMessage(m.role, content))
    return tuple(out)


def request_from_body(
    body: CompletionRequest | ChatCompletionRequest, settings: ServeSettings, base_model: str
) -> GenerationRequest:
    """Validate ``body`` against the server's limits; raise InvalidArgumentError listing every problem."""
    problems = unsupported(body)
    prompt, messages = None, None
    if isinstance(body, ChatCompletionRequest):
        messages = _messages(body, problems)
        requested, name = body.max_completion_tokens or body.max_tokens or 0, "max_completion_tokens"
    else:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                problems.append(f"prompt: exactly one prompt is supported, got a list of {len(prompt)}")
            prompt = prompt[0] if prompt else ""
        requested, name = body.max_tokens or 0, "max_tokens"
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, field, None)
        if value is not None and value < 1:
            problems.append(f"{field} must be >= 1, got {value}")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    sampling = SamplingParams(
        max_new_tokens=max(requested, 0) or settings.default_max_new_tokens,
        temperature=OPENAI_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=stop,
        ignore_eos=body.ignore_eos,
    )
    problems += generation_problems(prompt, messages, requested, sampling, settings, max_tokens_name=name)
    if problems:
        raise InvalidArgumentError("invalid request", problems)
    adapter = "" if body.model.strip() == base_model else body.model.strip()
    return GenerationRequest(adapter=adapter, prompt=prompt, messages=messages, sampling=sampling)


def usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


def finish_reason(result: GenerationResult) -> str:
    return FINISH_REASONS.get(result.finish_reason, "stop")

"""The engine's public data types: what callers (the gRPC servicer, the CLI, tests) hand in and get back.

No protobuf here: the gRPC edge converts to and from these.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "eos", "cancelled", "error"]
Tier = Literal["device", "host", "disk"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token.

    Attributes:
        max_new_tokens: Upper bound on generated tokens (finish reason ``length``).
        temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: Keep only the k most likely tokens (0 = off).
        top_p: Nucleus sampling: keep the smallest set whose probability reaches p (1.0 = off).
        repetition_penalty: CTRL-style penalty on tokens already in prompt or output (1.0 = off).
        seed: Seed of this request's own generator, so a seeded request is reproducible whatever
            else is in the batch (None = nondeterministic).
        stop: Strings that end generation; the returned text stops before the first match.
        ignore_eos: Keep generating past EOS (for benchmarks).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def problems(self) -> list[str]:
        """Every invalid field, as readable messages (empty when valid)."""
        out = []
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            out.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            out.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            out.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            out.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            out.append("stop strings must not be empty")
        floats = {"temperature": self.temperature, "top_p": self.top_p}
        out += [f"{k} must be finite" for k, v in floats.items() if not math.isfinite(v)]
        return out


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn, rendered with the base model's chat template."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """One generation.

    Attributes:
        adapter: Adapter reference (``name``, ``name:tag``, ``name@sha256:…``); empty means the base model.
        prompt: Raw prompt text (exactly one of prompt / messages).
        messages: Chat messages, rendered with the chat template and a generation prompt.
        sampling: Sampling parameters.
        request_id: Caller's id, echoed in logs.
        deadline: Absolute ``time.monotonic()`` after which the request is dropped (None = none).
    """

    adapter: str = ""
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    deadline: float | None = None


@dataclass(frozen=True)
class Timings:
    """Seconds spent queued (until the first prefill step), until the first token, and in total."""

    queue_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of a finished request."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    adapter_digest: str
    token_ids: tuple[int, ...] = ()
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class TokenEvent:
    """A streamed chunk: new text (possibly empty) and token ids; the last one carries ``result``."""

    text: str
    token_ids: tuple[int, ...]
    result: GenerationResult | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None


@dataclass(frozen=True)
class AdapterStatus:
    """Where an adapter lives in the cache tiers, for ``ListAdapters``."""

    name: str
    digest: str
    tiers: tuple[Tier, ...]
    pinned: bool
    size_bytes: int
    rank: int
    hits: int
    last_used: float  # time.time() of the last request, 0 if never


@dataclass(frozen=True)
class EngineInfo:
    """Static facts about the running engine, for ``ServerInfo`` and the build-info metric."""

    base_model: str
    base_fingerprint: str
    quantization: str
    dtype: str
    device: str
    adapter_slots: int
    max_rank: int
    max_batch_size: int
    max_seq_len: int
    max_queue: int
    kv_cache_bytes: int
    versions: dict[str, str] = field(default_factory=dict)


class EngineObserver(Protocol):
    """Hooks the engine calls for metrics; every method must be cheap and must not raise."""

    def on_step(
        self, batch_size: int, distinct_adapters: int, prefill_tokens: int, seconds: float
    ) -> None: ...

    def on_cache_lookup(self, tier: Tier, hit: bool) -> None: ...

    def on_adapter_load(self, source: str, seconds: float) -> None: ...

    def on_eviction(self, tier: Tier, reason: str) -> None: ...

    def on_load_failure(self, reason: str) -> None: ...

    def on_stale_resolution(self) -> None: ...

    def on_token(self, request_id: str, adapter: str, inter_token_s: float | None) -> None: ...


class NullObserver:
    """An observer that records nothing."""

    def on_step(self, batch_size: int, distinct_adapters: int, prefill_tokens: int, seconds: float) -> None:
        pass

    def on_cache_lookup(self, tier: Tier, hit: bool) -> None:
        pass

    def on_adapter_load(self, source: str, seconds: float) -> None:
        pass

    def on_eviction(self, tier: Tier, reason: str) -> None:
        pass

    def on_load_failure(self, reason: str) -> None:
        pass

    def on_stale_resolution(self) -> None:
        pass

    def on_token(self, request_id: str, adapter: str, inter_token_s: float | None) -> None:
        pass


def now() -> float:
    return time.monotonic()

"""Protobuf ↔ domain conversion, the only place that knows both (TGI's ``from_pb`` / ``to_pb``).

Server side: ``request_from_pb`` validates and builds a :class:`GenerationRequest`; ``*_to_pb`` build
responses. Client side: ``request_to_pb`` and ``*_from_pb`` do the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from loraswap.errors import InvalidArgumentError
from loraswap.server.engine.api import (
    AdapterStatus,
    ChatMessage,
    EngineInfo,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Tier,
    Timings,
    TokenEvent,
)
from loraswap.server.grpc.pb import admin_pb2, inference_pb2
from loraswap.server.limits import generation_problems

if TYPE_CHECKING:
    from loraswap.server.routes.route import RouteStatus
    from loraswap.server.settings import ServeSettings  # (it imports the engine's config, and torch)

FINISH_TO_PB = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "eos": inference_pb2.FINISH_REASON_EOS,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
    "error": inference_pb2.FINISH_REASON_ERROR,
}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}
TIER_TO_PB: dict[Tier, int] = {
    "device": admin_pb2.TIER_DEVICE,
    "host": admin_pb2.TIER_HOST,
    "disk": admin_pb2.TIER_DISK,
}
TIER_FROM_PB: dict[int, Tier] = {v: k for k, v in TIER_TO_PB.items()}


# --- server side ---------------------------------------------------------------------------------


def request_from_pb(
    pb: inference_pb2.GenerateRequest, settings: ServeSettings, deadline: float | None = None
) -> GenerationRequest:
    """Validate a GenerateRequest against the server's limits; raise InvalidArgumentError listing all."""
    problems: list[str] = []
    prompt, messages = None, None
    which = pb.WhichOneof("input")
    if which == "prompt":
        prompt = pb.prompt
    elif which == "chat":
        messages = tuple(ChatMessage(m.role, m.content) for m in pb.chat.messages)
    else:
        problems.append("one of prompt or chat is required")
    sampling = sampling_from_pb(pb, settings.default_max_new_tokens)
    problems += generation_problems(prompt, messages, pb.max_new_tokens, sampling, settings)
    if problems:
        raise InvalidArgumentError("invalid GenerateRequest", problems)
    return GenerationRequest(
        adapter=pb.adapter,
        prompt=prompt,
        messages=messages,
        sampling=sampling,
        request_id=pb.request_id,
        deadline=deadline,
    )


def sampling_from_pb(pb: inference_pb2.GenerateRequest, default_max_new_tokens: int) -> SamplingParams:
    s = pb.sampling
    return SamplingParams(
        max_new_tokens=pb.max_new_tokens or default_max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        seed=pb.seed if pb.HasField("seed") else None,
        stop=tuple(pb.stop),
        ignore_eos=s.ignore_eos,
    )


def _timings_to_pb(t: Timings) -> inference_pb2.Timings:
    return inference_pb2.Timings(
        queue_seconds=t.queue_s, time_to_first_token_seconds=t.ttft_s, total_seconds=t.total_s
    )


def result_to_pb(r: GenerationResult) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(
        text=r.text,
        finish_reason=FINISH_TO_PB.get(r.finish_reason, inference_pb2.FINISH_REASON_UNSPECIFIED),
        usage=inference_pb2.Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens),
        adapter_digest=r.adapter_digest,
        timings=_timings_to_pb(r.timings),
        token_ids=r.token_ids,
    )


def event_to_pb(ev: TokenEvent) -> inference_pb2.GenerateStreamResponse:
    out = inference_pb2.GenerateStreamResponse(text=ev.text, token_ids=ev.token_ids)
    if (r := ev.result) is not None:
        out.finish_reason = FINISH_TO_PB.get(r.finish_reason, inference_pb2.FINISH_REASON_UNSPECIFIED)
        out.usage.CopyFrom(
            inference_pb2.Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)
        )
        out.adapter_digest = r.adapter_digest
        out.timings.CopyFrom(_timings_to_pb(r.timings))
    return out


def tier_from_pb(tier: int) -> Tier:
    """Map a requested tier (unspecified = device)."""
    if tier == admin_pb2.TIER_UNSPECIFIED:
        return "device"
    if tier not in TIER_FROM_PB:
        raise InvalidArgumentError(f"unknown tier {tier}")
    return TIER_FROM_PB[tier]


def adapter_ref_from_pb(ref: str) -> str:
    if not ref.strip():
        raise InvalidArgumentError("adapter reference is required")
    return ref.strip()


def status_to_pb(s: AdapterStatus, routed_to: str = "") -> admin_pb2.Adapter:
    out = admin_pb2.Adapter(
        routed_to=routed_to,
        name=s.name,
        digest=s.digest,
        tiers=[TIER_TO_PB[t] for t in s.tiers if t in TIER_TO_PB],
        pinned=s.pinned,
        size_bytes=s.size_bytes,
        rank=s.rank,
        hits=s.hits,
    )
    if s.last_used > 0:
        out.last_used.FromDatetime(datetime.fromtimestamp(s.last_used, UTC))
    return out


def route_to_pb(r: RouteStatus) -> admin_pb2.Route:
    return admin_pb2.Route(
        adapter=r.adapter,
        model=r.model,
        adapter_digest=r.adapter_digest,
        model_digest=r.model_digest,
        method=r.method,
        state=r.state,
        weights_bytes=r.weights_bytes,
        kv_cache_bytes=r.kv_cache_bytes,
        promoted=r.promoted,
    )


def info_to_pb(
    info: EngineInfo, settings: ServeSettings, routes: Sequence[RouteStatus] = ()
) -> admin_pb2.ServerInfoResponse:
    limits = admin_pb2.Limits(
        max_prompt_chars=settings.max_prompt_chars,
        max_new_tokens=settings.max_new_tokens,
        max_seq_len=info.max_seq_len,
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        max_message_bytes=settings.max_message_bytes,
        max_queue=info.max_queue,
    )
    return admin_pb2.ServerInfoResponse(
        base_model=info.base_model,
        base_fingerprint=info.base_fingerprint,
        quantization=info.quantization,
        dtype=info.dtype,
        device=info.device,
        adapter_slots=info.adapter_slots,
        max_rank=info.max_rank,
        max_batch_size=info.max_batch_size,
        kv_cache_bytes=info.kv_cache_bytes,
        limits=limits,
        versions=info.versions,
        routes=[route_to_pb(r) for r in routes],
    )


# --- client side ---------------------------------------------------------------------------------


def request_to_pb(req: GenerationRequest) -> inference_pb2.GenerateRequest:
    s = req.sampling
    pb = inference_pb2.GenerateRequest(
        adapter=req.adapter,
        sampling=inference_pb2.SamplingParameters(
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
            ignore_eos=s.ignore_eos,
        ),
        max_new_tokens=s.max_new_tokens,
        stop=s.stop,
        request_id=req.request_id,
    )
    if s.seed is not None:
        pb.seed = s.seed
    if req.messages is not None:
        pb.chat.messages.extend(
            inference_pb2.ChatMessage(role=m.role, content=m.content) for m in req.messages
        )
    else:
        pb.prompt = req.prompt or ""
    return pb


def _timings_from_pb(t: inference_pb2.Timings) -> Timings:
    return Timings(queue_s=t.queue_seconds, ttft_s=t.time_to_first_token_seconds, total_s=t.total_seconds)


def result_from_pb(pb: inference_pb2.GenerateResponse) -> GenerationResult:
    return GenerationResult(
        text=pb.text,
        finish_reason=FINISH_FROM_PB.get(pb.finish_reason, "error"),
        prompt_tokens=pb.usage.prompt_tokens,
        completion_tokens=pb.usage.completion_tokens,
        adapter_digest=pb.adapter_digest,
        token_ids=tuple(pb.token_ids),
        timings=_timings_from_pb(pb.timings),
    )


def event_from_pb(
    pb: inference_pb2.GenerateStreamResponse, text: str, token_ids: tuple[int, ...]
) -> TokenEvent:
    """A TokenEvent; on the last message, ``text`` and ``token_ids`` (everything so far) fill its result."""
    result = None
    if pb.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
        result = GenerationResult(
            text=text,
            finish_reason=FINISH_FROM_PB.get(pb.finish_reason, "error"),
            prompt_tokens=pb.usage.prompt_tokens,
            completion_tokens=pb.usage.completion_tokens,
            adapter_digest=pb.adapter_digest,
            token_ids=token_ids,
            timings=_timings_from_pb(pb.timings),
        )
    return TokenEvent(text=pb.text, token_ids=tuple(pb.token_ids), result=result)


def status_from_pb(pb: admin_pb2.Adapter) -> AdapterStatus:
    last_used = pb.last_used.ToDatetime(UTC).timestamp() if pb.HasField("last_used") else 0.0
    return AdapterStatus(
        name=pb.name,
        digest=pb.digest,
        tiers=tuple(TIER_FROM_PB[t] for t in pb.tiers if t in TIER_FROM_PB),
        pinned=pb.pinned,
        size_bytes=pb.size_bytes,
        rank=pb.rank,
        hits=pb.hits,
        last_used=last_used,
    )


def route_from_pb(pb: admin_pb2.Route) -> RouteStatus:
    from loraswap.server.routes.route import RouteStatus

    return RouteStatus(
        adapter=pb.adapter,
        model=pb.model,
        adapter_digest=pb.adapter_digest,
        model_digest=pb.model_digest,
        method=pb.method,
        state=pb.state,
        weights_bytes=pb.weights_bytes,
        kv_cache_bytes=pb.kv_cache_bytes,
        promoted=pb.promoted,
    )


def info_from_pb(pb: admin_pb2.ServerInfoResponse) -> EngineInfo:
    return EngineInfo(
        base_model=pb.base_model,
        base_fingerprint=pb.base_fingerprint,
        quantization=pb.quantization,
        dtype=pb.dtype,
        device=pb.device,
        adapter_slots=pb.adapter_slots,
        max_rank=pb.max_rank,
        max_batch_size=pb.max_batch_size,
        max_seq_len=pb.limits.max_seq_len,
        max_queue=pb.limits.max_queue,
        kv_cache_bytes=pb.kv_cache_bytes,
        versions=dict(pb.versions),
    )

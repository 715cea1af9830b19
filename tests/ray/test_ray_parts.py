"""Parts of the Ray layer on their own (no Ray needed): the proxy's deadline metadata over a real gRPC call,
read back by the ingress's :func:`~loraswap.server.ray.calls.admit`, and the merge of replicas' adapter
listings."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio

from loraswap.server.auth import TokenAuth
from loraswap.server.engine.api import AdapterStatus
from loraswap.server.ray.admin import merge_statuses
from loraswap.server.ray.calls import INFERENCE_SERVICE, Call, admit
from loraswap.server.ray.grpc_proxy import TIME_REMAINING_KEY, forwarding_deadline

METHOD = "/loraswap.test.Echo/Call"


async def _admitted(timeout: float | None, metadata: tuple[tuple[str, str], ...]) -> tuple[Call, list]:
    """One real gRPC call to a server whose handler is wrapped as on Ray's proxy; the :class:`Call` the
    ingress makes of the context its handler got, and that context's metadata."""
    seen: list = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(
            (admit(TokenAuth(), INFERENCE_SERVICE, "Generate", context), context.invocation_metadata())
        )
        return request

    rpc = grpc.unary_unary_rpc_method_handler(forwarding_deadline(handler))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("loraswap.test.Echo", {"Call": rpc}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await channel.unary_unary(METHOD)(b"hi", timeout=timeout, metadata=metadata)
    finally:
        await server.stop(None)
    ((call, seen_metadata),) = seen
    return call, list(seen_metadata)


def test_the_proxy_forwards_the_time_left_and_never_the_clients_own() -> None:
    spoof = ((TIME_REMAINING_KEY, "99999"),)
    call, metadata = asyncio.run(_admitted(30.0, spoof))
    ended = time.monotonic()
    assert [k for k, _ in metadata].count(TIME_REMAINING_KEY) == 1  # the client's own was dropped
    assert call.deadline is not None and ended < call.deadline <= ended + 30.0  # the client's 30 s
    untimed, metadata = asyncio.run(_admitted(None, spoof))
    assert untimed.deadline is None and untimed.time_remaining() is None
    assert TIME_REMAINING_KEY not in [k for k, _ in metadata]


def _status(digest: str, tiers: tuple, pinned: bool, hits: int, last_used: float) -> AdapterStatus:
    return AdapterStatus(
        name="a", digest=digest, tiers=tiers, pinned=pinned, size_bytes=10, rank=4, hits=hits,
        last_used=last_used,
    )  # fmt: skip


def test_listings_merge_per_version() -> None:
    one = [
        _status("sha256:1", ("host", "disk"), False, 2, 5.0),
        _status("sha256:2", ("disk",), False, 0, 0.0),
    ]
    two = [_status("sha256:1", ("device",), True, 3, 9.0)]
    merged = merge_statuses([one, two])
    assert [s.digest for s in merged] == ["sha256:2", "sha256:1"]  # least recently used first
    assert merged[1] == _status("sha256:1", ("device", "host", "disk"), True, 5, 9.0)
    assert merge_statuses([]) == []

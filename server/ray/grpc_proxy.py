"""What Ray Serve's gRPC proxy imports to serve ``loraswap.v1.Inference`` and ``loraswap.v1.Admin``
(``grpc_servicer_functions``).

Two things happen in the proxy process through these functions:

* Pickling. The proxy pickles each request message on its way to the ingress replica. The generated
  messages name their module after the proto package (``loraswap.v1.inference_pb2``) while the code lives
  at ``loraswap.server.grpc.pb.inference_pb2``, so pickle could not find the class: importing this module
  (the proxy does, through the servicer functions; the ingress does, through
  :mod:`~loraswap.server.ray.ingress`) makes those names refer to the same modules.
* Deadlines. The proxy hands the ingress a copy of the call's context that has its metadata but not its
  deadline. The servicer functions register the services as the generated ones do, with each of Ray's
  handlers given a context whose metadata also carries the time the call has left
  (:data:`TIME_REMAINING_KEY`, seconds, written here and never taken from the client), which the ingress
  turns back into a deadline (:mod:`~loraswap.server.ray.calls`). The proxy still ends the call itself
  when its deadline passes, and Ray cancels the ingress's work then.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from loraswap.server.grpc.pb import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

PROTO_MODULES = {
    inference_pb2.GenerateRequest.__module__: inference_pb2,
    admin_pb2.Adapter.__module__: admin_pb2,
}
"""The generated messages' module names (``loraswap.v1.*_pb2``) → the modules, aliased in ``sys.modules``."""
for _name, _module in PROTO_MODULES.items():
    sys.modules.setdefault(_name, _module)

TIME_REMAINING_KEY = "loraswap-time-remaining-s"
"""Metadata the proxy adds to a call that has a deadline: the seconds left when the proxy received it."""


class DeadlineMetadata:
    """The proxy's context of one call, its metadata extended with :data:`TIME_REMAINING_KEY`; every
    other attribute is the context's own (Ray sets the call's code and details through it)."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        own = tuple((k, v) for k, v in self._context.invocation_metadata() or () if k != TIME_REMAINING_KEY)
        remaining = self._context.time_remaining()  # None without a deadline (grpc.aio)
        return own if remaining is None else (*own, (TIME_REMAINING_KEY, repr(max(remaining, 0.0))))


def forwarding_deadline(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Ray's handler of one method, called with the context wrapped in :class:`DeadlineMetadata`."""
    if inspect.isasyncgenfunction(handler):

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            async for message in handler(request, DeadlineMetadata(context)):
                yield message

        return streaming

    async def unary(request: Any, context: Any) -> Any:
        return await handler(request, DeadlineMetadata(context))

    return unary


@contextmanager
def deadlines_forwarded(server: Any) -> Iterator[None]:
    """While registering services on Ray's proxy server, wrap each handler it makes in
    :func:`forwarding_deadline`. Ray makes the handlers with its server's ``service_handler_factory``
    (ray 2.60, pinned in constraints.txt); on a server without one, the services register unchanged."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:
        yield
        return

    def forwarding_factory(**kwargs: Any) -> Callable[..., Any]:
        return forwarding_deadline(factory(**kwargs))

    server.service_handler_factory = forwarding_factory
    try:
        yield
    finally:
        server.service_handler_factory = factory


def add_InferenceServicer_to_server(servicer: Any, server: Any) -> None:
    """The generated ``add_InferenceServicer_to_server``, its handlers forwarding deadlines."""
    with deadlines_forwarded(server):
        inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)


def add_AdminServicer_to_server(servicer: Any, server: Any) -> None:
    """The generated ``add_AdminServicer_to_server``, its handlers forwarding deadlines."""
    with deadlines_forwarded(server):
        admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)

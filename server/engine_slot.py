"""The engine both edges serve, once the base model is loaded, and the route facts they report.

Pure Python (no gRPC, no HTTP): the gRPC servicers, the HTTP app and the Ray ingress share it.
"""

from __future__ import annotations

from typing import Any

from loraswap.errors import DrainingError


class EngineSlot:
    """The engine, once the base model is loaded; until then calls get UNAVAILABLE."""

    def __init__(self) -> None:
        self.engine: Any = None

    def get(self) -> Any:
        if self.engine is None:
            raise DrainingError("the server is starting: the base model is still loading")
        return self.engine


def routed_to(engine: Any) -> dict[str, str]:
    """Adapter digest → the merged model its route serves, for an engine behind a route table (empty
    for a bare engine)."""
    if not hasattr(engine, "routed_to"):
        return {}
    return {digest: route.spec.model for digest, route in engine.routed_to().items()}


def route_statuses(engine: Any) -> list[Any]:
    return engine.route_statuses() if hasattr(engine, "route_statuses") else []

"""The engine: one resident base model serving generation requests for many adapters.

Holds the :class:`Engine` (submit, admission, step loop, admin operations), the scheduling policy
(``scheduler``), the admission policy (``admission``), request state and handles (``request``), the
packed forward (``forward``), the KV cache, sampling, detokenization, base loading, :class:`EngineConfig`
and the public data types (``api``).

May import :mod:`loraswap.server.adapters`, :mod:`loraswap.server.lora`, the registry and the models;
never protobuf or gRPC. ``Engine`` and ``EngineConfig`` are importable from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraswap.server.engine.config import EngineConfig
    from loraswap.server.engine.engine import Engine

__all__ = ["Engine", "EngineConfig"]


def __getattr__(name: str) -> Any:
    # Lazy, so that adapters/ and lora/ can import engine.api without importing the Engine itself.
    if name == "Engine":
        from loraswap.server.engine.engine import Engine

        return Engine
    if name == "EngineConfig":
        from loraswap.server.engine.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

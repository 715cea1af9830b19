"""uvicorn serving the HTTP app in its own thread and event loop, in the ``loraswap serve`` process."""

from __future__ import annotations

import asyncio
import socket
import threading

import uvicorn

from loraswap.server.engine_slot import EngineSlot
from loraswap.server.http.app import create_app
from loraswap.server.limits import InFlight
from loraswap.server.metrics import Metrics
from loraswap.server.settings import ServeSettings


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class HttpServer:
    """The OpenAI-compatible API on ``settings.host:settings.http_port`` over the engine in ``slot``."""

    def __init__(
        self, settings: ServeSettings, metrics: Metrics, slot: EngineSlot, inflight: InFlight | None = None
    ) -> None:
        self.settings = settings
        app = create_app(slot, settings, metrics, inflight=inflight)
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=int(settings.grace_seconds) + 1,
        )
        self.server = _Server(config)
        self.thread: threading.Thread | None = None

    def start(self) -> int:
        """Listen and serve in a thread of its own; return the bound port once it accepts connections."""
        host, port = self.settings.host, self.settings.http_port or 0
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        serving = self.server.serve(sockets=[sock])
        # uvicorn's own choice of loop (uvloop where installed), as ``uvicorn.run`` would make it.
        loop_factory = self.server.config.get_loop_factory()

        def run() -> None:
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                runner.run(serving)

        self.thread = threading.Thread(target=run, name="loraswap-http", daemon=True)
        self.thread.start()
        while not self.server.ready.wait(timeout=0.1):
            if not self.thread.is_alive():
                raise RuntimeError("the HTTP server failed to start")
        return sock.getsockname()[1]

    def stop(self) -> None:
        """Stop accepting, let in-flight responses finish (up to the grace period), then stop."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join()

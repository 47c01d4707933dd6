"""Run the proxy under uvicorn: listen at once, load the model in the background, drain on
SIGTERM."""

from __future__ import annotations

import logging
from collections.abc import Callable

import uvicorn

from .app import create_app
from .config import ProxyConfig

__all__ = ["serve"]


def serve(config: ProxyConfig, *, on_ready: Callable[[], None] | None = None) -> None:
    """Blocking. uvicorn turns SIGTERM/SIGINT into a graceful shutdown, which runs the app's
    lifespan exit: pending memory writes are drained before the process ends."""
    level = config.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level=config.log_level.lower(),
            timeout_graceful_shutdown=int(config.drain_timeout_s), lifespan="on",
            proxy_headers=False, server_header=False,
        )
    )
    if on_ready is not None:
        original = server.startup

        async def startup(sockets: object = None) -> None:
            await original(sockets=sockets)  # type: ignore[arg-type]
            on_ready()

        server.startup = startup  # type: ignore[method-assign]
    server.run()

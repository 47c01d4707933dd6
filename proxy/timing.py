"""The receipt's clock (`X-Headroom-Memory-Overhead-Ms`): the time the proxy itself spends on a
request, from its arrival until the upstream request is sent, plus, for an answer relayed
whole, from the upstream's last byte until the answer is ready to go back. The upstream's own
time is left out; everything of ours is in: auth, body parse, recall, injection, serialisation,
request building, stripping, the durable store of the block.

`ArrivalStamp` (the outermost ASGI middleware) notes when a request reaches the app, so the
middlewares in front of the route (auth, path aliases, the body timeout) count as well. What
the server does before the app is called (reading the socket, h11's parse) cannot be seen from
here and is not in the receipt.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["ARRIVAL_KEY", "ArrivalStamp", "ProxyClock"]

ARRIVAL_KEY = "headroom.arrival"  # an ASGI scope key: time.perf_counter() at arrival


class ArrivalStamp:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[ARRIVAL_KEY] = time.perf_counter()
        await self.app(scope, receive, send)


class ProxyClock:
    """Runs from the request's arrival; `pause()` when the request goes to the upstream,
    `resume()` when its answer is in. `ms` is the time counted so far."""

    def __init__(self, scope: Mapping[str, Any]) -> None:
        now = time.perf_counter()
        # No stamp (an app built without the middleware): count from the route.
        self._since: float | None = scope.get(ARRIVAL_KEY, now)
        self._counted = 0.0

    def pause(self) -> None:
        if self._since is not None:
            self._counted += time.perf_counter() - self._since
            self._since = None

    def resume(self) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    @property
    def ms(self) -> float:
        running = 0.0 if self._since is None else time.perf_counter() - self._since
        return (self._counted + running) * 1000

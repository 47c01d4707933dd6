"""`create_app(config)`: the routes, the lifespan (engine, httpx client, writer start and drain)
and the exception handlers. No logic lives here; a request's story is in `proxy.pipeline`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..memory.ports import Embedder
from ..turn.anthropic import MESSAGES
from ..turn.responses import RESPONSES
from ..turn.service import MemoryService
from .admin import admin_routes
from .aliases import PathAliases
from .auth import AuthMiddleware, log_policy, resolve_auth
from .body import BodyReadTimeout
from .config import ProxyConfig
from .errors import ProxyError, RequestTimeoutError, error_body, error_response
from .limits import admit_new_memories
from .passthrough import forward
from .pipeline import chat_completions, memory_turn
from .readiness import readiness
from .relay import readers_finished
from .timing import ArrivalStamp
from .upstream import Upstream

log = logging.getLogger(__name__)

__all__ = ["create_app"]

_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def create_app(
    config: ProxyConfig,
    *,
    embedder: Embedder | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    warm: bool = True,
) -> Starlette:
    """`embedder` shares an already-loaded model (tests); `transport` replaces the network."""
    policy = resolve_auth(config)  # raises on a setting that would expose memory or keys
    log_policy(policy)
    service = MemoryService(
        config.memory_config(), top_k=config.top_k, token_budget=config.token_budget,
        recall_timeout_s=config.recall_timeout_s, embedder=embedder,
    )
    service.admit = admit_new_memories  # a key over its new-memory limit stores only forgets
    upstream = Upstream(config, transport=transport)
    # Messages go to their own upstream when one is set (see ProxyConfig.anthropic_upstream_url).
    anthropic_upstream = upstream if config.anthropic_upstream_url is None else Upstream(
        dataclasses.replace(config, upstream_url=config.anthropic_upstream_url),
        transport=transport,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start(warm=warm)
        log.info("proxy ready to accept requests; upstream %s", config.upstream_base)
        try:
            yield
        finally:
            log.info("shutting down: draining pending memory writes")
            await readers_finished()  # a block whose client left is stored before the drain
            await service.stop(config.drain_timeout_s)
            await upstream.aclose()
            if anthropic_upstream is not upstream:
                await anthropic_upstream.aclose()
            log.info("shutdown complete")

    async def chat(request: Request) -> Response:
        return await chat_completions(request, config, upstream, service)

    async def responses(request: Request) -> Response:
        return await memory_turn(request, config, upstream, service, RESPONSES)

    async def messages(request: Request) -> Response:
        return await memory_turn(request, config, anthropic_upstream, service, MESSAGES)

    async def passthrough(request: Request) -> Response:
        return await forward(request, upstream)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        status, body = await readiness(service)
        return JSONResponse(body, status_code=status)

    async def proxy_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProxyError)
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
        if isinstance(exc, RequestTimeoutError):
            # The rest of a stalled body may still come: this connection cannot carry another
            # request.
            log.info("%s %s -> 408: %s", request.method, request.url.path, exc)
            return error_response(exc, headers={"connection": "close"})
        return error_response(exc)

    async def client_gone(request: Request, exc: Exception) -> Response:
        # Routine (a user pressed stop): one line, no traceback; nobody reads the answer.
        log.info("%s %s: the client disconnected", request.method, request.url.path)
        return Response(status_code=499)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error", None),
            status_code=exc.status_code,
        )

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("internal proxy error", "server_error", "internal_error"),
            status_code=500,
        )

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/messages", messages, methods=["POST"]),
            *admin_routes(service),
            Route("/v1/{path:path}", passthrough, methods=_ALL_METHODS),
        ],
        lifespan=lifespan,
        middleware=[Middleware(BodyReadTimeout, seconds=config.body_read_timeout_s)],
        exception_handlers={
            ProxyError: proxy_error,
            ClientDisconnect: client_gone,
            HTTPException: http_error,
            Exception: unexpected,
        },
    )
    # Outermost: nothing reaches a route, or the upstream, before the auth checks.
    app.add_middleware(AuthMiddleware, policy=policy)
    if config.path_aliases:  # outside the gate: it checks the path the request is served as
        app.add_middleware(PathAliases, aliases=config.path_aliases)
    app.add_middleware(ArrivalStamp)  # outside everything: the receipt counts from here
    app.state.service = service
    app.state.auth = policy
    app.state.config = config
    return app

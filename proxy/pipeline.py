"""A memory-bearing request over HTTP (chat completions, the Responses API, Anthropic's
Messages: one `WireFormat` each): body → scope → `Turn.prepare` (recall → inject) → upstream →
strip → store → respond.

The turn itself (what memory does, and how it fails open) lives in `headroom.turn`; this module
only moves bytes: it parses the client's body, sends the prepared request, and relays the answer,
whole (`_respond_whole`) or streamed (`proxy/relay.py`), with the turn's receipt headers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

import httpx
from starlette.requests import Request
from starlette.responses import Response

from ..turn.chat import CHAT_COMPLETIONS
from ..turn.format import WireFormat
from ..turn.service import MemoryService
from ..turn.turn import BLOCK_HEADER, Turn
from .body import parse_json_body
from .config import ProxyConfig
from .jsonio import dumps, loads
from .passthrough import ClosingStreamingResponse, forward, read_body
from .relay import relay_stream
from .scope import scope_from_request
from .timing import ProxyClock
from .upstream import Upstream, request_headers, response_headers, target

log = logging.getLogger(__name__)

__all__ = ["chat_completions", "memory_turn"]

T = TypeVar("T")


async def chat_completions(
    request: Request, config: ProxyConfig, upstream: Upstream, service: MemoryService
) -> Response:
    return await memory_turn(request, config, upstream, service, CHAT_COMPLETIONS)


async def memory_turn(
    request: Request, config: ProxyConfig, upstream: Upstream, service: MemoryService,
    fmt: WireFormat,
) -> Response:
    """One request of `fmt` with memory, relayed whole or streamed."""
    clock = ProxyClock(request.scope)  # the receipt's overhead: see proxy/timing.py
    raw = await read_body(request, config.max_body_bytes)
    body = parse_json_body(raw)
    rs = scope_from_request(request.headers, {"user": fmt.user(body)})
    if not rs.active:
        response = await forward(request, upstream, raw)
        response.headers["x-headroom-request-id"] = rs.request_id
        return response

    turn = Turn(
        fmt, service, rs.scope, request_id=rs.request_id, recall=rs.mode.recall,
        extract=rs.mode.extract, durable_wait_s=config.durable_wait_s,
    )
    prepared = await turn.prepare(body)
    # Nothing injected: the client's own bytes go on.
    content = raw if prepared is body else dumps(prepared)
    headers = request_headers(request.headers, config, decode=True)
    path, query = target(request.scope)
    upstream_response = await _unless_client_leaves(request, turn, upstream.send(
        "POST", path, query=query, headers=headers, content=content, clock=clock
    ))
    if upstream_response is None:
        return _client_left()
    receipt = turn.receipt(clock.ms)
    if upstream_response.status_code >= 400:
        # No answer, so no block outcome to report.
        receipt.pop(BLOCK_HEADER, None)
        return await _relay_error(upstream, upstream_response, receipt)
    json_answer = "json" in upstream_response.headers.get("content-type", "").lower()
    if fmt.streams(body) and not json_answer:
        # (An upstream that ignores `stream` and sends one JSON body takes the path below.)
        return ClosingStreamingResponse(
            relay_stream(upstream_response, turn),
            status_code=upstream_response.status_code,
            headers=response_headers(upstream_response, keep_length=False, extra=receipt),
        )
    payload = await _unless_client_leaves(request, turn, upstream.read(upstream_response))
    if payload is None:
        return _client_left()
    clock.resume()
    return await _respond_whole(payload, upstream_response, turn, clock)


async def _unless_client_leaves(
    request: Request, turn: Turn, work: Awaitable[T]
) -> T | None:
    """`work`, or None when the client disconnects first: then `work` is cancelled, since
    nobody would read the answer and the upstream goes on generating (and billing) it until its
    connection closes. (A streamed answer has its own watch, in `proxy/relay.py`.)"""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        left = watch.done() and not watch.cancelled() and not task.done()
        for pending in (watch, task):
            pending.cancel()
        # The cancelled exchange closes its upstream connection before we go on.
        await asyncio.gather(watch, task, return_exceptions=True)
    if left:
        log.info("client left %s before the answer; upstream request cancelled",
                 turn.request_id)
        return None
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _client_left() -> Response:
    """nginx's "client closed request": nobody receives it; the access log says what happened."""
    return Response(status_code=499)


async def _respond_whole(
    payload: bytes, upstream_response: httpx.Response, turn: Turn, clock: ProxyClock
) -> Response:
    try:
        answer = loads(payload)
    except ValueError:
        log.warning("upstream answer of %s is not JSON; relayed as is", turn.request_id)
        receipt = turn.receipt(clock.ms)
        receipt.pop(BLOCK_HEADER, None)
        # `payload` is httpx's decoded body: framed anew, without the upstream's encoding.
        return Response(payload, upstream_response.status_code,
                        headers=response_headers(upstream_response, keep_length=False,
                                                 extra=receipt))
    clean, block = turn.strip_answer(answer)
    await turn.store(block)  # durable before the answer leaves (a bounded wait)
    content = dumps(clean)
    return Response(
        content, upstream_response.status_code,
        # Read again: the block's outcome is known now.
        headers=response_headers(upstream_response, keep_length=False,
                                 extra=turn.receipt(clock.ms)),
        media_type="application/json",
    )


async def _relay_error(
    upstream: Upstream, upstream_response: httpx.Response, receipt: dict[str, str]
) -> Response:
    payload = await upstream.read(upstream_response)
    return Response(
        payload, upstream_response.status_code,
        headers=response_headers(upstream_response, keep_length=False, extra=receipt),
    )

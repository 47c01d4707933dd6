"""The one story of a chat completion: recall → inject → upstream → strip → respond → enqueue.

Every memory step fails open: when recall or storing has trouble, the client still gets the
upstream's answer (see `proxy.service`). The receipt headers say what memory did.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response

from .block import parse_ops
from .config import ProxyConfig
from .errors import BadRequestError, error_body
from .inject import inject, query_text
from .passthrough import ClosingStreamingResponse, forward, read_body
from .scope import RequestScope, scope_from_request
from .service import MemoryService
from .stream import Block, StreamStripper, pick_block, strip_completion
from .upstream import Upstream, request_headers, response_headers, target

log = logging.getLogger("headroom.proxy")

__all__ = ["Prepared", "chat_completions", "prepare", "store_block"]

_JSON_FORMATS = frozenset({"json_object", "json_schema"})


@dataclass
class Prepared:
    body: dict[str, Any]
    aliases: dict[str, str] = field(default_factory=dict)
    injected: int = 0
    extraction: bool = False
    overhead_ms: float = 0.0
    notes: list[str] = field(default_factory=list)

    def receipt(self, rs: RequestScope) -> dict[str, str]:
        headers = {
            "x-headroom-request-id": rs.request_id,
            "x-headroom-memories-injected": str(self.injected),
            "x-headroom-memory-overhead-ms": f"{self.overhead_ms:.1f}",
        }
        if self.notes:
            headers["x-headroom-memory-notes"] = "; ".join(self.notes)
        return headers


async def prepare(body: dict[str, Any], rs: RequestScope, service: MemoryService) -> Prepared:
    """Recall and inject. Pure of I/O except the (fail-open) recall."""
    started = time.perf_counter()
    messages = body.get("messages")
    if rs.scope is None or not rs.active or not isinstance(messages, list):
        return Prepared(body)
    prepared = Prepared(body)
    if service.engine is None:
        # No database: nothing could be recalled or stored, so ask the model for no block.
        prepared.notes.append("memory off: database unavailable")
        return prepared
    response_format = body.get("response_format")
    extraction = rs.mode.extract
    if (
        extraction
        and isinstance(response_format, dict)
        and response_format.get("type") in _JSON_FORMATS
    ):
        # A <memory> block would break the JSON the client asked for.
        extraction = False
        prepared.notes.append("extraction off: response_format asks for JSON")
    if extraction and (body.get("logprobs") or body.get("top_logprobs")):
        # Token logprobs would carry the block's tokens past the stripper to the client.
        extraction = False
        prepared.notes.append("extraction off: logprobs requested")
    memories = await service.recall(rs.scope, query_text(messages)) if rs.mode.recall else []
    if rs.mode.recall and not service.ready:
        prepared.notes.append("recall off: memory not ready")
    injection = inject(
        messages, memories, extraction=extraction, budget_tokens=service.token_budget
    )
    prepared.body = {**body, "messages": injection.messages}
    prepared.aliases = injection.aliases
    prepared.injected = injection.injected
    prepared.extraction = extraction
    prepared.overhead_ms = (time.perf_counter() - started) * 1000
    return prepared


def store_block(
    block: Block | None, prepared: Prepared, rs: RequestScope, service: MemoryService
) -> None:
    """Parse the chosen choice's block and queue its ops (never raises)."""
    if block is None or not prepared.extraction or rs.scope is None:
        return
    try:
        parsed = parse_ops(block.body, truncated=block.truncated, aliases=prepared.aliases)
    except Exception:  # the parser is tolerant; this guards the fail-open promise regardless
        log.exception("could not parse the memory block of %s", rs.request_id)
        return
    for warning in parsed.warnings:
        log.info("memory block of %s: %s", rs.request_id, warning)
    if parsed.ops:
        service.store(parsed.ops, rs.scope, rs.request_id)


async def chat_completions(
    request: Request, config: ProxyConfig, upstream: Upstream, service: MemoryService
) -> Response:
    raw = await read_body(request, config.max_body_bytes)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(
            f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object", code="invalid_json")
    rs = scope_from_request(request.headers, body)
    if not rs.active:
        response = await forward(request, upstream, raw)
        response.headers["x-headroom-request-id"] = rs.request_id
        return response

    prepared = await prepare(body, rs, service)
    headers = request_headers(request.headers, config, decode=True)
    content = json.dumps(prepared.body).encode()
    path, query = target(request.scope)
    upstream_response = await upstream.send(
        "POST", path, query=query, headers=headers, content=content
    )
    receipt = prepared.receipt(rs)
    if upstream_response.status_code >= 400:
        return await _relay_error(upstream, upstream_response, receipt)
    json_answer = "json" in upstream_response.headers.get("content-type", "").lower()
    if body.get("stream") is True and not json_answer:
        # (An upstream that ignores `stream` and sends one JSON body takes the path below.)
        return ClosingStreamingResponse(
            _stream(upstream_response, lambda b: store_block(b, prepared, rs, service), rs),
            status_code=upstream_response.status_code,
            headers=response_headers(upstream_response, keep_length=False, extra=receipt),
        )
    payload = await upstream.read(upstream_response)
    try:
        completion = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("upstream answer of %s is not JSON; relayed as is", rs.request_id)
        return Response(payload, upstream_response.status_code,
                        headers=response_headers(upstream_response, keep_length=True,
                                                 extra=receipt))
    clean, blocks = strip_completion(completion) if isinstance(completion, dict) else (
        completion, {}
    )
    store_block(pick_block(blocks), prepared, rs, service)
    return Response(
        json.dumps(clean).encode(), upstream_response.status_code,
        headers=response_headers(upstream_response, keep_length=False, extra=receipt),
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


async def _stream(
    upstream_response: httpx.Response, on_done: Callable[[Block | None], None], rs: RequestScope
) -> AsyncIterator[bytes]:
    """Forward SSE as it arrives, minus the block. On the way out — finished, upstream failed,
    or the client went away (the task is cancelled) — close the upstream and store the block."""
    stripper = StreamStripper()
    try:
        try:
            async for chunk in upstream_response.aiter_bytes():
                out = stripper.feed(chunk)
                if out:
                    yield out
        except httpx.HTTPError as exc:
            log.warning("upstream stream of %s failed mid-way: %s", rs.request_id, exc)
            tail = stripper.finish()
            error = error_body(
                f"the upstream stream broke off: {exc}", "upstream_error", "upstream_stream_error"
            )
            yield tail + f"data: {json.dumps(error)}\n\n".encode()
            return
        tail = stripper.finish()
        if tail:
            yield tail
    finally:
        await Upstream.close_response(upstream_response)
        try:
            # Idempotent. When the stream ended early (client gone), this records a block that
            # had fully arrived before the choice's finish_reason did.
            stripper.finish()
        except Exception:  # the stripper does no I/O; this guards fail-open regardless
            log.exception("could not finish the stream of %s", rs.request_id)
        on_done(stripper.chosen_block)

"""Every route other than chat completions: forwarded byte for byte, the request body streamed,
the answer streamed unless it declares at most `WHOLE_ANSWER_BYTES` (then sent whole)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from .body import read_body
from .upstream import Upstream, request_headers, response_headers, target

# read_body lives in .body; re-exported for the pipeline's import.
__all__ = ["ClosingStreamingResponse", "forward", "read_body"]

log = logging.getLogger(__name__)

# An answer that declares at most this many bytes is read whole and sent as one response: a
# streaming response costs a task group and a disconnect watcher per request (about a tenth of a
# pass-through's CPU), which buys nothing for a body this small. Larger or undeclared bodies
# (downloads, server-sent events) stream as before.
WHOLE_ANSWER_BYTES = 256 * 1024


class _UpstreamBrokeOff(Exception):
    """The upstream's body ended early, after the response had begun."""


class ClosingStreamingResponse(StreamingResponse):
    """Always closes its body iterator. When a client disconnects while the response is waiting
    in `send`, starlette cancels it without closing the generator, whose `finally` (close the
    upstream, store the memory block) would then wait for garbage collection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except _UpstreamBrokeOff as exc:
            # Returning without the final body message makes the server drop the connection, so
            # the client sees a broken transfer (as it was), never a short "complete" one. One
            # line here instead of the server's traceback.
            log.warning("the upstream broke off its answer to %s %s: %s",
                        scope["method"], scope["path"], exc.__cause__)
        finally:
            closer = getattr(self.body_iterator, "aclose", None)
            if closer is not None:
                with anyio.CancelScope(shield=True):
                    await closer()


async def forward(
    request: Request, upstream: Upstream, body: bytes | None = None
) -> Response:
    """Send the request on unchanged (streaming its body unless already read) and stream the
    upstream's bytes back, content-encoding included."""
    headers = request_headers(request.headers, upstream.config, decode=False)
    content: bytes | AsyncIterator[bytes] | None = body
    if body is None:
        length = request.headers.get("content-length")
        if length is not None:
            # Keep the client's framing: with a length, httpx streams without chunked encoding.
            headers["content-length"] = length
            content = request.stream()
        elif "transfer-encoding" in request.headers:
            content = request.stream()
    path, query = target(request.scope)
    response = await upstream.send(
        request.method, path, query=query, headers=headers, content=content
    )
    headers_out = response_headers(response, keep_length=True)
    if _small(response):
        received: list[bytes] = []
        try:
            async for chunk in response.aiter_raw():
                received.append(chunk)
        except httpx.TransportError as exc:
            # Cut short: what arrived goes out, then the connection drops, as when streaming.
            return ClosingStreamingResponse(
                _broken(received, exc), status_code=response.status_code, headers=headers_out
            )
        finally:
            await Upstream.close_response(response)
        return Response(b"".join(received), response.status_code, headers=headers_out)
    return ClosingStreamingResponse(
        _relay(response), status_code=response.status_code, headers=headers_out
    )


def _small(response: httpx.Response) -> bool:
    declared = response.headers.get("content-length", "")
    return declared.isdigit() and int(declared) <= WHOLE_ANSWER_BYTES


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.TransportError as exc:
        raise _UpstreamBrokeOff from exc
    finally:
        await Upstream.close_response(response)


async def _broken(received: list[bytes], error: httpx.TransportError) -> AsyncIterator[bytes]:
    for chunk in received:
        yield chunk
    raise _UpstreamBrokeOff from error

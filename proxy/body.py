"""A client's request body: read within a size limit and a time limit, and parsed into the JSON
object the pipeline works on. Every way a body can be bad is a `ProxyError` here (400, 408,
413), so nothing downstream ever meets a body it cannot copy, serialise or route.

`BodyReadTimeout` (ASGI middleware) bounds the wait for each piece of a body, like nginx's
`client_body_timeout`: a client that stalls mid-body gets a 408 and its connection is closed,
wherever the body is read (the pipeline, or a pass-through upload streamed to the upstream).

Rules, each one because of a failure seen:
- not JSON, not UTF-8, or not an object → 400 `invalid_json`;
- nested deeper than `MAX_DEPTH` → 400 `json_too_deep` (anything recursive on the way — orjson's
  serialiser stops at 254 levels, `repr` at Python's recursion limit — would otherwise be a 500);
- `"stream"` present and neither `true`, `false` nor `null` → 400 `invalid_type`: the proxy
  streams exactly when `stream is true`, and an upstream that read `"true"` (a string) as true
  would stream while the proxy took its non-stream path and leaked the memory block;
- lone UTF-16 surrogate escapes (`"\\ud800"`, valid JSON that orjson refuses) are replaced by
  U+FFFD: the request still goes through, and every string in it can be encoded.
"""

from __future__ import annotations

import json
import re
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import BadRequestError, PayloadTooLargeError, RequestTimeoutError

__all__ = ["MAX_DEPTH", "BodyReadTimeout", "parse_json_body", "read_body"]

# Real chat requests nest about 8 levels (tool schemas a few more); 64 leaves room for any schema.
MAX_DEPTH = 64

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class BodyReadTimeout:
    """Each `receive` of a request's body waits at most `seconds`, then raises
    `RequestTimeoutError` into whoever reads it. Once the body is complete, `receive` is the
    server's own again (starlette waits on it for the client's disconnect, legitimately long)."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.seconds <= 0:
            await self.app(scope, receive, send)
            return
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                with anyio.fail_after(self.seconds):
                    message = await receive()
            except TimeoutError:
                complete = True  # one 408; the connection closes after it
                raise RequestTimeoutError(
                    f"the request body stalled: nothing arrived for {self.seconds:g}s"
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, timed_receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The body as a dict, or `BadRequestError` in the OpenAI error shape."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        body = _parse_with_surrogates(raw, exc)
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object", code="invalid_json")
    _check_depth(body)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequestError(
            f"invalid type for 'stream': expected a boolean, got {type(stream).__name__}",
            code="invalid_type", param="stream",
        )
    return body


def _parse_with_surrogates(raw: bytes, error: orjson.JSONDecodeError) -> Any:
    """orjson refuses lone surrogate escapes; the stdlib reads them, and they are replaced."""
    if "depth limit" in str(error):
        raise _too_deep() from None
    if "surrogate" not in str(error):
        raise _invalid(error) from None
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _invalid(exc) from None
    _check_depth(body)  # before the recursive replacement below
    return _replace_surrogates(body)


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    return value


def _check_depth(body: Any) -> None:
    """Iterative, so the check itself cannot overflow the stack it protects."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep()
        if not isinstance(value, dict | list):
            continue
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))


def _invalid(exc: Exception) -> BadRequestError:
    return BadRequestError(f"request body is not valid JSON: {exc}", code="invalid_json")


def _too_deep() -> BadRequestError:
    return BadRequestError(
        f"request body nests deeper than {MAX_DEPTH} levels", code="json_too_deep"
    )

"""Memory below an SDK: an httpx transport that runs a `Turn` around every memory-bearing request
the client sends (`POST …/chat/completions`, `…/responses`, `…/messages`), whatever SDK method
sent it: `create`, `stream()`, `parse()`, `with_raw_response`, `with_streaming_response`, a copy
from `with_options`, sync or async. The official `openai` and `anthropic` SDKs build every call
on one httpx client, so memory installed there cannot be bypassed by a helper the wrapper does
not know. Every other request goes to the SDK's own transport unchanged.

The same turn as the HTTP proxy's: the request is prepared (recall → inject) on the runtime's
loop, the answer is stripped (whole, or its SSE stream through `SSEStripper`) and the block
stored once; the receipt headers (`x-headroom-*`) are added to the response. Memory trouble is
logged and the call goes on as it came (fail open).

The SDKs may build on `httpx` or on its fork `httpx2` (openai 3.x, anthropic 2.x): the transport
classes are made for the module the client's httpx client comes from (`transport_for`).
"""

from __future__ import annotations

import functools
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import ModuleType
from typing import Any

from ..memory.models import Scope
from .anthropic import MESSAGES
from .chat import CHAT_COMPLETIONS
from .format import WireFormat
from .jsonio import dumps, loads
from .responses import RESPONSES
from .runtime import Runtime
from .service import RecallSettings
from .sse_strip import SSEStripper
from .stripper import Block
from .turn import BLOCK_HEADER, Turn

log = logging.getLogger(__name__)

__all__ = ["TurnMaker", "format_for", "httpx_module", "transport_classes"]

_ROUTES: tuple[tuple[str, WireFormat], ...] = (
    ("/chat/completions", CHAT_COMPLETIONS), ("/responses", RESPONSES), ("/messages", MESSAGES),
)
_REFRAMED = frozenset({"content-length", "content-encoding", "transfer-encoding"})


def format_for(request: Any) -> WireFormat | None:
    """The wire format of a memory-bearing request, or None (it passes unchanged)."""
    if request.method != "POST":
        return None
    path = request.url.path.rstrip("/")
    return next((fmt for suffix, fmt in _ROUTES if path.endswith(suffix)), None)


def httpx_module(http: Any) -> ModuleType | None:
    """The httpx-like module (`httpx`, `httpx2`) whose Client or AsyncClient `http` is."""
    for cls in type(http).__mro__:
        if cls.__name__ in ("Client", "AsyncClient"):
            module = sys.modules.get(cls.__module__.split(".")[0])
            if module is not None and isinstance(http, (module.Client, module.AsyncClient)):
                return module
    return None


class TurnMaker:
    """What every turn of one wrapper shares: its scope, its runtime and its recall settings."""

    def __init__(self, scope: Scope, runtime: Runtime, settings: RecallSettings) -> None:
        self.scope = scope
        self.runtime = runtime
        self.settings = settings

    def turn(self, fmt: WireFormat) -> Turn:
        return Turn(fmt, self.runtime.service, self.scope,
                    request_id="hr-" + uuid.uuid4().hex[:20], settings=self.settings)

    async def prepare(self, turn: Turn, body: dict[str, Any]) -> dict[str, Any]:
        try:
            await self.runtime.read_own_writes()
            return await turn.prepare(body)
        except Exception:  # every step fails open already; this guards the promise regardless
            log.exception("memory could not prepare the request; sending it unchanged")
            turn.extraction = False
            return body


@functools.cache
def transport_classes(hx: ModuleType) -> tuple[type, type]:
    """(sync transport, async transport) for the httpx-like module `hx`; each takes
    (send, maker, close), `send` being the SDK's own transport for the request's URL."""

    def _body(request: hx.Request) -> dict[str, Any] | None:
        try:
            body = loads(request.content)
        except (ValueError, hx.RequestNotRead):
            return None
        return body if isinstance(body, dict) else None


    def _prepared_request(request: hx.Request, body: dict[str, Any],
                          prepared: dict[str, Any]) -> hx.Request:
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"content-length"]
        # The stripper reads the answer's bytes: ask for them unencoded (httpx decodes if not).
        headers = [(k, v) for k, v in headers if k.lower() != b"accept-encoding"]
        headers.append((b"accept-encoding", b"identity"))
        content = request.content if prepared is body else dumps(prepared)
        return hx.Request(request.method, request.url, headers=headers, content=content,
                             extensions=request.extensions)


    def _headers(response: hx.Response, receipt: dict[str, str]) -> list[tuple[bytes, bytes]]:
        out = [(k, v) for k, v in response.headers.raw if k.lower().decode() not in _REFRAMED]
        return out + [(k.encode(), v.encode()) for k, v in receipt.items()]


    def _streamed(fmt: WireFormat, body: dict[str, Any], response: hx.Response) -> bool:
        return fmt.streams(body) and "json" not in response.headers.get("content-type", "").lower()


    def _as_is(turn: Turn, response: hx.Response, request: hx.Request) -> hx.Response:
        """A read answer passed on unstripped: the receipt, but no block outcome to report."""
        receipt = {k: v for k, v in turn.receipt().items() if k != BLOCK_HEADER}
        return hx.Response(response.status_code, headers=_headers(response, receipt),
                              content=response.content, request=request,
                              extensions=response.extensions)


    def _whole(turn: Turn, response: hx.Response, request: hx.Request,
               store: Callable[[Block | None], None]) -> hx.Response:
        """A read answer without its block (store: the caller's way to run `turn.store`)."""
        try:
            answer = loads(response.content)
        except ValueError:
            log.warning("answer of %s is not JSON; returned as is", turn.request_id)
            return _as_is(turn, response, request)
        clean, block = turn.strip_answer(answer)
        store(block)
        return hx.Response(response.status_code, headers=_headers(response, turn.receipt()),
                              content=dumps(clean), request=request, extensions=response.extensions)


    class _Stream:
        """The SSE stripping and the once-only store shared by the sync and async streams."""

        def __init__(self, turn: Turn) -> None:
            self.sse = SSEStripper(turn.stream_stripper())
            self.stored = False

        def take_block(self) -> Block | bool | None:
            """The block to store now, or False when it was stored already."""
            if self.stored:
                return False
            self.stored = True
            if not self.sse.done:
                self.sse.finish()  # closed early: a block complete before the stream's end counts
            return self.sse.chosen_block


    class MemoryTransport(hx.BaseTransport):
        """The sync transport; `send` is the SDK client's own (its transport for the URL)."""

        def __init__(self, send: Callable[[hx.Request], hx.Response], maker: TurnMaker,
                     close: Callable[[], None]) -> None:
            self._send = send
            self._maker = maker
            self._close = close

        def handle_request(self, request: hx.Request) -> hx.Response:
            fmt = format_for(request)
            body = _body(request) if fmt is not None else None
            if fmt is None or body is None:
                return self._send(request)
            maker = self._maker
            turn = maker.turn(fmt)
            prepared = maker.runtime.run(maker.prepare(turn, body))
            response = self._send(_prepared_request(request, body, prepared))

            def store(block: Block | None) -> None:
                maker.runtime.run(turn.store(block))

            if response.status_code >= 400:
                response.read()
                return _as_is(turn, response, request)
            if _streamed(fmt, body, response):
                return hx.Response(response.status_code, request=request,
                                      headers=_headers(response, turn.receipt()),
                                      stream=_SyncStream(response, turn, store),
                                      extensions=response.extensions)
            response.read()
            return _whole(turn, response, request, store)

        def close(self) -> None:
            self._close()


    class _SyncStream(hx.SyncByteStream):
        def __init__(self, response: hx.Response, turn: Turn,
                     store: Callable[[Block | None], None]) -> None:
            self._response = response
            self._state = _Stream(turn)
            self._store = store

        def _store_once(self) -> None:
            block = self._state.take_block()
            if block is not False:
                self._store(block)  # type: ignore[arg-type]

        def __iter__(self) -> Iterator[bytes]:
            sse = self._state.sse
            for chunk in self._response.iter_bytes():
                if out := sse.feed(chunk):
                    yield out
                if sse.done and not self._state.stored:
                    self._store_once()  # durable before the client learns the answer is complete
                    if out := sse.release():
                        yield out
            tail = sse.finish()
            self._store_once()
            if out := tail + sse.release():
                yield out

        def close(self) -> None:
            try:
                self._store_once()
            finally:
                self._response.close()


    class AsyncMemoryTransport(hx.AsyncBaseTransport):
        """The async transport; `send` is the SDK client's own (its transport for the URL)."""

        def __init__(self, send: Callable[[hx.Request], Coroutine[Any, Any, hx.Response]],
                     maker: TurnMaker, close: Callable[[], Coroutine[Any, Any, None]]) -> None:
            self._send = send
            self._maker = maker
            self._close = close

        async def handle_async_request(self, request: hx.Request) -> hx.Response:
            fmt = format_for(request)
            body = _body(request) if fmt is not None else None
            if fmt is None or body is None:
                return await self._send(request)
            maker = self._maker
            turn = maker.turn(fmt)
            prepared = await maker.runtime.arun(maker.prepare(turn, body))
            response = await self._send(_prepared_request(request, body, prepared))

            async def store(block: Block | None) -> None:
                await maker.runtime.arun(turn.store(block))

            if response.status_code >= 400:
                await response.aread()
                return _as_is(turn, response, request)
            if _streamed(fmt, body, response):
                return hx.Response(response.status_code, request=request,
                                      headers=_headers(response, turn.receipt()),
                                      stream=_AsyncStream(response, turn, store),
                                      extensions=response.extensions)
            await response.aread()
            blocks: list[Block | None] = []
            result = _whole(turn, response, request, blocks.append)
            await store(blocks[0] if blocks else None)
            # The receipt was read before the store: read it again now the outcome is known.
            for name, value in turn.receipt().items():
                result.headers[name] = value
            return result

        async def aclose(self) -> None:
            await self._close()


    class _AsyncStream(hx.AsyncByteStream):
        def __init__(self, response: hx.Response, turn: Turn,
                     store: Callable[[Block | None], Coroutine[Any, Any, None]]) -> None:
            self._response = response
            self._state = _Stream(turn)
            self._store = store

        async def _store_once(self) -> None:
            block = self._state.take_block()
            if block is not False:
                await self._store(block)  # type: ignore[arg-type]

        async def __aiter__(self) -> AsyncIterator[bytes]:
            sse = self._state.sse
            async for chunk in self._response.aiter_bytes():
                if out := sse.feed(chunk):
                    yield out
                if sse.done and not self._state.stored:
                    await self._store_once()
                    if out := sse.release():
                        yield out
            tail = sse.finish()
            await self._store_once()
            if out := tail + sse.release():
                yield out

        async def aclose(self) -> None:
            try:
                await self._store_once()
            finally:
                await self._response.aclose()

    return MemoryTransport, AsyncMemoryTransport

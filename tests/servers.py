"""Real servers for end-to-end tests: uvicorn in a thread (httpx's `serve_in_thread` pattern), a
scripted fake of the paid upstream LLM that streams replies in random chunk sizes, the proxy under
test wired to it (`running_proxy`), and helpers to read what the upstream received."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import json
import random
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadedServer(uvicorn.Server):
    loop: asyncio.AbstractEventLoop | None = None
    url: str = ""

    def install_signal_handlers(self) -> None:  # the test process keeps its own handlers
        pass

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()  # so tests can run coroutines on the app's loop
        await super().serve(sockets)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` every 50 ms; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def running_server(app: Any, port: int | None = None) -> Iterator[ThreadedServer]:
    """uvicorn in a daemon thread; yields the server (its `.url`, and `.loop` for
    `run_coroutine_threadsafe`). Exiting runs the app's lifespan shutdown."""
    port = port or free_port()
    server = ThreadedServer(
        # h11, as `headroom serve` pins it: uvicorn's "auto" picks httptools where it is
        # installed, which drops an absolute-form target's scheme and host from `raw_path`.
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                       http="h11")
    )
    server.url = f"http://127.0.0.1:{port}"
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int | None = None) -> Iterator[str]:
    with running_server(app, port) as server:
        yield server.url


COOKIES = ("__cf_bm=abc; path=/; expires=Wed, 25-Nov-26 16:00:00 GMT; HttpOnly",
           "_cfuvid=xyz; path=/; HttpOnly")


@dataclass
class Reply:
    """What the fake upstream answers to the next chat completion."""

    content: str | list[str] = "Hello!"  # a list gives one content per choice (n > 1)
    status: int = 200
    error: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str = "stop"
    fail_after_bytes: int | None = None  # streaming: drop the connection after this many bytes
    delay_s: float = 0.0
    chunk_seed: int | None = None
    usage_chunk: bool = True
    headers: dict[str, str] | None = None  # extra response headers (e.g. retry-after)
    event_delay_s: float = 0.0  # streaming: pause between events
    hold_before_finish_s: float = 0.0  # streaming: pause after the content, before finish_reason
    extra_chunk_fields: dict[str, Any] | None = None  # unknown fields put in every chunk
    ignore_stream: bool = False  # answer with one JSON body even when asked to stream
    # streaming: once the text sent so far contains this, set `holding` and pause `hold_mid_s`
    hold_mid_text: str | None = None
    hold_mid_s: float = 0.0
    # "gzip" or "deflate": compress the answer though the proxy asked for identity
    content_encoding: str | None = None


@dataclass
class FakeUpstream:
    replies: deque[Reply] = field(default_factory=deque)
    received: list[dict[str, Any]] = field(default_factory=list)
    received_headers: list[dict[str, str]] = field(default_factory=list)
    stream_closed: list[bool] = field(default_factory=list)
    holding: threading.Event = field(default_factory=threading.Event)
    passthrough_bodies: list[dict[str, Any]] = field(default_factory=list)
    received_queries: list[str] = field(default_factory=list)
    open_streams: int = 0  # SSE answers being sent right now
    abandoned: int = 0  # delayed answers whose requester hung up first
    # When set, builds the reply from the request body instead of taking the next queued one
    # (concurrent tests, where queue order and request order differ).
    responder: Callable[[dict[str, Any]], Reply] | None = None

    def reset(self) -> None:
        """Forget every reply, request and stream of earlier tests (a module-scoped upstream)."""
        self.replies.clear()
        for seen in (self.received, self.received_headers, self.stream_closed,
                     self.passthrough_bodies, self.received_queries):
            seen.clear()
        self.holding.clear()
        self.responder = None
        self.open_streams = self.abandoned = 0

    def queue(self, *replies: Reply | str) -> None:
        for r in replies:
            self.replies.append(Reply(r) if isinstance(r, str) else r)

    def next_reply(self) -> Reply:
        return self.replies.popleft() if self.replies else Reply()

    @property
    def last(self) -> dict[str, Any]:
        return self.received[-1]

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/gzipped", self._gzipped, methods=["GET"]),
                Route("/v1/{path:path}", self._echo,
                      methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
            ]
        )

    async def _models(self, request: Request) -> Response:
        self.received_headers.append(dict(request.headers))
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model",
                                                           "created": 0, "owned_by": "test"}]})

    async def _completions(self, request: Request) -> Response:
        """Legacy completions; streams `text` pieces slowly when asked (pass-through tests)."""
        body = await request.json()
        self.received_headers.append(dict(request.headers))
        self.passthrough_bodies.append(body)
        text = body.get("prompt_reply", "Once upon a time<memory>{}</memory>")
        if not body.get("stream"):
            return JSONResponse({"object": "text_completion", "choices": [{"text": text}]})

        async def sse() -> AsyncIterator[bytes]:
            for piece in (text[:5], text[5:]):
                yield f"data: {json.dumps({'choices': [{'text': piece}]})}\n\n".encode()
                await asyncio.sleep(float(body.get("delay", 0)))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def _gzipped(self, request: Request) -> Response:
        self.received_headers.append(dict(request.headers))
        return Response(gzip.compress(b'{"compressed": true}' * 50), media_type="application/json",
                        headers={"content-encoding": "gzip"})

    async def _echo(self, request: Request) -> Response:
        body = await request.body()
        self.received_headers.append(dict(request.headers))
        response = Response(
            json.dumps({"method": request.method, "path": request.url.path,
                        "raw_path": request.scope["raw_path"].decode("latin-1"),
                        "query": request.url.query, "body_len": len(body),
                        "body_sha": __import__("hashlib").sha256(body).hexdigest()}).encode(),
            media_type="application/json", headers={"x-upstream": "fake"},
        )
        for cookie in COOKIES:  # repeated headers, with commas inside their values
            response.raw_headers.append((b"set-cookie", cookie.encode()))
        return response

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self.received.append(body)
        self.received_queries.append(request.url.query)
        self.received_headers.append(dict(request.headers))
        reply = self.responder(body) if self.responder else self.next_reply()
        if reply.delay_s and await self._client_leaves_within(request, reply.delay_s):
            self.abandoned += 1  # the proxy closed the connection before the answer
            return Response(status_code=499)
        if reply.status >= 400:
            return JSONResponse(
                reply.error or {"error": {"message": "upstream says no",
                                          "type": "invalid_request_error", "code": "bad"}},
                status_code=reply.status, headers=reply.headers,
            )
        contents = reply.content if isinstance(reply.content, list) else [reply.content] * int(
            body.get("n") or 1
        )
        if body.get("stream") and not reply.ignore_stream:
            events = self._sse(body, reply, contents)
            encoded = {"content-encoding": reply.content_encoding} if reply.content_encoding else {}
            return StreamingResponse(
                _compressed(events, reply.content_encoding) if reply.content_encoding else events,
                media_type="text/event-stream",
                headers={"x-upstream": "fake", **encoded, **(reply.headers or {})},
            )
        choices = []
        for i, text in enumerate(contents):
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if reply.tool_calls:
                message["tool_calls"] = reply.tool_calls
            choices.append({"index": i, "message": message, "finish_reason": reply.finish_reason,
                            "logprobs": None})
        completion = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1,
                      "model": body.get("model", "fake"), "choices": choices,
                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                      **(reply.extra_chunk_fields or {})}
        if reply.fail_after_bytes is not None:
            payload = json.dumps(completion).encode()
            return StreamingResponse(
                self._broken(payload[: reply.fail_after_bytes]),
                media_type="application/json",
            )
        if reply.content_encoding:
            chunks = [chunk async for chunk in _compressed(_once(json.dumps(completion).encode()),
                                                           reply.content_encoding)]
            return Response(b"".join(chunks), media_type="application/json",
                            headers={"x-upstream": "fake",
                                     "content-encoding": reply.content_encoding})
        return JSONResponse(completion, headers={"x-upstream": "fake", **(reply.headers or {})})

    async def _scripted(self, request: Request) -> tuple[dict[str, Any], Reply, Response | None]:
        """The body and the reply of a Responses / Messages request, or the error to send."""
        body = await request.json()
        self.received.append(body)
        self.received_queries.append(request.url.query)
        self.received_headers.append(dict(request.headers))
        reply = self.responder(body) if self.responder else self.next_reply()
        if reply.status >= 400:
            return body, reply, JSONResponse(
                reply.error or {"error": {"message": "upstream says no",
                                          "type": "invalid_request_error", "code": "bad"}},
                status_code=reply.status, headers=reply.headers,
            )
        return body, reply, None

    async def _responses(self, request: Request) -> Response:
        """The Responses API: one message item (plus function_call items for `tool_calls`)."""
        body, reply, error = await self._scripted(request)
        if error is not None:
            return error
        text = reply.content if isinstance(reply.content, str) else reply.content[0]
        model = body.get("model", "fake")
        if body.get("stream") and not reply.ignore_stream:
            pieces = random_pieces(text, reply.chunk_seed)
            return StreamingResponse(
                _sse_named(responses_events(pieces, model, reply.tool_calls), reply),
                media_type="text/event-stream", headers={"x-upstream": "fake"},
            )
        return JSONResponse(response_object(text, model, reply.tool_calls),
                            headers={"x-upstream": "fake"})

    async def _messages(self, request: Request) -> Response:
        """Anthropic's Messages API: one text block (plus tool_use blocks for `tool_calls`)."""
        body, reply, error = await self._scripted(request)
        if error is not None:
            return error
        text = reply.content if isinstance(reply.content, str) else reply.content[0]
        model = body.get("model", "fake")
        stop = _STOP_REASONS.get(reply.finish_reason, reply.finish_reason)
        if body.get("stream") and not reply.ignore_stream:
            pieces = random_pieces(text, reply.chunk_seed)
            return StreamingResponse(
                _sse_named(messages_events(pieces, model, reply.tool_calls, stop), reply),
                media_type="text/event-stream", headers={"x-upstream": "fake"},
            )
        return JSONResponse(message_object(text, model, reply.tool_calls, stop),
                            headers={"x-upstream": "fake"})

    @staticmethod
    async def _client_leaves_within(request: Request, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                return True
            await asyncio.sleep(min(0.02, max(deadline - time.monotonic(), 0)))
        return False

    @staticmethod
    async def _broken(part: bytes) -> AsyncIterator[bytes]:
        yield part
        await asyncio.sleep(0.05)
        raise ConnectionResetError("fake upstream drops the connection")

    async def _sse(
        self, body: dict[str, Any], reply: Reply, contents: list[str]
    ) -> AsyncIterator[bytes]:
        rng = random.Random(reply.chunk_seed)
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
                "model": body.get("model", "fake"), **(reply.extra_chunk_fields or {})}
        events: list[dict[str, Any]] = []
        finish_at: set[int] = set()
        for i, _ in enumerate(contents):
            events.append({**base, "choices": [{"index": i, "delta": {"role": "assistant",
                                                                      "content": ""},
                                                "finish_reason": None}]})
        for i, text in enumerate(contents):
            pos = 0
            while pos < len(text):
                size = rng.randint(1, 12)
                events.append({**base, "choices": [{"index": i,
                                                    "delta": {"content": text[pos:pos + size]},
                                                    "finish_reason": None}]})
                pos += size
            if reply.tool_calls:
                for tc_index, tc in enumerate(reply.tool_calls):
                    events.append({**base, "choices": [{"index": i, "delta": {"tool_calls": [
                        {"index": tc_index, **tc}]}, "finish_reason": None}]})
            events.append({**base, "choices": [{"index": i, "delta": {},
                                                "finish_reason": reply.finish_reason}]})
            finish_at.add(len(events) - 1)
        if reply.usage_chunk and (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": {"prompt_tokens": 1,
                                                            "completion_tokens": 1,
                                                            "total_tokens": 2}})
        sent = 0
        closed = True
        text = ""
        self.open_streams += 1
        try:
            for n, event in enumerate(events):
                if n in finish_at and reply.hold_before_finish_s:
                    self.holding.set()  # all content is sent; the finish is held back
                    await asyncio.sleep(reply.hold_before_finish_s)
                data = f"data: {json.dumps(event)}\n\n".encode()
                if reply.fail_after_bytes is not None and sent + len(data) > reply.fail_after_bytes:
                    raise ConnectionResetError("fake upstream drops the connection")
                sent += len(data)
                yield data
                held = reply.hold_mid_text is not None and reply.hold_mid_text in text
                text += (event["choices"][0]["delta"].get("content") or "") if event[
                    "choices"] else ""
                if not held and reply.hold_mid_text is not None and reply.hold_mid_text in text:
                    self.holding.set()
                    await asyncio.sleep(reply.hold_mid_s)
                await asyncio.sleep(reply.event_delay_s)
            yield b"data: [DONE]\n\n"
            closed = False
        finally:
            self.open_streams -= 1
            self.stream_closed.append(closed)


# --- the Responses and Messages wire formats, as an upstream writes them -------------------------

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_RESPONSE_USAGE = {"input_tokens": 1, "input_tokens_details": {"cached_tokens": 0},
                   "output_tokens": 1, "output_tokens_details": {"reasoning_tokens": 0},
                   "total_tokens": 2}


def random_pieces(text: str, seed: int | None) -> list[str]:
    rng = random.Random(seed)
    pieces, pos = [], 0
    while pos < len(text):
        size = rng.randint(1, 12)
        pieces.append(text[pos:pos + size])
        pos += size
    return pieces


def _function_calls(tool_calls: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [{"type": "function_call", "id": f"fc_{i}", "call_id": tc.get("id", f"call_{i}"),
             "name": tc["function"]["name"], "arguments": tc["function"]["arguments"],
             "status": "completed"} for i, tc in enumerate(tool_calls or [])]


def response_object(text: str, model: str, tool_calls: list[dict[str, Any]] | None = None,
                    status: str = "completed") -> dict[str, Any]:
    message = {"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    return {"id": "resp_fake", "object": "response", "created_at": 1, "model": model,
            "status": status, "output": [message, *_function_calls(tool_calls)],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": _RESPONSE_USAGE}


def responses_events(pieces: list[str], model: str,
                     tool_calls: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """A Responses stream: the text in `pieces`, then the function calls, then completed."""
    text = "".join(pieces)
    final = response_object(text, model, tool_calls)
    start = {**final, "status": "in_progress", "output": [], "usage": None}
    part = {"type": "output_text", "text": "", "annotations": []}
    where = {"item_id": "msg_fake", "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": start},
        {"type": "response.in_progress", "response": start},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**final["output"][0], "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **where, "part": part},
        *({"type": "response.output_text.delta", **where, "delta": p, "logprobs": []}
          for p in pieces),
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": {**part, "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": final["output"][0]},
    ]
    for i, item in enumerate(final["output"][1:], start=1):
        events.append({"type": "response.output_item.added", "output_index": i, "item": item})
        events.append({"type": "response.output_item.done", "output_index": i, "item": item})
    events.append({"type": "response.completed", "response": final})
    return [{**event, "sequence_number": n} for n, event in enumerate(events)]


def _tool_uses(tool_calls: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [{"type": "tool_use", "id": tc.get("id", f"toolu_{i}"),
             "name": tc["function"]["name"], "input": json.loads(tc["function"]["arguments"])}
            for i, tc in enumerate(tool_calls or [])]


def message_object(text: str, model: str, tool_calls: list[dict[str, Any]] | None = None,
                   stop_reason: str = "end_turn") -> dict[str, Any]:
    return {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}, *_tool_uses(tool_calls)],
            "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1}}


def messages_events(pieces: list[str], model: str,
                    tool_calls: list[dict[str, Any]] | None = None,
                    stop_reason: str = "end_turn") -> list[dict[str, Any]]:
    """A Messages stream: one text block in `pieces`, then the tool_use blocks, then the stop."""
    start = {**message_object("", model), "content": [], "stop_reason": None}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        *({"type": "content_block_delta", "index": 0,
           "delta": {"type": "text_delta", "text": p}} for p in pieces),
        {"type": "content_block_stop", "index": 0},
    ]
    for i, block in enumerate(_tool_uses(tool_calls), start=1):
        events.append({"type": "content_block_start", "index": i,
                       "content_block": {**block, "input": {}}})
        events.append({"type": "content_block_delta", "index": i, "delta": {
            "type": "input_json_delta", "partial_json": json.dumps(block["input"])}})
        events.append({"type": "content_block_stop", "index": i})
    events.append({"type": "message_delta", "delta": {"stop_reason": stop_reason,
                                                      "stop_sequence": None},
                   "usage": {"output_tokens": 1}})
    events.append({"type": "message_stop"})
    return events


def named_sse(events: list[dict[str, Any]]) -> bytes:
    """Events as `event: <type>` + `data:` SSE, as both APIs send them."""
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


async def _sse_named(events: list[dict[str, Any]], reply: Reply) -> AsyncIterator[bytes]:
    for event in events:
        yield named_sse([event])
        await asyncio.sleep(reply.event_delay_s)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _compressed(chunks: AsyncIterator[bytes], encoding: str) -> AsyncIterator[bytes]:
    """Each chunk compressed and flushed as it goes (an SSE stream stays a stream)."""
    import zlib

    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    compressor = zlib.compressobj(wbits=wbits)
    async for chunk in chunks:
        yield compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH)
    yield compressor.flush()


# --- the proxy under test, wired to a fake upstream --------------------------------------------


class InFlight:
    """Pure ASGI wrapper counting HTTP requests still being handled: a streaming response's
    generator (which queues the memory block when it ends) has finished once the count drops."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.count = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.count -= 1


@dataclass
class Proxy:
    """A running proxy (uvicorn thread) in front of a running `FakeUpstream`."""

    server: ThreadedServer
    app: Any
    inflight: InFlight
    upstream: FakeUpstream
    upstream_root: str
    clients: list[Any] = field(default_factory=list)  # closed when the proxy stops
    # Put before every user id the helpers below send or read, so that tests sharing one
    # module-scoped proxy never see each other's memories (see `proxy_fixtures`).
    user_prefix: str = ""

    def uid(self, user: str) -> str:
        """The user id the proxy sees for a test's `user`."""
        return self.user_prefix + user

    @property
    def upstream_url(self) -> str:
        return self.upstream_root + "/v1"

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    @property
    def service(self) -> Any:
        return self.app.state.service

    @property
    def engine(self) -> Any:
        return self.service.engine

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the proxy's own event loop (the engine lives there)."""
        assert self.server.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.server.loop).result(timeout)

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until every request has finished and every queued memory write is applied."""
        from headroom.proxy.relay import readers_finished

        deadline = time.monotonic() + timeout
        while self.inflight.count:
            if time.monotonic() > deadline:
                raise TimeoutError("requests still in flight")
            time.sleep(0.01)
        # A reader storing a block after its client left is no longer an in-flight request.
        assert self.run(readers_finished(timeout), timeout + 5), "stream readers still running"
        self.run(self.service.flush(timeout), timeout + 5)

    def memories(self, user_id: str, *, include_superseded: bool = False) -> list[Any]:
        """Every memory row of a user (all scopes), after `settle()`."""
        from headroom.memory.models import MemoryFilter

        self.settle()
        return self.run(self.engine.query(MemoryFilter(
            user_id=self.uid(user_id), all_scopes=True, include_superseded=include_superseded,
            limit=None,
        )))

    def headers(self, user: str | None = None, session: str | None = None,
                **extra: str) -> dict[str, str]:
        out = dict(extra)
        if user is not None:
            out["X-Headroom-User-Id"] = self.uid(user)
        if session is not None:
            out["X-Headroom-Session-Id"] = session
        return out

    def client(self, user: str | None = None, session: str | None = None, *,
               api_key: str = "sk-client", **extra: str) -> Any:
        from openai import OpenAI

        client = OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=30,
                        default_headers=self.headers(user, session, **extra))
        self.clients.append(client)
        return client

    def async_client(self, user: str | None = None, session: str | None = None, *,
                     api_key: str = "sk-client", **extra: str) -> Any:
        """The caller closes it (`await client.close()`), on its own event loop."""
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=30,
                           default_headers=self.headers(user, session, **extra))


@contextlib.contextmanager
def running_upstream(upstream: FakeUpstream | None = None) -> Iterator[tuple[str, FakeUpstream]]:
    upstream = upstream or FakeUpstream()
    with serve_in_thread(upstream.app()) as url:
        yield url, upstream


@contextlib.contextmanager
def running_proxy(
    db_path: Any, embedder: Any, *, upstream: FakeUpstream | None = None,
    upstream_url: str | None = None, warm: bool = False, **config: Any,
) -> Iterator[Proxy]:
    """A proxy on a fresh port with its database at `db_path`, in front of `upstream` (a new
    FakeUpstream by default; `upstream_url` points it somewhere else instead)."""
    from headroom.proxy.app import create_app
    from headroom.proxy.config import ProxyConfig

    with contextlib.ExitStack() as stack:
        fake = upstream or FakeUpstream()
        if upstream_url is None:
            upstream_url, fake = stack.enter_context(running_upstream(fake))
        cfg = ProxyConfig(upstream_url=upstream_url, db_path=db_path, **config)
        app = create_app(cfg, embedder=embedder, warm=warm)
        inflight = InFlight(app)
        server = stack.enter_context(running_server(inflight))
        proxy = Proxy(server, app, inflight, fake, upstream_url)
        try:
            yield proxy
        finally:
            for client in proxy.clients:  # unclosed pools warn (an error here) when collected
                client.close()


def proxy_fixtures(**config: Any) -> tuple[Any, Any]:
    """The fixtures of a test module that shares one proxy (one uvicorn server and one fake
    upstream for the whole module, issue 11): `module_proxy`, and `proxy` for each test, which
    resets the fake upstream and gives the test its own user-id namespace (`Proxy.uid`).

        _module_proxy, _proxy = proxy_fixtures()
    """

    @pytest.fixture(scope="module", name="module_proxy")
    def module_proxy(
        tmp_path_factory: pytest.TempPathFactory, local_embedder: Any, proxy_backend: str
    ) -> Iterator[Proxy]:
        # proxy_backend (conftest): one server per backend the module runs on.
        db = tmp_path_factory.mktemp("proxy") / "proxy.db"
        with running_proxy(db, local_embedder, **config) as p:
            yield p

    counter = itertools.count()

    @pytest.fixture(name="proxy")
    def proxy(module_proxy: Proxy) -> Proxy:
        module_proxy.settle()  # nothing of the previous test is still in flight
        module_proxy.upstream.reset()
        module_proxy.user_prefix = f"t{next(counter)}-"
        return module_proxy

    return module_proxy, proxy


# --- reading what the upstream received ----------------------------------------------------------


def memory_block(add: list[Any] | None = None, update: list[Any] | None = None,
                 forget: list[str] | None = None) -> str:
    """A `<memory>` block as a model would write it (only the keys given)."""
    ops: dict[str, Any] = {}
    if add is not None:
        ops["add"] = [{"text": a} if isinstance(a, str) else a for a in add]
    if update is not None:
        ops["update"] = update
    if forget is not None:
        ops["forget"] = forget
    return f"<memory>{json.dumps(ops)}</memory>"


def recalled(body: dict[str, Any]) -> str | None:
    """The content of the injected memory message in an upstream request body, if any."""
    from headroom.turn.inject import MEMORY_PREAMBLE

    for message in body.get("messages", []):
        content = message.get("content")
        if message.get("role") == "system" and isinstance(content, str) and content.startswith(
            MEMORY_PREAMBLE
        ):
            return content
    return None


def instructed(body: dict[str, Any]) -> bool:
    """True when the upstream request carries the extraction instruction (anywhere)."""
    from headroom.turn.inject import EXTRACTION_INSTRUCTION

    return any(m.get("content") == EXTRACTION_INSTRUCTION for m in body.get("messages", []))


class GatedEmbedder:
    """Wraps a real embedder; `embed` waits while `gate` is clear, for texts containing `trigger`
    (every text when `trigger` is None). Lets a test hold the model back (slow write, model
    still loading, recall too slow) without mocking anything of ours."""

    def __init__(self, inner: Any, trigger: str | None = None) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.trigger = trigger
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()  # set once a call is held at the gate

    @property
    def dimension(self) -> int:
        return int(self.inner.dimension)

    def embed(self, texts: Any) -> Any:
        if self.trigger is None or any(self.trigger in t for t in texts):
            if not self.gate.is_set():
                self.waiting.set()
            if not self.gate.wait(60):
                raise TimeoutError("gate never opened")
        return self.inner.embed(texts)

"""Real servers for end-to-end tests: uvicorn in a thread (httpx's `serve_in_thread` pattern), and
a scripted fake of the paid upstream LLM that streams replies in random chunk sizes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

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
    def install_signal_handlers(self) -> None:  # the test process keeps its own handlers
        pass


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int | None = None) -> Iterator[str]:
    port = port or free_port()
    server = ThreadedServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


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


@dataclass
class FakeUpstream:
    replies: deque[Reply] = field(default_factory=deque)
    received: list[dict[str, Any]] = field(default_factory=list)
    received_headers: list[dict[str, str]] = field(default_factory=list)
    stream_closed: list[bool] = field(default_factory=list)

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
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/{path:path}", self._echo, methods=["GET", "POST", "PUT", "DELETE"]),
            ]
        )

    async def _models(self, request: Request) -> Response:
        self.received_headers.append(dict(request.headers))
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model",
                                                           "created": 0, "owned_by": "test"}]})

    async def _echo(self, request: Request) -> Response:
        body = await request.body()
        self.received_headers.append(dict(request.headers))
        return Response(
            json.dumps({"method": request.method, "path": request.url.path,
                        "query": request.url.query, "body_len": len(body),
                        "body_sha": __import__("hashlib").sha256(body).hexdigest()}).encode(),
            media_type="application/json", headers={"x-upstream": "fake"},
        )

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self.received.append(body)
        self.received_headers.append(dict(request.headers))
        reply = self.next_reply()
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.status >= 400:
            return JSONResponse(
                reply.error or {"error": {"message": "upstream says no", "type": "invalid_request_error",
                                          "code": "bad"}},
                status_code=reply.status,
            )
        contents = reply.content if isinstance(reply.content, list) else [reply.content] * int(
            body.get("n") or 1
        )
        if body.get("stream"):
            return StreamingResponse(
                self._sse(body, reply, contents), media_type="text/event-stream",
                headers={"x-upstream": "fake"},
            )
        choices = []
        for i, text in enumerate(contents):
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if reply.tool_calls:
                message["tool_calls"] = reply.tool_calls
            choices.append({"index": i, "message": message, "finish_reason": reply.finish_reason,
                            "logprobs": None})
        return JSONResponse(
            {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1,
             "model": body.get("model", "fake"), "choices": choices,
             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
            headers={"x-upstream": "fake"},
        )

    async def _sse(
        self, body: dict[str, Any], reply: Reply, contents: list[str]
    ) -> AsyncIterator[bytes]:
        rng = random.Random(reply.chunk_seed)
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
                "model": body.get("model", "fake")}
        events: list[dict[str, Any]] = []
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
        if reply.usage_chunk and (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": {"prompt_tokens": 1,
                                                            "completion_tokens": 1,
                                                            "total_tokens": 2}})
        sent = 0
        closed = True
        try:
            for event in events:
                data = f"data: {json.dumps(event)}\n\n".encode()
                if reply.fail_after_bytes is not None and sent + len(data) > reply.fail_after_bytes:
                    raise ConnectionResetError("fake upstream drops the connection")
                sent += len(data)
                yield data
                await asyncio.sleep(0)
            yield b"data: [DONE]\n\n"
            closed = False
        finally:
            self.stream_closed.append(closed)

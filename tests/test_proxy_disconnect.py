"""A client that goes away mid-stream: the proxy closes its upstream stream at once, and a memory
block that had fully arrived before the disconnect is still stored, exactly once.

Two ways in: the `openai` SDK closing its stream early against the real server, and the ASGI app
called directly with hand-written receive/send (starlette's
`test_streaming_response_stops_if_receiving_http_disconnect` style)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from headroom.proxy.app import create_app
from headroom.proxy.config import ProxyConfig
from tests.servers import Reply, memory_block, running_proxy, running_upstream

ANSWER = "A visible answer that arrives before the finish."
HOLD_S = 5.0  # the fake upstream holds its finish chunk this long; the tests must not wait it


def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_sdk_closing_the_stream_closes_the_upstream_and_keeps_the_block(
    tmp_path: Path, local_embedder: Any
) -> None:
    with running_proxy(tmp_path / "p.db", local_embedder) as p:
        p.upstream.queue(Reply(f"{ANSWER} " + memory_block(["Likes to leave early"]),
                               hold_before_finish_s=HOLD_S, chunk_seed=4))
        stream = p.client("ann").chat.completions.create(
            model="gpt-test", stream=True, messages=[{"role": "user", "content": "bye"}]
        )
        text = ""
        for chunk in stream:
            text += "".join(c.delta.content or "" for c in chunk.choices)
            if text == ANSWER:
                break
        upstream_holding = p.upstream.holding.wait(10)  # the whole block is on the wire
        time.sleep(0.3)
        closed_at = time.monotonic()
        stream.close()
        assert text == ANSWER and upstream_holding
        _wait_for(lambda: p.upstream.stream_closed == [True])
        assert time.monotonic() - closed_at < HOLD_S - 2  # not when the upstream finished
        assert [m.content for m in p.memories("ann")] == ["Likes to leave early"]
        assert p.run(p.engine.stats("ann"))["rows"] == 1


async def test_asgi_disconnect_stops_the_stream(tmp_path: Path, local_embedder: Any) -> None:
    with running_upstream() as (url, upstream):
        upstream.queue(Reply(f"{ANSWER} " + memory_block(["Writes ASGI apps by hand"]),
                             hold_before_finish_s=HOLD_S, chunk_seed=9))
        app = create_app(ProxyConfig(upstream_url=url, db_path=tmp_path / "p.db"),
                         embedder=local_embedder, warm=False)
        payload = json.dumps({"model": "gpt-test", "stream": True,
                              "messages": [{"role": "user", "content": "hi"}]}).encode()
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode()),
                        (b"x-headroom-user-id", b"ben")],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8787),
        }
        visible = asyncio.Event()
        messages: list[dict[str, Any]] = []
        requested = False

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await visible.wait()
            # Disconnect only once the whole block is on the wire (the upstream now holds its
            # finish); an earlier disconnect would cut the block itself, storing less.
            await asyncio.to_thread(upstream.holding.wait, 10)
            await asyncio.sleep(0.3)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)
            text = "".join(
                c["delta"].get("content") or ""
                for m in messages if m["type"] == "http.response.body"
                for event in m["body"].decode().split("\n\n") if event.startswith("data: {")
                for c in json.loads(event[6:])["choices"]
            )
            if text == ANSWER:
                visible.set()

        async with app.router.lifespan_context(app):
            started = asyncio.get_running_loop().time()
            await asyncio.wait_for(app(scope, receive, send), HOLD_S - 1)
            assert asyncio.get_running_loop().time() - started < HOLD_S - 1
            await asyncio.to_thread(_wait_for, lambda: upstream.stream_closed == [True])
            service = app.state.service
            await service.flush(10)
            bodies = b"".join(m.get("body", b"") for m in messages)
            assert b"memory" not in bodies and b"[DONE]" not in bodies
            assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 200
            from headroom.memory.models import MemoryFilter

            rows = await service.engine.query(
                MemoryFilter(user_id="ben", all_scopes=True, include_superseded=True)
            )
            assert [m.content for m in rows] == ["Writes ASGI apps by hand"]

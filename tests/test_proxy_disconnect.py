"""A client that goes away mid-stream: the proxy closes its upstream stream within a second, a
memory block that had fully arrived before the disconnect is still stored, exactly once, and one
the model was still writing is read to its end (bounded) and stored. A disconnect is one INFO
line, never a traceback.

Two ways in: the `openai` SDK closing its stream early against the real server, and the ASGI app
called directly with hand-written receive/send (starlette's
`test_streaming_response_stops_if_receiving_http_disconnect` style)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from headroom.proxy.app import create_app
from headroom.proxy.config import ProxyConfig
from tests.servers import Proxy, Reply, memory_block, proxy_fixtures, running_upstream

ANSWER = "A visible answer that arrives before the finish."
HOLD_S = 5.0  # the fake upstream holds its finish chunk this long; the tests must not wait it

_module_proxy, _proxy = proxy_fixtures()


def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_sdk_closing_the_stream_closes_the_upstream_and_keeps_the_block(proxy: Proxy) -> None:
    proxy.upstream.queue(Reply(f"{ANSWER} " + memory_block(["Likes to leave early"]),
                               hold_before_finish_s=HOLD_S, chunk_seed=4))
    stream = proxy.client("ann").chat.completions.create(
        model="gpt-test", stream=True, messages=[{"role": "user", "content": "bye"}]
    )
    text = ""
    for chunk in stream:
        text += "".join(c.delta.content or "" for c in chunk.choices)
        if text == ANSWER:
            break
    upstream_holding = proxy.upstream.holding.wait(10)  # the whole block is on the wire
    time.sleep(0.3)
    closed_at = time.monotonic()
    stream.close()
    assert text == ANSWER and upstream_holding
    _wait_for(lambda: proxy.upstream.stream_closed == [True])
    assert time.monotonic() - closed_at < HOLD_S - 2  # not when the upstream finished
    assert [m.content for m in proxy.memories("ann")] == ["Likes to leave early"]
    assert proxy.run(proxy.engine.stats(proxy.uid("ann")))["rows"] == 1


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


def _leave_after(p: Proxy, user: str, seen: str) -> str:
    """Stream with the raw client, read until `seen` is visible, then hang up."""
    body = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "go"}]}
    text = ""
    with httpx.Client(base_url=p.base_url, timeout=30) as client, client.stream(
        "POST", "/chat/completions", json=body, headers=p.headers(user)
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                text += "".join(c["delta"].get("content") or ""
                                for c in json.loads(line[6:])["choices"])
            if seen in text:
                break
    return text


def test_clients_leaving_release_the_upstream_within_a_second(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 9: 10 of 10 upstream requests were still open (and paid for) 60 s later."""
    long_answer = "A long answer that keeps on streaming. " * 40
    caplog.set_level(logging.INFO)
    for n in range(5):
        proxy.upstream.queue(Reply(long_answer, event_delay_s=0.05, chunk_seed=n))
        assert _leave_after(proxy, "leaver", "keeps on").startswith("A long answer")
        left_at = time.monotonic()
        _wait_for(lambda: proxy.upstream.open_streams == 0, timeout=5)
        assert time.monotonic() - left_at < 1.0
    assert proxy.upstream.stream_closed == [True] * 5  # none was read to its end
    assert proxy.memories("leaver") == []
    left = [r for r in caplog.records if "client left" in r.getMessage()]
    assert len(left) == 5 and all(r.levelno == logging.INFO for r in left)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_block_being_written_is_read_to_its_end_and_stored(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    block = memory_block(["Hangs up in the middle of things"])
    # The upstream pauses inside the block (after `"add"`), while the client hangs up.
    proxy.upstream.queue(Reply(f"{ANSWER} {block}", hold_mid_text='"add"', hold_mid_s=1.0,
                               chunk_seed=2))
    assert _leave_after(proxy, "midway", ANSWER) == ANSWER
    assert proxy.upstream.holding.wait(10)
    _wait_for(lambda: proxy.upstream.open_streams == 0, timeout=10)
    assert [m.content for m in proxy.memories("midway")] == ["Hangs up in the middle of things"]
    assert any("reading on to its end" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_client_giving_up_on_a_whole_answer_cancels_the_upstream_request(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    proxy.upstream.queue(Reply("Too late. " + memory_block(["Never sees this"]), delay_s=5.0))
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "slow one"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{proxy.base_url}/chat/completions", json=body,
                   headers=proxy.headers("quitter"), timeout=0.5)
    gave_up = time.monotonic()
    _wait_for(lambda: proxy.upstream.abandoned == 1, timeout=5)
    assert time.monotonic() - gave_up < 1.0
    assert proxy.memories("quitter") == []
    assert any("before the answer; upstream request cancelled" in r.getMessage()
               for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]

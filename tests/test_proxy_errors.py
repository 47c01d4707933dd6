"""Every error path, end to end: upstream errors relayed as they are; the proxy's own errors
(502 unreachable, 504 timeout, 400 malformed, 413 too large) in the OpenAI error shape; and
memory trouble (embedder failing or still loading, database locked or unusable) never failing a
request: the answer goes through, the problem is logged and counted."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from headroom.memory.db import connect
from tests.fakes import FakeEmbedder
from tests.servers import (
    GatedEmbedder,
    Proxy,
    Reply,
    free_port,
    instructed,
    memory_block,
    recalled,
    running_proxy,
)

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}]}
USER = {"x-headroom-user-id": "uma"}


@pytest.fixture
def proxy(tmp_path: Path, local_embedder: Any) -> Iterator[Proxy]:
    with running_proxy(tmp_path / "proxy.db", local_embedder) as p:
        yield p


def assert_openai_error(response: httpx.Response, status: int, type_: str, code: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (type_, code)
    assert error["message"]


# --- upstream errors: relayed untouched --------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_are_relayed_with_body_status_and_headers(
    proxy: Proxy, status: int, stream: bool
) -> None:
    error = {"error": {"message": f"upstream {status}", "type": "some_type", "param": "x",
                       "code": f"code_{status}", "vendor_extra": [1, 2]}}
    proxy.upstream.queue(Reply(status=status, error=error,
                               headers={"retry-after": "7", "x-request-id": "req_up"}))
    response = httpx.post(f"{proxy.base_url}/chat/completions", json={**CHAT, "stream": stream},
                          headers=USER)
    assert response.status_code == status
    assert response.json() == error
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-request-id"] == "req_up"
    assert response.headers["x-headroom-request-id"].startswith("hr-")
    assert instructed(proxy.upstream.last)  # the request itself did go through the pipeline


def test_the_sdk_sees_the_upstream_error(proxy: Proxy) -> None:
    error = {"error": {"message": "Rate limit reached", "type": "requests", "param": None,
                       "code": "rate_limit_exceeded"}}
    proxy.upstream.queue(Reply(status=429, error=error))
    with pytest.raises(openai.RateLimitError) as caught:
        proxy.client("uma").chat.completions.create(**CHAT)
    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.body == error["error"]


# --- the proxy's own errors ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/chat/completions", "/models"])
@pytest.mark.parametrize("headers", [USER, {}])
def test_upstream_unreachable_is_502(
    tmp_path: Path, local_embedder: Any, path: str, headers: dict[str, str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with running_proxy(tmp_path / "p.db", local_embedder, upstream_url=dead) as p:
        method = "POST" if path == "/chat/completions" else "GET"
        response = httpx.request(method, f"{p.base_url}{path}", json=CHAT, headers=headers)
        assert_openai_error(response, 502, "upstream_error", "upstream_unreachable")
        with pytest.raises(openai.InternalServerError) as caught:
            p.client("uma").chat.completions.create(**CHAT)
        assert caught.value.status_code == 502


def test_upstream_timeout_is_504(tmp_path: Path, local_embedder: Any) -> None:
    with running_proxy(tmp_path / "p.db", local_embedder, upstream_read_timeout_s=0.3) as p:
        for stream in (False, True):
            p.upstream.queue(Reply("late", delay_s=1.0))
            response = httpx.post(f"{p.base_url}/chat/completions",
                                  json={**CHAT, "stream": stream}, headers=USER)
            assert_openai_error(response, 504, "upstream_error", "upstream_timeout")
        p.upstream.queue(Reply("late", delay_s=1.0))
        response = httpx.post(f"{p.base_url}/chat/completions", json=CHAT)  # pass-through
        assert_openai_error(response, 504, "upstream_error", "upstream_timeout")


def test_upstream_stalling_mid_stream_ends_with_an_error_event(
    tmp_path: Path, local_embedder: Any
) -> None:
    with running_proxy(tmp_path / "p.db", local_embedder, upstream_read_timeout_s=0.3) as p:
        p.upstream.queue(Reply("First part. " + memory_block(["Never stored"]),
                               hold_before_finish_s=1.0, chunk_seed=1))
        with httpx.stream("POST", f"{p.base_url}/chat/completions",
                          json={**CHAT, "stream": True}, headers=USER) as response:
            assert response.status_code == 200
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
        error = json.loads(events[-1])["error"]
        assert (error["type"], error["code"]) == ("upstream_error", "upstream_stream_error")
        text = "".join(c["delta"].get("content") or "" for e in events[:-1]
                       for c in json.loads(e)["choices"])
        assert text == "First part."

        # The SDK raises on the error event.
        p.upstream.queue(Reply("Again. ", hold_before_finish_s=1.0))
        with pytest.raises(openai.APIError, match="stream broke off"):
            list(p.client("uma").chat.completions.create(**CHAT, stream=True))


def test_upstream_dropping_the_connection(proxy: Proxy) -> None:
    # Mid-stream: the client gets what arrived, then an error event; nothing leaks.
    proxy.upstream.queue(Reply("Some text before the drop. " + memory_block(["Half"]),
                               fail_after_bytes=700, chunk_seed=3))
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions",
                      json={**CHAT, "stream": True}, headers=USER) as response:
        body = response.read().decode()
    assert response.status_code == 200
    events = [json.loads(e.removeprefix("data: ")) for e in body.strip().split("\n\n")]
    assert events[-1]["error"]["code"] == "upstream_stream_error"
    text = "".join(c["delta"].get("content") or "" for e in events[:-1] for c in e["choices"])
    assert text and "Some text before the drop.".startswith(text)
    # Mid-body of a non-streaming answer: a 502, not a 500.
    proxy.upstream.queue(Reply("Some text", fail_after_bytes=40))
    response = httpx.post(f"{proxy.base_url}/chat/completions", json=CHAT, headers=USER)
    assert_openai_error(response, 502, "upstream_error", "upstream_unreachable")


def test_malformed_requests_are_400(proxy: Proxy) -> None:
    url = f"{proxy.base_url}/chat/completions"
    cases = [
        (b'{"model": "x", "messages": [', USER, "invalid_json"),
        (b"\xff\xfe not utf-8", USER, "invalid_json"),
        (b'["a", "list"]', USER, "invalid_json"),
        (json.dumps(CHAT).encode(), {**USER, "x-headroom-memory": "sometimes"}, "invalid_header"),
        (json.dumps(CHAT).encode(), {"x-headroom-user-id": "u" * 300}, "invalid_request"),
        (json.dumps({**CHAT, "user": 42}).encode(), {}, "invalid_request"),
    ]
    for content, headers, code in cases:
        response = httpx.post(url, content=content,
                              headers={**headers, "content-type": "application/json"})
        assert_openai_error(response, 400, "invalid_request_error", code)
    assert proxy.upstream.received == []  # none of them reached the upstream
    with pytest.raises(openai.BadRequestError):
        proxy.client("uma", **{"X-Headroom-Memory": "sometimes"}).chat.completions.create(**CHAT)


def test_oversized_body_is_413(tmp_path: Path, local_embedder: Any) -> None:
    with running_proxy(tmp_path / "p.db", local_embedder, max_body_bytes=2000) as p:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
        url = f"{p.base_url}/chat/completions"
        response = httpx.post(url, json=big, headers=USER)  # declared content-length
        assert_openai_error(response, 413, "invalid_request_error", "request_too_large")

        def chunked() -> Iterator[bytes]:  # no content-length: counted while reading
            data = json.dumps(big).encode()
            for i in range(0, len(data), 500):
                yield data[i:i + 500]

        response = httpx.post(url, content=chunked(),
                              headers={**USER, "content-type": "application/json"})
        assert_openai_error(response, 413, "invalid_request_error", "request_too_large")
        response = httpx.post(url, json=big)  # without a user too
        assert_openai_error(response, 413, "invalid_request_error", "request_too_large")
        assert p.upstream.received == []
        with pytest.raises(openai.APIStatusError) as caught:
            p.client("uma").chat.completions.create(**big)
        assert caught.value.status_code == 413


# --- memory trouble fails open --------------------------------------------------------------------


def _readyz(p: Proxy) -> dict[str, Any]:
    return httpx.get(f"{p.url}/readyz").json()


def test_embedder_failure_never_fails_the_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    embedder = FakeEmbedder()
    with running_proxy(tmp_path / "p.db", embedder) as p:
        p.run(p.engine.add("Likes green tea", "vic"))
        embedder.fail_with = RuntimeError("embedding service down")
        block = memory_block(["Drinks it at 5pm"])
        for stream in (False, True):
            p.upstream.queue(Reply("Tea. " + block, chunk_seed=2))
            answer = p.client("vic").chat.completions.create(**CHAT, stream=stream)
            text = ("".join(c.choices[0].delta.content or "" for c in answer if c.choices)
                    if stream else answer.choices[0].message.content)
            assert text == "Tea."
            assert recalled(p.upstream.last) is None
        assert _readyz(p)["counters"]["recall_errors"] == 2
        assert any("recall failed" in r.getMessage() for r in caplog.records)
        # The ops wait in the outbox and land once the embedder is back (exactly once).
        deadline = time.monotonic() + 15
        while not any("embedder failing" in r for r in _readyz(p)["reasons"]):
            assert time.monotonic() < deadline, "the writer never reported the embedder"
            time.sleep(0.05)
        assert p.run(p.engine.stats("vic"))["outbox_pending"] == 2
        embedder.fail_with = None
        texts = sorted(m.content for m in p.memories("vic"))
        assert texts == ["Drinks it at 5pm", "Likes green tea"]


@pytest.mark.sqlite_only("holds the SQLite file's write lock from another connection")
def test_locked_database_never_fails_the_request(proxy: Proxy) -> None:
    """Another process holds the write lock: the answer waits only its bounded durable wait
    (ProxyConfig.durable_wait_s, 1 s), the write lands after the lock is released."""
    db_path = proxy.service.config.db_path
    proxy.upstream.queue(Reply("Noted. " + memory_block(["Collects vinyl records"])))
    locker = connect(db_path)
    locker.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        answer = proxy.client("wes").chat.completions.create(**CHAT)
        assert answer.choices[0].message.content == "Noted."
        assert time.monotonic() - started < 1.0 + 1.0
        assert proxy.service.counters["ops_answered_before_durable"] == 1
        time.sleep(0.5)
        assert proxy.service.counters["ops_queued"] == 0  # still waiting for the lock
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert [m.content for m in proxy.memories("wes")] == ["Collects vinyl records"]


def test_slow_recall_is_skipped_within_its_budget(tmp_path: Path, local_embedder: Any) -> None:
    gated = GatedEmbedder(local_embedder, trigger="hello")
    with running_proxy(tmp_path / "p.db", gated, recall_timeout_s=0.3) as p:
        p.run(p.engine.add("Likes green tea", "xena"))
        gated.gate.clear()
        try:
            started = time.monotonic()
            answer = p.client("xena").chat.completions.create(**CHAT)
            assert answer.choices[0].message.content == "Hello!"
            assert time.monotonic() - started < 2.0
        finally:
            gated.gate.set()
        assert recalled(p.upstream.last) is None and instructed(p.upstream.last)
        assert p.service.counters["recall_timeouts"] == 1


def test_model_still_loading_answers_and_stores_later(
    tmp_path: Path, local_embedder: Any
) -> None:
    gated = GatedEmbedder(local_embedder)
    gated.gate.clear()  # the warm-up (and everything else) waits for the "model"
    try:
        with running_proxy(tmp_path / "p.db", gated, warm=True) as p:
            assert httpx.get(f"{p.url}/healthz").status_code == 200
            ready = httpx.get(f"{p.url}/readyz")
            assert ready.status_code == 503 and ready.json()["embedder"] == "loading"
            assert ready.json()["status"] == "starting"
            p.upstream.queue(Reply("Hi! " + memory_block(["Plays the banjo"])))
            raw = p.client("yuri").chat.completions.with_raw_response.create(**CHAT)
            assert raw.parse().choices[0].message.content == "Hi!"
            assert "recall off: memory not ready" in raw.headers["x-headroom-memory-notes"]
            assert instructed(p.upstream.last)
            assert p.service.counters["recall_skipped_not_ready"] == 1
            gated.gate.set()
            deadline = time.monotonic() + 10
            while httpx.get(f"{p.url}/readyz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert [m.content for m in p.memories("yuri")] == ["Plays the banjo"]
    finally:
        gated.gate.set()


@pytest.mark.sqlite_only("a directory where the SQLite file should be")
def test_unusable_database_means_plain_pass_through(
    tmp_path: Path, local_embedder: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="headroom.proxy")
    not_a_file = tmp_path / "a-directory"
    not_a_file.mkdir()
    with running_proxy(not_a_file, local_embedder) as p:
        ready = httpx.get(f"{p.url}/readyz")  # degraded, not unready: the proxy still serves
        assert ready.status_code == 200 and ready.json()["database"].startswith("error")
        assert ready.json()["status"] == "degraded"
        assert ready.json()["reasons"][0].startswith("database unusable")
        p.upstream.queue(Reply("Hi!"))
        raw = p.client("zoe").chat.completions.with_raw_response.create(**CHAT)
        assert raw.parse().choices[0].message.content == "Hi!"
        assert p.upstream.last == CHAT  # no instruction for blocks nobody could store
        assert any("memory disabled" in r.getMessage() for r in caplog.records)


@pytest.mark.sqlite_only("holds the SQLite file's write lock from another connection")
def test_concurrent_lock_and_requests_keep_answering(proxy: Proxy) -> None:
    """Many requests while the database is locked: all answered, all writes land afterwards."""
    users = [f"lock{n}" for n in range(8)]
    proxy.upstream.responder = lambda body: Reply(
        "ok " + memory_block([f"{body['messages'][-1]['content']} owns a kayak"])
    )
    locker = connect(proxy.service.config.db_path)
    locker.execute("BEGIN IMMEDIATE")
    errors: list[BaseException] = []

    def one(user: str) -> None:
        try:
            answer = proxy.client(user).chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": user}])
            assert answer.choices[0].message.content == "ok"
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    try:
        threads = [threading.Thread(target=one, args=(u,)) for u in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert errors == []
    for user in users:
        assert [m.content for m in proxy.memories(user)] == [f"{user} owns a kayak"]

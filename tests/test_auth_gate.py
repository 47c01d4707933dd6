"""The gate's other checks, against a real keyless loopback server (the quick start): path
traversal sent as raw bytes on a socket (no client library normalises them first), cross-site
requests (text/plain bodies, foreign Origins, preflights), and the one id rule."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from headroom.memory.errors import StorageError
from headroom.proxy.auth import AuthMiddleware, resolve_auth
from headroom.proxy.config import ProxyConfig
from headroom.proxy.keys_postgres import PgKeyStore
from tests.pg import PgServer
from tests.servers import FakeUpstream, Proxy, Reply, memory_block, running_proxy, running_server

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
APP_ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def keyless(tmp_path_factory: pytest.TempPathFactory, local_embedder: Any) -> Iterator[Proxy]:
    root = tmp_path_factory.mktemp("keyless")
    with running_proxy(root / "p.db", local_embedder, cors_origins=(APP_ORIGIN,)) as proxy:
        yield proxy


def raw_request(url: str, target: bytes, method: bytes = b"GET", headers: bytes = b"",
                body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request with the target exactly as given; the status and the body."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     + headers + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


def error_code(payload: bytes) -> str:
    error = json.loads(payload)["error"]
    assert error["message"] and error["type"]
    return str(error["code"])


TRAVERSALS = [
    b"/v1/../x",
    b"/v1/../_log",
    b"/v1/%2e%2e/_log",
    b"/v1/%2E%2e/%2e%2E/admin/keys",
    b"/v1/models/..%2F..%2F..%2Fadmin",
    b"/v1/./models",
    b"/v1/models/.",
    b"//v1/models",
    b"/v1//models",
    b"/v1/models%2F%2Fx",
    b"/v1/%252e%252e/x",
    b"/v1/a\\..\\b",
    b"http://evil.example/v1/models",
    b"*",
    b"/x",
    b"/v1",
    b"/admin/keys",
    b"/v1/models/a%00b",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_traversal_and_paths_outside_v1_are_400(keyless: Proxy, target: bytes) -> None:
    before = len(keyless.upstream.received_headers)
    status, payload = raw_request(keyless.url, target)
    assert status == 400, (target, payload)
    assert error_code(payload) == "invalid_path"
    assert len(keyless.upstream.received_headers) == before


def test_paths_stay_under_the_upstream_prefix(tmp_path: Path, local_embedder: Any) -> None:
    fake = FakeUpstream()
    outside: list[str] = []

    async def spy(scope: Any, receive: Any, send: Any) -> None:
        outside.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"outside the prefix"})

    gateway = Starlette(routes=[Mount("/gateway/openai", app=fake.app()), Mount("/", app=spy)])
    with running_server(gateway) as server, running_proxy(
        tmp_path / "p.db", local_embedder, upstream=fake,
        upstream_url=f"{server.url}/gateway/openai/v1",
    ) as proxy:
        for target in (b"/v1/../../../admin/keys", b"/v1/%2e%2e/%2e%2e/admin"):
            assert raw_request(proxy.url, target)[0] == 400
        status, payload = raw_request(proxy.url, b"/v1/models/meta-llama%2FLlama-3")
        assert status == 200 and json.loads(payload)["raw_path"] == (
            "/gateway/openai/v1/models/meta-llama%2FLlama-3")
    assert outside == []


def test_a_cross_site_text_plain_write_is_refused(keyless: Proxy) -> None:
    """The attack: a web page's "simple" fetch (no preflight) with `user` in a text/plain body."""
    body = json.dumps({**CHAT, "user": "alice"}).encode()
    keyless.upstream.queue(Reply("ok" + memory_block(add=["Bank PIN is 4455"])))
    before = len(keyless.upstream.received)
    for headers, status, code in (
        (b"Content-Type: text/plain\r\n", 415, "unsupported_media_type"),
        (b"Content-Type: application/x-www-form-urlencoded\r\n", 415, "unsupported_media_type"),
        (b"", 415, "unsupported_media_type"),
        (b"Content-Type: text/plain\r\nOrigin: https://evil.example\r\n", 403,
         "origin_not_allowed"),
        (b"Content-Type: application/json\r\nOrigin: https://evil.example\r\n", 403,
         "origin_not_allowed"),
        (b"Content-Type: application/json\r\nOrigin: null\r\n", 403, "origin_not_allowed"),
        (b"Content-Type: application/json\r\nSec-Fetch-Site: cross-site\r\n", 403,
         "origin_not_allowed"),
    ):
        status_got, payload = raw_request(keyless.url, b"/v1/chat/completions", b"POST",
                                          headers, body)
        assert (status_got, error_code(payload)) == (status, code), headers
    assert len(keyless.upstream.received) == before
    assert keyless.memories("alice") == []


def test_preflights_are_answered_here_never_forwarded(keyless: Proxy) -> None:
    before = len(keyless.upstream.received_headers)
    url = keyless.base_url + "/chat/completions"
    ask = {"access-control-request-method": "POST",
           "access-control-request-headers": "authorization, content-type, x-headroom-user-id"}
    foreign = httpx.options(url, headers={"origin": "https://evil.example", **ask})
    assert foreign.status_code == 403
    assert "access-control-allow-origin" not in foreign.headers
    allowed = httpx.options(url, headers={"origin": APP_ORIGIN, **ask})
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-headroom-user-id" in allowed.headers["access-control-allow-headers"]
    plain = httpx.options(url)
    assert plain.status_code == 204 and "access-control-allow-origin" not in plain.headers
    assert len(keyless.upstream.received_headers) == before

    response = httpx.post(url, json=CHAT, headers={"origin": APP_ORIGIN,
                                                   "x-headroom-user-id": "web-user"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-headroom-request-id" in response.headers["access-control-expose-headers"]


def test_keyless_quick_start_is_unchanged(keyless: Proxy) -> None:
    client = keyless.client("quick-start-user")
    keyless.upstream.queue(Reply("Sure." + memory_block(add=["Plays the cello"])))
    assert client.chat.completions.create(**CHAT).choices[0].message.content == "Sure."
    assert [m.content for m in keyless.memories("quick-start-user")] == ["Plays the cello"]
    assert keyless.upstream.received_headers[-1]["authorization"] == "Bearer sk-client"
    assert httpx.get(keyless.url + "/healthz").json() == {"status": "ok"}


def test_a_header_id_is_utf8_and_equals_the_same_id_in_the_body(keyless: Proxy) -> None:
    user = "zoë-日本"
    keyless.upstream.queue(Reply("ok" + memory_block(add=["Speaks Japanese"])))
    response = httpx.post(keyless.base_url + "/chat/completions", json=CHAT,
                          headers={"x-headroom-user-id": user.encode()})
    assert response.status_code == 200
    assert [m.content for m in keyless.memories(user)] == ["Speaks Japanese"]
    keyless.upstream.queue(Reply("ok"))
    httpx.post(keyless.base_url + "/chat/completions",
               json={**CHAT, "user": user, "messages": [
                   {"role": "user", "content": "Which languages do I speak?"}]})
    assert "Speaks Japanese" in str(keyless.upstream.last["messages"])


@pytest.mark.parametrize("bad", ["a\x7fb", "a\x85b", "a\u2028b", "a\u2029b", "a b", "a\tb",
                                 "a|b", "a\u200bb", "a\u202eb", "x" * 257, "a\x00b"])
def test_ids_outside_the_charset_are_400(keyless: Proxy, bad: str) -> None:
    before = len(keyless.upstream.received)
    response = httpx.post(keyless.base_url + "/chat/completions", json={**CHAT, "user": bad})
    assert response.status_code == 400, bad
    assert response.json()["error"]["type"] == "invalid_request_error"
    header = bad.encode()
    if b"\x00" not in header and b"\n" not in header:  # what an HTTP client can send at all
        status, _ = raw_request(keyless.url, b"/v1/chat/completions", b"POST",
                                b"Content-Type: application/json\r\nX-Headroom-User-Id: "
                                + header + b"\r\n", json.dumps(CHAT).encode())
        assert status == 400, bad
    assert len(keyless.upstream.received) == before


def test_an_id_of_max_length_is_accepted(keyless: Proxy) -> None:
    response = httpx.post(keyless.base_url + "/chat/completions",
                          json={**CHAT, "user": "é" * 256})
    assert response.status_code == 200


def test_a_stray_proxy_key_on_a_keyless_server_is_refused_not_forwarded(keyless: Proxy) -> None:
    before = len(keyless.upstream.received_headers)
    response = httpx.get(keyless.base_url + "/models",
                         headers={"authorization": "Bearer hk_0123456789ab_not-issued"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert len(keyless.upstream.received_headers) == before
    key_db = keyless.app.state.auth.key_db
    assert not key_db.exists()  # checking a key creates no key file


async def test_websockets_are_refused(tmp_path: Path) -> None:
    reached: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope)

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "websocket.connect"}

    gate = AuthMiddleware(app, resolve_auth(ProxyConfig(db_path=tmp_path / "m.db")))
    await gate({"type": "websocket", "path": "/v1/realtime", "raw_path": b"/v1/realtime",
                "headers": [], "query_string": b""}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}] and reached == []


def _ok_route(reached: list[Any]) -> Any:
    """An app that records each request it gets and answers 200 `{}`."""
    async def route(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return route


async def _with_and_without_a_key(gate: Any) -> tuple[httpx.Response, httpx.Response]:
    """GET /v1/models through `gate`, once with a (well-formed) proxy key and once keyless."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(gate), base_url="http://t") as c:
        with_key = await c.get("/v1/models",
                               headers={"authorization": "Bearer hk_0123456789ab_whatever"})
        keyless = await c.get("/v1/models")
    return with_key, keyless


async def test_a_key_store_that_cannot_be_reached_admits_nobody(tmp_path: Path) -> None:
    """Keys in a PostgreSQL database that is down: a 503 in the OpenAI shape, never the route,
    never a silent pass as keyless; a request that brings no proxy key is not held up."""
    reached: list[Any] = []
    gone = f"postgresql://headroom:s3cret@/headroom?host={tmp_path / 'no-server'}"
    gate = AuthMiddleware(_ok_route(reached), resolve_auth(ProxyConfig(db_path=tmp_path / "m.db",
                                                                       key_db_path=gone)))
    refused, keyless = await _with_and_without_a_key(gate)
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "key_store_unavailable")
    assert error["message"] and "s3cret" not in refused.text
    assert keyless.status_code == 200 and len(reached) == 1
    gate.keys.close()


async def test_a_key_file_that_cannot_be_read_admits_nobody(tmp_path: Path) -> None:
    """A SQLite key file that is not a database (overwritten, corrupted): the same 503 as a
    PostgreSQL store that is down, not a 500, and keyless requests still pass."""
    keys = tmp_path / "m.keys.db"
    keys.write_bytes(b"this is no SQLite file" * 512)

    reached: list[Any] = []
    gate = AuthMiddleware(_ok_route(reached), resolve_auth(ProxyConfig(db_path=tmp_path / "m.db",
                                                                       key_db_path=keys)))
    refused, keyless = await _with_and_without_a_key(gate)
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "key_store_unavailable")
    assert "corrupt" in error["message"]
    assert keyless.status_code == 200 and len(reached) == 1
    gate.keys.close()


def test_a_postgresql_key_store_down_at_startup_works_once_the_database_is_there(
    pg_server: PgServer,
) -> None:
    """Checks fail (StorageError, the gate's 503) while the database is missing, fast after the
    first attempt, and succeed from the first check after it appears: no restart needed."""
    name = f"late_{uuid.uuid4().hex[:10]}"
    store = PgKeyStore(pg_server.database_url(name), timeout_s=2)
    try:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(StorageError):
                store.verify("hk_0123456789ab_whatever")
        assert time.monotonic() - started < 0.5  # the second one did not try again yet
        with psycopg.connect(pg_server.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        time.sleep(1.1)  # past the store's retry pause
        record, secret = store.create("acme")
        assert store.verify(secret).key == record
    finally:
        store.close()
        pg_server.drop_database(pg_server.database_url(name))

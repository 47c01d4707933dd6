"""The proxy's edge: what a request body may be (`parse_json_body`), read timeouts, headers, the
process (SIGTERM, logging) and readiness, each against a real server where it matters. On both
backends (conftest PROXY_MODULES); the server process reaches its PostgreSQL schema by URL."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import signal
import socket
import socketserver
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import psycopg
import pytest

from headroom.memory.models import MemoryConfig
from headroom.proxy.body import MAX_DEPTH, parse_json_body
from headroom.proxy.config import ProxyConfig
from headroom.proxy.errors import BadRequestError, error_response
from headroom.proxy.readiness import database_unreachable, readiness
from headroom.proxy.server import MAX_HEAD_BYTES
from tests.backend_targets import database_target
from tests.fakes import FakeEmbedder
from tests.servers import (
    FakeUpstream,
    Proxy,
    Reply,
    free_port,
    memory_block,
    running_proxy,
    running_upstream,
    wait_until,
)


def _nested(depth: int) -> bytes:
    """An object whose innermost value sits `depth` containers deep (the object counts as 1)."""
    return b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def _rejected(raw: bytes) -> dict[str, Any]:
    with pytest.raises(BadRequestError) as caught:
        parse_json_body(raw)
    body = json.loads(error_response(caught.value).body)
    assert caught.value.status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    return dict(body["error"])


# --- parse_json_body ---------------------------------------------------------------------------


def test_an_object_is_returned_as_parsed() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo 你好"}], "stream": True}
    assert parse_json_body(orjson.dumps(body)) == body
    assert parse_json_body(b'{"stream": false}') == {"stream": False}
    assert parse_json_body(b'{"stream": null}') == {"stream": None}  # OpenAI's "not set"


@pytest.mark.parametrize("raw", [b'{"model": ', b"\xff\xfe not utf-8", b"", b"NaN",
                                 b'{"a": 1} trailing', b'["a", "list"]', b'"text"', b"42"])
def test_not_a_json_object_is_invalid_json(raw: bytes) -> None:
    assert _rejected(raw)["code"] == "invalid_json"


@pytest.mark.parametrize("stream", ['"true"', '"false"', "1", "0", "[]", "{}", '"yes"'])
def test_a_stream_that_is_not_a_boolean_is_rejected(stream: str) -> None:
    error = _rejected(f'{{"model": "m", "stream": {stream}}}'.encode())
    assert (error["code"], error["param"]) == ("invalid_type", "stream")


def test_nesting_up_to_the_bound_passes_and_beyond_is_rejected() -> None:
    assert parse_json_body(_nested(MAX_DEPTH))["a"] is not None
    assert _rejected(_nested(MAX_DEPTH + 1))["code"] == "json_too_deep"


@pytest.mark.parametrize("depth", [300, 1023, 1025, 100_000])
def test_deep_nesting_never_escapes_as_another_error(depth: int) -> None:
    # 300: parses, but orjson cannot serialise it again; 1025+: past orjson's own limit.
    assert _rejected(_nested(depth))["code"] == "json_too_deep"


def test_deep_nesting_with_a_lone_surrogate_is_still_too_deep() -> None:
    # The stdlib fallback (for surrogates) has its own recursion limit to stay inside.
    raw = b'{"s": "\\ud800", "a":' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert _rejected(raw)["code"] == "json_too_deep"


def test_lone_surrogates_are_replaced_so_the_body_can_be_encoded() -> None:
    raw = b'{"messages": [{"content": "poison \\ud800 tok", "\\udfff": ["\\ud83d"]}]}'
    body = parse_json_body(raw)
    assert body == {"messages": [{"content": "poison \ufffd tok", "\ufffd": ["\ufffd"]}]}
    assert orjson.loads(orjson.dumps(body)) == body
    # A proper pair is one character, untouched.
    assert parse_json_body(b'{"e": "\\ud83d\\ude00"}') == {"e": "\U0001f600"}


# --- the upstream, on real sockets --------------------------------------------------------------


class RawUpstream:
    """A raw HTTP/1.1 upstream that records every request it reads whole (its request line).
    `mode="drop"`: close right after reading one, without a word (the worst moment: a real
    upstream may be generating, and billing, already). `mode="answer_then_close"`: answer with
    keep-alive implied, then close the connection, as a server whose idle timeout ran out.
    `mode="gzip_text"`: answer a gzip-compressed text/plain body (not JSON) though the proxy
    asked for identity. `mode="truncate"`: declare 1000 bytes, send 100, close."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.request_lines: list[str] = []
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> RawUpstream:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[socketserver.BaseRequestHandler]:
        upstream = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                head, _ = _read_request(conn)
                if head is None:
                    return
                upstream.request_lines.append(head.split(b"\r\n", 1)[0].decode())
                if upstream.mode == "drop":
                    conn.close()
                    return
                if upstream.mode == "truncate":
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream"
                                 b"\r\ncontent-length: 1000\r\n\r\n" + b"x" * 100)
                    time.sleep(0.1)
                    conn.close()
                    return
                if upstream.mode == "gzip_text":
                    payload = gzip.compress(_NOT_JSON)
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                                 b"content-encoding: gzip\r\nconnection: close\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(payload), payload))
                    conn.close()
                    return
                payload = orjson.dumps(_COMPLETION)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(payload), payload))
                time.sleep(0.05)
                conn.close()

        return Handler


_COMPLETION = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "Hi!"}}]}


_NOT_JSON = b"upstream maintenance: please retry later " * 20


def _read_request(conn: socket.socket) -> tuple[bytes | None, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return head, body


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
USER = {"x-headroom-user-id": "edge-user"}


@pytest.fixture(scope="module")
def dropping() -> Iterator[RawUpstream]:
    with RawUpstream("drop") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def dropping_proxy(tmp_path_factory: pytest.TempPathFactory,
                   dropping: RawUpstream) -> Iterator[Proxy]:
    db = tmp_path_factory.mktemp("dropping") / "p.db"
    with running_proxy(db, FakeEmbedder(), upstream_url=dropping.url + "/v1") as p:
        yield p


@pytest.mark.parametrize(("method", "path", "body", "headers"), [
    ("POST", "/chat/completions", CHAT, USER),  # through the pipeline
    ("POST", "/chat/completions", {**CHAT, "stream": True}, USER),
    ("POST", "/chat/completions", CHAT, {}),  # no user: forwarded as is
    ("POST", "/embeddings", {"input": "x"}, {}),  # pass-through
    ("GET", "/models", None, {}),
])
def test_a_request_whose_upstream_connection_drops_is_sent_exactly_once(
    dropping: RawUpstream, dropping_proxy: Proxy, method: str, path: str,
    body: dict[str, Any] | None, headers: dict[str, str],
) -> None:
    before = len(dropping.request_lines)
    response = httpx.request(method, dropping_proxy.base_url + path, json=body, headers=headers)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"
    time.sleep(0.2)  # a resend would have arrived by now
    assert len(dropping.request_lines) == before + 1


def test_the_sdk_sees_one_502_and_the_upstream_one_request(
    dropping: RawUpstream, dropping_proxy: Proxy
) -> None:
    before = len(dropping.request_lines)
    with pytest.raises(openai.InternalServerError):
        dropping_proxy.client("edge-sdk").chat.completions.create(**CHAT)
    time.sleep(0.2)
    assert len(dropping.request_lines) == before + 1


def test_a_kept_alive_connection_the_upstream_closed_is_not_reused(tmp_path: Path) -> None:
    """Each answer is followed by the upstream closing the connection: httpcore sees it closed
    before the next request and opens a new one; every request gets its answer, sent once."""
    with RawUpstream("answer_then_close") as upstream, running_proxy(
        tmp_path / "p.db", FakeEmbedder(), upstream_url=upstream.url + "/v1"
    ) as p:
        client = p.client("edge-keep")
        for _ in range(3):
            assert client.chat.completions.create(**CHAT).choices[0].message.content == "Hi!"
            time.sleep(0.2)  # the upstream has closed the kept-alive connection by now
        assert httpx.get(f"{p.base_url}/models").status_code == 200
        # As above: within the upstream's 50 ms before it closes, the connection is still open
        # and reusable, and the request sent on it is dropped unread (a 502, never resent).
        time.sleep(0.2)
        assert httpx.get(f"{p.base_url}/models?limit=2").status_code == 200
    assert upstream.request_lines == ["POST /v1/chat/completions HTTP/1.1"] * 3 + [
        "GET /v1/models HTTP/1.1", "GET /v1/models?limit=2 HTTP/1.1"]  # no stray "?"


def test_a_pass_through_body_the_upstream_cuts_short_is_cut_short_for_the_client_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The client must see the transfer break (not a short body that looks complete), and the
    proxy logs one warning, not a traceback."""
    with RawUpstream("truncate") as upstream, running_proxy(
        tmp_path / "p.db", FakeEmbedder(), upstream_url=upstream.url + "/v1"
    ) as p:
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"{p.base_url}/files/file-1/content")
        time.sleep(0.2)
    broke_off = [r for r in caplog.records if "broke off its answer" in r.getMessage()]
    assert len(broke_off) == 1 and broke_off[0].levelname == "WARNING"
    assert not [r for r in caplog.records if r.exc_info]


# --- compressed answers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    with running_proxy(tmp_path_factory.mktemp("edge") / "p.db", FakeEmbedder()) as p:
        yield p


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_compressed_chat_answer_reaches_the_client_decodable(
    proxy: Proxy, encoding: str, stream: bool
) -> None:
    """The proxy asks for identity, but an upstream may compress anyway: the client gets the
    decoded answer without a Content-Encoding claiming otherwise, and the block is stored."""
    user = f"edge-{encoding}-{stream}"
    proxy.upstream.queue(Reply("Noted. " + memory_block([f"{user} likes tea"]),
                               content_encoding=encoding, chunk_seed=4))
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions",
                      json={**CHAT, "stream": stream}, headers={"x-headroom-user-id": user}) as r:
        raw = b"".join(r.iter_raw())
        assert r.status_code == 200
        assert "content-encoding" not in r.headers
    if stream:
        events = [json.loads(line.removeprefix(b"data: ")) for line in raw.split(b"\n\n")
                  if line.startswith(b"data: {")]
        text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    else:
        text = json.loads(raw)["choices"][0]["message"]["content"]
    assert text == "Noted."
    assert [m.content for m in proxy.memories(user)] == [f"{user} likes tea"]

    # The SDK, which sends Accept-Encoding: gzip itself, reads the same.
    proxy.upstream.queue(Reply("Again.", content_encoding=encoding))
    answer = proxy.client(user).chat.completions.create(**CHAT, stream=stream)
    got = ("".join(c.choices[0].delta.content or "" for c in answer if c.choices)
           if stream else answer.choices[0].message.content)
    assert got == "Again."


def test_a_compressed_answer_that_is_not_json_is_relayed_decoded(tmp_path: Path) -> None:
    with RawUpstream("gzip_text") as upstream, running_proxy(
        tmp_path / "p.db", FakeEmbedder(), upstream_url=upstream.url + "/v1"
    ) as p:
        response = httpx.post(f"{p.base_url}/chat/completions", json=CHAT, headers=USER)
    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    assert int(response.headers["content-length"]) == len(_NOT_JSON)
    assert response.content == _NOT_JSON


def test_a_compressed_pass_through_answer_keeps_its_encoding_and_length(proxy: Proxy) -> None:
    with httpx.stream("GET", f"{proxy.base_url}/gzipped",
                      headers={"accept-encoding": "gzip"}) as response:
        raw = b"".join(response.iter_raw())
        assert response.headers["content-encoding"] == "gzip"
        assert int(response.headers["content-length"]) == len(raw)
    assert gzip.decompress(raw) == b'{"compressed": true}' * 50


# --- one Date header -----------------------------------------------------------------------------


def test_every_response_has_exactly_one_date_header(proxy: Proxy) -> None:
    proxy.upstream.queue(Reply("Hi"), Reply("Hi"), Reply(status=429))
    responses = [
        httpx.post(f"{proxy.base_url}/chat/completions", json=CHAT, headers=USER),
        httpx.post(f"{proxy.base_url}/chat/completions", json={**CHAT, "stream": True},
                   headers=USER),
        httpx.post(f"{proxy.base_url}/chat/completions", json=CHAT, headers=USER),  # 429
        httpx.post(f"{proxy.base_url}/chat/completions", json=CHAT),  # forwarded as is
        httpx.get(f"{proxy.base_url}/models"),
        httpx.get(f"{proxy.base_url}/files"),
        httpx.get(f"{proxy.url}/healthz"),
        httpx.post(f"{proxy.base_url}/chat/completions", content=b"{",
                   headers={**USER, "content-type": "application/json"}),  # 400
    ]
    assert [r.status_code for r in responses] == [200, 200, 429, 200, 200, 200, 200, 400]
    for response in responses:
        assert len(response.headers.get_list("date")) == 1, response.request.url


# --- a real server process: read timeouts, logs, SIGTERM ------------------------------------------

_SERVE = """
import json, sys
from headroom.proxy.config import ProxyConfig
from headroom.proxy.server import serve
serve(ProxyConfig(**json.loads(sys.argv[1])))
"""

_LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"(?P<name>[\w.]+): \S"
)


@dataclass
class Served:
    """`headroom.proxy.server.serve` in its own process (the real model, the real logging
    setup), in front of a FakeUpstream in this one."""

    process: subprocess.Popen[bytes]
    port: int
    upstream: FakeUpstream
    db_path: Path | str  # a SQLite file, or a PostgreSQL schema's URL
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def raw(self, data: bytes) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if data:
            conn.sendall(data)
        return conn


def _ready(served: Served) -> bool:
    if served.process.poll() is not None:
        raise AssertionError(f"server exited {served.process.returncode}:\n{served.stderr()}")
    try:
        return httpx.get(f"{served.url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest,
           proxy_backend: str) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("served")
    db = database_target(request, proxy_backend, tmp)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    for quieted_by_the_server in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(quieted_by_the_server, None)
    with running_upstream() as (upstream_root, fake), (tmp / "stderr.txt").open("wb") as err:
        port = free_port()
        config = {"port": port, "db_path": str(db), "upstream_url": upstream_root,
                  "header_read_timeout_s": 1.0, "body_read_timeout_s": 1.0,
                  "drain_timeout_s": 20.0}
        process = subprocess.Popen([sys.executable, "-c", _SERVE, json.dumps(config)],
                                   stdout=subprocess.DEVNULL, stderr=err, env=env)
        served = Served(process, port, fake, db, tmp / "stderr.txt")
        try:
            wait_until(lambda: _ready(served), 180, "the server to be ready")
            yield served
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(30)


def _read_until_closed(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def test_a_request_line_that_stalls_gets_a_408_and_the_connection_closes(served: Served) -> None:
    started = time.monotonic()
    with served.raw(b"POST /v1/chat/comp") as conn:
        answer = _read_until_closed(conn)
    assert 0.9 < time.monotonic() - started < 5
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body)["error"]["code"] == "request_timeout"
    # Headers begun but never finished: the same.
    with served.raw(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-slow: ") as conn:
        assert _read_until_closed(conn).startswith(b"HTTP/1.1 408 ")
    # A connection that never says anything is closed without a word.
    started = time.monotonic()
    with served.raw(b"") as conn:
        assert _read_until_closed(conn) == b""
    assert time.monotonic() - started < 5


def _answer_to(served: Served, pieces: list[bytes]) -> tuple[bytes, dict[str, Any]]:
    """Send a request in `pieces` (a pause between them lets TCP deliver each on its own) and
    read the whole answer: its status line and its JSON body."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as conn:
        for piece in pieces:
            try:
                conn.sendall(piece)
            except OSError:  # the server answered and closed while the rest was on its way
                break
            time.sleep(0.002)
        answer = _read_until_closed(conn)
    head, body = answer.split(b"\r\n\r\n", 1)
    return head.split(b"\r\n", 1)[0], json.loads(body)


@pytest.mark.parametrize("split", ["one read", "many reads"])
def test_headers_too_large_get_a_431_in_the_openai_shape_however_they_arrive(
    served: Served, split: str
) -> None:
    """h11 alone refuses a large head only while it is incomplete, so the answer used to depend
    on how TCP split the bytes: a 200, or a plain-text 400, or a reset."""
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
               b"\r\nx-big: " + b"a" * (MAX_HEAD_BYTES + 1000) + b"\r\ncontent-length: 2\r\n\r\n{}")
    pieces = [request] if split == "one read" else [
        request[i : i + 8192] for i in range(0, len(request), 8192)
    ]
    status, body = _answer_to(served, pieces)
    assert status.startswith(b"HTTP/1.1 431 ")
    assert body["error"]["code"] == "headers_too_large"
    assert set(body["error"]) >= {"message", "type", "code"}


def test_headers_under_the_limit_pass_however_they_arrive(served: Served) -> None:
    """40 KiB of headers in 4 KiB reads: above h11's own 16 KiB default for an incomplete head,
    under ours, so the request reaches the proxy (here: a 404 from the router, in JSON)."""
    request = (b"GET /v1/no-such-thing-here HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
               b"x-big: " + b"a" * 40_000 + b"\r\n\r\n")
    status, _ = _answer_to(served, [request[i : i + 4096]
                                       for i in range(0, len(request), 4096)])
    assert not status.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ")), status


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n",
])
def test_a_request_h11_cannot_parse_gets_a_400_in_the_openai_shape(
    served: Served, raw: bytes
) -> None:
    status, body = _answer_to(served, [raw])
    assert status.startswith(b"HTTP/1.1 400 ")
    assert body["error"]["code"] == "invalid_http_request"
    assert body["error"]["type"] == "invalid_request_error"


def test_a_kept_alive_connection_is_not_cut_by_the_header_timeout(served: Served) -> None:
    """The timer restarts per request: requests spread over longer than the header timeout
    on one connection all go through."""
    with httpx.Client(base_url=served.url) as client:
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
            time.sleep(0.6)


def test_a_body_that_stalls_gets_a_408_in_the_openai_shape(served: Served) -> None:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
            b"\r\nx-headroom-user-id: stall\r\ncontent-length: 200\r\n\r\n")
    for path_head in (head, head.replace(b"/chat/completions", b"/embeddings")):
        started = time.monotonic()
        with served.raw(path_head + b'{"model": "m", "mess') as conn:
            answer = _read_until_closed(conn)
        assert 0.9 < time.monotonic() - started < 5
        head_bytes, body = answer.split(b"\r\n\r\n", 1)
        assert head_bytes.startswith(b"HTTP/1.1 408 ")
        assert b"connection: close" in head_bytes.lower()
        error = json.loads(body)["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")


def test_one_date_header_from_the_real_server(served: Served) -> None:
    served.upstream.queue(Reply("Hi"))
    chat = httpx.post(f"{served.url}/v1/chat/completions", json=CHAT, headers=USER)
    models = httpx.get(f"{served.url}/v1/models")
    for response in (chat, models, httpx.get(f"{served.url}/healthz")):
        assert response.status_code == 200
        assert len(response.headers.get_list("date")) == 1
        assert len(response.headers.get_list("server")) <= 1  # the upstream's, relayed


def test_client_disconnects_are_one_info_line_each(served: Served) -> None:
    before = served.stderr()
    # Gone mid-body.
    with served.raw(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                    b"content-type: application/json\r\nx-headroom-user-id: gone\r\n"
                    b"content-length: 100\r\n\r\n{\"mo"):
        time.sleep(0.2)
    # Gone mid-stream.
    served.upstream.queue(Reply("A long answer that keeps coming. " * 10, event_delay_s=0.02))
    with httpx.stream("POST", f"{served.url}/v1/chat/completions",
                      json={**CHAT, "stream": True}, headers=USER) as response:
        next(response.iter_raw())
    wait_until(lambda: "client left" in served.stderr()[len(before):], 10,
                "the stream's disconnect to be logged")
    time.sleep(0.3)
    new = served.stderr()[len(before):].splitlines()
    assert [line for line in new if "the client disconnected" in line and " INFO " in line]
    assert len([line for line in new if "disconnected" in line or "client left" in line]) == 2
    assert not [line for line in new if " ERROR " in line or "Traceback" in line]


def test_server_logs_have_one_format_and_no_noise(served: Served) -> None:
    served.upstream.queue(Reply("Hi"))
    assert httpx.post(f"{served.url}/v1/chat/completions", json=CHAT,
                      headers=USER).status_code == 200
    time.sleep(0.3)
    lines = served.stderr().splitlines()
    assert any("embedding model ready" in line for line in lines)  # the model was loaded
    assert any("uvicorn.access" in line for line in lines)  # uvicorn's through the same format
    names = set()
    for line in lines:
        match = _LOG_LINE.match(line)
        assert match, f"not in the one format: {line!r}"
        names.add(match["name"])
    assert {n.split(".")[0] for n in names} <= {"headroom", "uvicorn"}, names
    assert not any("HTTP Request:" in line for line in lines)  # httpx's per-request line
    assert not any("it/s" in line or "%|" in line for line in lines)  # progress bars


def test_sigterm_drains_in_flight_work_and_exits_0(served: Served) -> None:
    """The last test of the module's server: it stops it. A stream in flight at SIGTERM
    finishes, its memory block is stored before the process ends, and the exit code is 0."""
    served.upstream.queue(Reply("Let me think. " * 10 + memory_block(["Stopped gracefully"]),
                               event_delay_s=0.03))
    received: list[bytes] = []

    def stream() -> None:
        with httpx.stream("POST", f"{served.url}/v1/chat/completions",
                          json={**CHAT, "stream": True},
                          headers={"x-headroom-user-id": "sigterm-user"}, timeout=30) as r:
            received.extend(r.iter_raw())

    client = threading.Thread(target=stream)
    client.start()
    wait_until(lambda: bool(received), 10, "the stream to begin")
    served.process.send_signal(signal.SIGTERM)
    client.join(30)
    assert served.process.wait(60) == 0, served.stderr()
    assert b"".join(received).rstrip().endswith(b"data: [DONE]")
    log = served.stderr()
    assert "shutdown complete" in log and "Traceback" not in log
    assert _contents(served.db_path, "sigterm-user") == ["Stopped gracefully"]


def _contents(db: Path | str, user: str) -> list[str]:
    """A user's memory texts, read from the database past any server."""
    if isinstance(db, str):
        with psycopg.connect(db) as conn:
            rows = conn.execute("SELECT content FROM memories WHERE user_id = %s",
                                (user,)).fetchall()
    else:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            rows = conn.execute("SELECT content FROM memories WHERE user_id = ?",
                                (user,)).fetchall()
    return [row[0] for row in rows]


# --- readiness ------------------------------------------------------------------------------------


def _readyz(p: Proxy) -> httpx.Response:
    return httpx.get(f"{p.url}/readyz")


def test_readiness_is_ok_then_degraded_while_the_embedder_fails_then_ok_again(
    tmp_path: Path,
) -> None:
    embedder = FakeEmbedder()
    with running_proxy(tmp_path / "p.db", embedder) as p:
        ready = _readyz(p)
        assert ready.status_code == 200
        assert (ready.json()["status"], ready.json()["reasons"]) == ("ok", [])
        assert ready.json()["health"]["outbox_pending"] == 0

        embedder.fail_with = RuntimeError("embedding service down")
        p.upstream.queue(Reply("Noted. " + memory_block(["Keeps bees"])))
        answer = p.client("ready-user").chat.completions.create(**CHAT)
        assert answer.choices[0].message.content == "Noted."  # proxying goes on
        wait_until(lambda: _readyz(p).json()["status"] == "degraded", 15, "degraded")
        ready = _readyz(p)
        assert ready.status_code == 200
        assert any("embedder failing" in r for r in ready.json()["reasons"])
        assert ready.json()["health"]["outbox_pending"] == 1

        embedder.fail_with = None
        wait_until(lambda: _readyz(p).json()["status"] == "ok", 30, "ok again")
        assert [m.content for m in p.memories("ready-user")] == ["Keeps bees"]


def test_a_model_that_fails_to_load_is_degraded_not_unready(tmp_path: Path) -> None:
    embedder = FakeEmbedder()
    embedder.fail_with = RuntimeError("no such model")
    with running_proxy(tmp_path / "p.db", embedder, warm=True) as p:
        wait_until(lambda: p.service.model_error is not None, 15, "the warm-up to fail")
        ready = _readyz(p)
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert any("failed to load" in r and "no such model" in r
                   for r in ready.json()["reasons"])
        p.upstream.queue(Reply("Hi!"))
        assert p.client("ready-noload").chat.completions.create(
            **CHAT).choices[0].message.content == "Hi!"


@dataclass
class _UnreadableOutboxEngine:
    """An engine whose outbox could not be read, as HierarchicalMemory reports it."""

    reason: str = "outbox unreadable within 2s"

    async def health(self) -> dict[str, Any]:
        return {"status": "degraded", "reasons": [self.reason]}


@dataclass
class _Service:
    """What readiness() reads of a MemoryService."""

    config: MemoryConfig
    engine: Any = field(default_factory=_UnreadableOutboxEngine)
    open_error: str | None = None
    model_error: str | None = None
    ready: bool = True

    def status(self) -> dict[str, Any]:
        return {"database": "ok"}


async def test_an_unreadable_outbox_says_whether_the_database_is_unreachable(
    tmp_path: Path, request: pytest.FixtureRequest, proxy_backend: str
) -> None:
    """The same timeout, two causes: a database that does not answer, or one that is busy."""
    gone: Path | str = tmp_path / "never-created.db"
    if proxy_backend == "postgres":
        gone = f"postgresql://headroom:s3cret@/headroom?host={tmp_path / 'no-server'}"
    status, body = await readiness(_Service(MemoryConfig(db_path=gone)))  # type: ignore[arg-type]
    assert (status, body["status"]) == (200, "degraded")
    [reason] = body["reasons"]
    assert reason.startswith("database unreachable (") and "outbox unreadable within 2s" in reason
    assert "s3cret" not in reason
    failed = _UnreadableOutboxEngine("outbox unreadable: StorageError: unavailable (closed)")
    _, body = await readiness(_Service(MemoryConfig(db_path=gone), failed))  # type: ignore[arg-type]
    assert body["reasons"][0].startswith("database unreachable (")

    there = database_target(request, proxy_backend, tmp_path, "there.db")
    if isinstance(there, Path):
        sqlite3.connect(there).close()
    status, body = await readiness(_Service(MemoryConfig(db_path=there)))  # type: ignore[arg-type]
    [reason] = body["reasons"]
    assert reason.startswith("outbox unreadable within 2s") and "busy or locked" in reason
    assert database_unreachable(there) is None


# --- configuration ------------------------------------------------------------------------------


def test_the_proxy_config_builds_the_engines_memory_config(tmp_path: Path) -> None:
    config = ProxyConfig(db_path=tmp_path / "m.db", embedder_model="some-model",
                         torch_threads=3, embedder_runtime="torch")
    memory = config.memory_config()
    assert isinstance(memory, MemoryConfig)
    assert (memory.db_path, memory.embedder_model, memory.torch_threads,
            memory.embedder_runtime) == (tmp_path / "m.db", "some-model", 3, "torch")

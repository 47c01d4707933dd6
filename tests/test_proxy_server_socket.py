"""The server's client connections send without Nagle's delay, however their listener was made.

`serve --workers N` binds the port in the parent (uvicorn's `bind_socket`: protocol 0 before
uvicorn 0.55) and every worker accepts from it; asyncio turns TCP_NODELAY on only for sockets
it made with `IPPROTO_TCP`, so those connections kept Nagle on and each response's body waited
for the client's delayed ACK after its headers (~40 ms at concurrency 1, measured with
bench/proxy_overhead.py --workers 2).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from uvicorn.server import ServerState

from headroom.proxy.config import ProxyConfig
from headroom.proxy.server import build_server, header_timeout_protocol
from tests.servers import free_port, wait_until


async def _app(scope: dict[str, object], receive: object, send: object) -> None:
    raise AssertionError("no request is sent in these tests")


def _nodelay_of_accepted(listener: socket.socket) -> int:
    """Accept one connection from `listener` into the proxy's protocol; its TCP_NODELAY."""
    config = uvicorn.Config(_app, log_config=None, lifespan="off")
    config.load()
    protocol_class = header_timeout_protocol(5.0)

    async def accept() -> int:
        loop = asyncio.get_running_loop()
        client = socket.create_connection(listener.getsockname())
        accepted, _ = await loop.sock_accept(listener)
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol_class(config=config, server_state=ServerState(), app_state={},
                                   _loop=loop),
            accepted,
        )
        try:
            return int(transport.get_extra_info("socket").getsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY))
        finally:
            transport.close()
            client.close()

    return asyncio.run(accept())


def test_a_connection_accepted_from_the_workers_listener_has_nagle_off() -> None:
    # uvicorn's own listener: protocol 0 up to 0.54, IPPROTO_TCP from 0.55 (both allowed).
    listener = uvicorn.Config(_app, host="127.0.0.1", port=0, log_config=None).bind_socket()
    listener.listen()
    listener.setblocking(False)
    try:
        assert _nodelay_of_accepted(listener) == 1
    finally:
        listener.close()


def test_a_connection_accepted_from_a_protocol_0_listener_has_nagle_off() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # as uvicorn < 0.55 binds
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    try:
        assert listener.proto == 0  # the case asyncio leaves alone
        assert _nodelay_of_accepted(listener) == 1
    finally:
        listener.close()


def test_a_connection_accepted_from_a_tcp_listener_keeps_nagle_off() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    try:
        assert _nodelay_of_accepted(listener) == 1
    finally:
        listener.close()


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _request(conn: socket.socket) -> bytes:
    conn.sendall(b"GET /ok HTTP/1.1\r\nHost: proxy\r\n\r\n")
    answer = b""
    while not answer.endswith(b"ok"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer


def test_idle_client_connections_stay_open_longer_than_the_sdks_keep_them(
    tmp_path: Path,
) -> None:
    """The OpenAI and Anthropic SDKs (httpx) reuse an idle connection for 5 s; a server that
    closes it at that same moment races a request sent on it (a ReadError for the client)."""
    assert ProxyConfig().keep_alive_timeout_s > httpx.Limits().keepalive_expiry  # type: ignore[operator]
    assert build_server(ProxyConfig(db_path=tmp_path / "m.db")).config.timeout_keep_alive >= 60
    # The setting is what the server closes an idle connection at (1 s: a short test).
    port = free_port()
    server = build_server(ProxyConfig(port=port, db_path=tmp_path / "m.db",
                                      keep_alive_timeout_s=1.0))
    server.config.app, server.config.lifespan = _ok, "off"  # the server's settings, not the app
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 10, "the server to start")
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.settimeout(10)
            assert _request(conn).startswith(b"HTTP/1.1 200")
            time.sleep(0.4)
            assert _request(conn).startswith(b"HTTP/1.1 200")  # idle 0.4 s: still open
            time.sleep(1.6)
            assert conn.recv(4096) == b""  # idle past 1 s: closed by the server
    finally:
        server.should_exit = True
        thread.join(10)

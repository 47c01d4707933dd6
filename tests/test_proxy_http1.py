"""proxy.http1 against real local servers: a scripted HTTP/1.1 server on its own thread and event
loop (module-scoped), whose path picks the behaviour and which counts requests and connections."""

from __future__ import annotations

import asyncio
import collections
import datetime
import ipaddress
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from headroom.proxy.config import ProxyConfig
from headroom.proxy.errors import UpstreamUnreachableError
from headroom.proxy.http1 import Http1Transport
from headroom.proxy.upstream import Upstream, network_transport

BIG_PIECE = 1024 * 1024
BIG_PIECES = 16


class ScriptedServer:
    """Answers by path; `requests[path]` counts the requests that reached it, `connections`
    the connections accepted."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.requests: collections.Counter[str] = collections.Counter()
        self.connections = 0
        self.open_writers: set[asyncio.StreamWriter] = set()
        self.server_names: list[str | None] = []
        self.big_released = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.port = 0
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        if self.tls is not None:
            self.tls.sni_callback = self._sni
        server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        )
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()
        server.close()
        for writer in self.open_writers:
            writer.transport.abort()
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(asyncio.sleep(0))  # the aborts' connection_lost callbacks
        self.loop.close()

    def _sni(self, _sock: object, name: str | None, _ctx: object) -> None:
        self.server_names.append(name)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if line)
                }
                body = await _read_request_body(reader, headers)
                path = target.split("?")[0]
                self.requests[path] += 1
                if not await self._answer(method, path, headers, body, writer):
                    return
        finally:
            self.open_writers.discard(writer)
            writer.transport.abort()

    async def _answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Writes the answer; False closes the connection."""
        if path.startswith("/cl/"):
            size = int(path.removeprefix("/cl/"))
            payload = b"" if method == "HEAD" else bytes(i % 251 for i in range(size))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (size, payload))
        elif path == "/echo":
            length = headers.get("content-length", "")
            framing = headers.get("transfer-encoding", f"length:{length}")
            writer.write(b"HTTP/1.1 200 OK\r\nx-framing: %b\r\ncontent-length: %d\r\n\r\n%b"
                         % (framing.encode(), len(body), body))
        elif path == "/chunked":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                         b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-trailer: 1\r\n\r\n")
        elif path == "/to-close":
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
            await writer.drain()
            return False
        elif path == "/conn-close":
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
        elif path == "/idle-close":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            await asyncio.sleep(0.02)  # kept alive by the header, then closed while idle
            return False
        elif path == "/die":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nonly a bit")
            await writer.drain()
            return False
        elif path == "/die-chunked":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10\r\nabc")
            await writer.drain()
            return False
        elif path == "/no-answer":
            return False
        elif path == "/slow":
            await asyncio.sleep(1.0)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        elif path == "/204":
            writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n")
        elif path == "/interim":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n"
                         b"\r\nHTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone")
        elif path == "/big":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(BIG_PIECES):
                if i == 1:  # the rest only once the client has the first piece
                    await asyncio.to_thread(self.big_released.wait, 10)
                writer.write(b"%x\r\n%b\r\n" % (BIG_PIECE, b"x" * BIG_PIECE))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        elif path == "/no-read":
            await asyncio.sleep(2.0)  # never reads the body it is sent
            return False
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        return True


async def _read_request_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while size := int((await reader.readline()).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readline()
        return b"".join(parts)
    length = int(headers.get("content-length", "0") or 0)
    if length > 1024 * 1024:
        return b""  # the /no-read case: left unread on purpose
    return await reader.readexactly(length)


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedServer]:
    srv = ScriptedServer()
    yield srv
    srv.stop()


@pytest.fixture
def transport() -> Http1Transport:
    return Http1Transport(max_connections=4, max_keepalive_connections=4)


def _url(server: ScriptedServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def _timeout(**kwargs: float) -> dict[str, dict[str, float | None]]:
    return {"timeout": httpx.Timeout(5.0, **kwargs).as_dict()}


async def _get(
    transport: Http1Transport, url: str, method: str = "GET", **timeouts: float
) -> httpx.Response:
    request = httpx.Request(method, url, extensions=_timeout(**timeouts))
    response = await transport.handle_async_request(request)
    await response.aread()
    return response


async def test_keep_alive_reuses_one_connection(
    server: ScriptedServer, transport: Http1Transport
) -> None:
    before = server.connections
    for size in (0, 10, 70_000):
        response = await _get(transport, _url(server, f"/cl/{size}"))
        assert response.status_code == 200
        assert response.content == bytes(i % 251 for i in range(size))
    assert server.connections == before + 1
    await transport.aclose()


async def test_chunked_body_with_extensions_and_trailers(
    server: ScriptedServer, transport: Http1Transport
) -> None:
    before = server.connections
    for _ in range(2):
        response = await _get(transport, _url(server, "/chunked"))
        assert response.content == b"hello world"
    assert server.connections == before + 1  # the trailers were consumed: reusable
    await transport.aclose()


async def test_read_to_close_and_connection_close_are_not_reused(
    server: ScriptedServer, transport: Http1Transport
) -> None:
    before = server.connections
    assert (await _get(transport, _url(server, "/to-close"))).content == b"until the end"
    assert (await _get(transport, _url(server, "/conn-close"))).content == b"ok"
    assert (await _get(transport, _url(server, "/cl/3"))).content == bytes(range(3))
    assert server.connections == before + 3
    await transport.aclose()


async def test_idle_connection_closed_by_server_is_not_reused_and_nothing_is_resent(
    server: ScriptedServer, transport: Http1Transport
) -> None:
    assert (await _get(transport, _url(server, "/idle-close"))).content == b"ok"
    await asyncio.sleep(0.1)  # the server has closed the pooled connection by now
    before = server.requests["/cl/5"]
    response = await _get(transport, _url(server, "/cl/5"))
    assert response.content == bytes(range(5))
    assert server.requests["/cl/5"] == before + 1
    await transport.aclose()


async def test_server_dying_mid_body_is_an_error_not_a_hang(
    server: ScriptedServer, transport: Http1Transport
) -> None:
    for path in ("/die", "/die-chunked"):
        with pytest.raises(httpx.RemoteProtocolError):
            await asyncio.wait_for(_get(transport, _url(server, path)), 5)
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        await _get(transport, _url(server, "/no-answer"))
    # The broken connections were dropped, not pooled: the next request works.
    assert (await _get(transport, _url(server, "/cl/1"))).content == b"\x00"
    await transport.aclose()


async def test_head_204_and_interim_answers_have_the_right_bodies(
    server: ScriptedServer, transport: Http1Transport
) -> None:
    before = server.connections
    head = await _get(transport, _url(server, "/cl/50"), method="HEAD")
    assert head.headers["content-length"] == "50" and head.content == b""
    assert (await _get(transport, _url(server, "/204"))).content == b""
    interim = await _get(transport, _url(server, "/interim"))
    assert (interim.status_code, interim.content) == (201, b"done")
    assert server.connections == before + 1  # nothing was misread as the next answer
    await transport.aclose()


async def test_read_timeout(server: ScriptedServer, transport: Http1Transport) -> None:
    with pytest.raises(httpx.ReadTimeout):
        await _get(transport, _url(server, "/slow"), read=0.1)
    await transport.aclose()


async def test_write_timeout_when_the_server_does_not_read(
    server: ScriptedServer, transport: Http1Transport
) -> None:
    request = httpx.Request("POST", _url(server, "/no-read"), content=b"x" * (64 * 1024 * 1024),
                            extensions=_timeout(write=0.2))
    with pytest.raises(httpx.WriteTimeout):
        await transport.handle_async_request(request)
    await transport.aclose()


async def test_pool_timeout_when_every_connection_is_busy(server: ScriptedServer) -> None:
    transport = Http1Transport(max_connections=1)
    busy = await transport.handle_async_request(
        httpx.Request("GET", _url(server, "/cl/100000"), extensions=_timeout())
    )
    with pytest.raises(httpx.PoolTimeout):
        await _get(transport, _url(server, "/cl/1"), pool=0.1)
    waiting = asyncio.create_task(_get(transport, _url(server, "/cl/2")))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await busy.aread()  # the connection comes back and goes straight to the waiter
    assert (await waiting).content == bytes(range(2))
    await transport.aclose()


async def test_connect_error_on_a_closed_port(transport: Http1Transport) -> None:
    with pytest.raises(httpx.ConnectError):
        await _get(transport, "http://127.0.0.1:1/")


async def test_close_before_the_end_drops_the_connection(
    server: ScriptedServer, transport: Http1Transport
) -> None:
    before = server.connections
    response = await transport.handle_async_request(
        httpx.Request("GET", _url(server, "/cl/1000000"), extensions=_timeout())
    )
    async for _ in response.aiter_raw():
        break
    await response.aclose()
    assert (await _get(transport, _url(server, "/cl/4"))).content == bytes(range(4))
    assert server.connections == before + 2  # the half-read one was not reused
    await transport.aclose()


async def test_cancelled_read_drops_the_connection(
    server: ScriptedServer, transport: Http1Transport
) -> None:
    before = server.connections
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(_get(transport, _url(server, "/slow")), 0.1)
    assert (await _get(transport, _url(server, "/cl/4"))).content == bytes(range(4))
    assert server.connections == before + 2
    await transport.aclose()


async def test_large_body_is_streamed_not_buffered(
    server: ScriptedServer, transport: Http1Transport
) -> None:
    server.big_released.clear()
    response = await transport.handle_async_request(
        httpx.Request("GET", _url(server, "/big"), extensions=_timeout())
    )
    total, largest = 0, 0
    async for piece in response.aiter_raw():
        if total == 0:
            server.big_released.set()  # the server sends the rest only now
        total += len(piece)
        largest = max(largest, len(piece))
    assert total == BIG_PIECE * BIG_PIECES
    assert largest <= 64 * 1024
    await transport.aclose()


async def test_request_bodies_bytes_and_streamed(
    server: ScriptedServer, transport: Http1Transport
) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"one ", b"", b"two"):
            yield piece

    sent = await _get_with(transport, _url(server, "/echo"), b"plain bytes")
    assert (sent.headers["x-framing"], sent.content) == ("length:11", b"plain bytes")
    streamed = await _get_with(transport, _url(server, "/echo"), pieces())
    assert (streamed.headers["x-framing"], streamed.content) == ("chunked", b"one two")
    await transport.aclose()


async def _get_with(
    transport: Http1Transport, url: str, content: bytes | AsyncIterator[bytes]
) -> httpx.Response:
    request = httpx.Request("POST", url, content=content, extensions=_timeout())
    response = await transport.handle_async_request(request)
    await response.aread()
    return response


def test_upstream_picks_http1_by_default_and_httpx_on_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HEADROOM_UPSTREAM_TRANSPORT", raising=False)
    assert isinstance(network_transport(ProxyConfig()), Http1Transport)
    httpx_config = ProxyConfig(upstream_transport="httpx")
    assert isinstance(network_transport(httpx_config), httpx.AsyncHTTPTransport)
    monkeypatch.setenv("HEADROOM_UPSTREAM_TRANSPORT", "httpx")
    assert isinstance(network_transport(ProxyConfig()), httpx.AsyncHTTPTransport)


async def test_upstream_never_resends_after_a_connection_broke_mid_answer(
    server: ScriptedServer,
) -> None:
    config = ProxyConfig(upstream_url=f"http://127.0.0.1:{server.port}", upstream_transport="http1")
    upstream = Upstream(config)
    before = server.requests["/no-answer"]
    with pytest.raises(UpstreamUnreachableError):
        await upstream.send("POST", "/no-answer", query=b"", headers={}, content=b"{}")
    assert server.requests["/no-answer"] == before + 1
    await upstream.aclose()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509", reason="TLS test needs `cryptography`")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        ), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return cert_path, key_path


async def test_https_verifies_the_certificate_and_sends_sni(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    tls_server = ScriptedServer(tls=server_tls)
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        transport = Http1Transport(ssl_context=trusting)
        url = f"https://localhost:{tls_server.port}/cl/20"
        for _ in range(2):
            assert (await _get(transport, url)).content == bytes(range(20))
        assert tls_server.connections == 1
        assert tls_server.server_names == ["localhost"]
        await transport.aclose()
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await _get(Http1Transport(), url)  # not signed by a root we trust
    finally:
        tls_server.stop()



"""A lean HTTP/1.1 client transport for the upstream: asyncio streams, a keep-alive pool per
(scheme, host, port), the request written in one `write`, the response parsed in plain Python.

httpx's own transport (httpcore + h11, an anyio cancel scope around every read and write) cost
about 2 ms of CPU per pass-through, two thirds of the proxy's work; this does the same job for
the one case the proxy needs (HTTP/1.1, no proxy) and keeps httpx's types, so `httpx.Response`,
its streaming readers and httpx's exceptions work unchanged for every caller.

Never a second paid request: a pooled connection is checked before reuse (closed by the server
while idle, or holding bytes nobody asked for, it is dropped), and once a byte of a request has
left, every failure is a `ReadError`/`WriteError`/`RemoteProtocolError`, never a `ConnectError`
(the one error the caller resends after).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator

import httpx

__all__ = ["Http1Transport"]

_READ_SIZE = 64 * 1024
# The stream buffer's soft limit: the longest status line + headers we accept, and how much of a
# body is read ahead before the socket is paused (asyncio pauses at twice the limit).
_BUFFER_LIMIT = 256 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NO_BODY_STATUSES = frozenset({204, 304})


def _timeouts(request: httpx.Request) -> dict[str, float | None]:
    return request.extensions.get("timeout", {})


@contextlib.contextmanager
def _mapped(request: httpx.Request, timeout_error: type[httpx.TimeoutException],
            network_error: type[httpx.TransportError]) -> Iterator[None]:
    """asyncio's and the socket's errors as httpx's (the caller's error mapping expects them)."""
    try:
        yield
    except TimeoutError as exc:
        raise timeout_error(str(exc) or "timed out", request=request) from exc
    except asyncio.IncompleteReadError as exc:
        raise httpx.RemoteProtocolError(
            "the server closed the connection before the response was complete",
            request=request,
        ) from exc
    except asyncio.LimitOverrunError as exc:
        raise httpx.RemoteProtocolError("response headers too long", request=request) from exc
    except (OSError, ssl.SSLError) as exc:  # ConnectionResetError, BrokenPipeError, ...
        raise network_error(str(exc) or type(exc).__name__, request=request) from exc


def _deadline(seconds: float | None) -> asyncio.Timeout:
    return asyncio.timeout(None if seconds is None else seconds)


class _Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def usable(self, now: float, expiry: float) -> bool:
        """False if the server closed it while idle, sent bytes nobody asked for, or it idled
        past the expiry. A readable socket is one of the first two that the event loop has not
        noticed yet: either way the next request must not go out on it."""
        if self.reader.at_eof() or self.writer.is_closing() or self.reader._buffer:
            return False
        if now - self.idle_since > expiry:
            return False
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def close(self) -> None:
        # abort, not close: a close waits for unsent bytes to drain, and a peer that stopped
        # reading would keep the socket (and a half-sent request) forever.
        self.writer.transport.abort()


class _Pool:
    """The connections to one (scheme, host, port): at most `limit` open, the idle ones kept
    (newest first) up to `keepalive`. A request over the limit waits for one to come back."""

    def __init__(self, limit: int, keepalive: int, expiry: float) -> None:
        self.limit = limit
        self.keepalive = keepalive
        self.expiry = expiry
        self.idle: deque[_Connection] = deque()
        self.open = 0  # idle and in use
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()

    def take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if conn.usable(now, self.expiry):
                return conn
            self._discard(conn)
        return None

    async def slot(self, timeout: float | None) -> _Connection | None:
        """An idle connection handed over, or None: a slot to open a new one in."""
        if self.open < self.limit:
            self.open += 1
            return None
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with _deadline(timeout):
                return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Handed a connection or a slot just as we gave up: pass it on.
                handed = waiter.result()
                if handed is None:
                    self.release_slot()
                else:
                    self.put_back(handed)
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            raise

    def put_back(self, conn: _Connection) -> None:
        """A connection whose exchange finished cleanly."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if len(self.idle) >= self.keepalive:
            self._discard(conn)
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def lose(self, conn: _Connection) -> None:
        """A connection that cannot be reused: closed, and its slot freed."""
        conn.close()
        self.release_slot()

    def release_slot(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to the waiter
                return
        self.open -= 1

    def _discard(self, conn: _Connection) -> None:
        self.lose(conn)

    def close_all(self) -> None:
        while self.idle:
            self._discard(self.idle.pop())


class Http1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio streams. Honours the request's `timeout` extension as httpx does
    (connect / read / write / pool, each bounding one operation) and raises httpx's errors.
    Supports `http` and `https` URLs only; no HTTP/2, no proxies (`supports` says which URLs)."""

    def __init__(
        self, *, max_connections: int = 512, max_keepalive_connections: int = 64,
        keepalive_expiry: float = 4.0, ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._limit = max_connections
        self._keepalive = max_keepalive_connections
        self._expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._pools: dict[tuple[bytes, bytes, int], _Pool] = {}

    @staticmethod
    def supports(url: str | httpx.URL) -> bool:
        return httpx.URL(url).scheme in _DEFAULT_PORTS

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            # httpx's own context (certifi's roots, or SSL_CERT_FILE / SSL_CERT_DIR when set):
            # the upstream's certificate is checked exactly as with the httpx transport.
            self._ssl_context = httpx.create_ssl_context()
            self._ssl_context.set_alpn_protocols(["http/1.1"])  # as httpcore offers it
        return self._ssl_context

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(
                f"the http1 transport sends http and https only, not {url.scheme!r}",
                request=request,
            )
        host = url.raw_host
        port = url.port or _DEFAULT_PORTS[url.scheme]
        key = (scheme, host, port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(self._limit, self._keepalive, self._expiry)
        timeouts = _timeouts(request)

        conn = pool.take_idle()
        if conn is None:
            with _mapped(request, httpx.PoolTimeout, httpx.ConnectError):
                conn = await pool.slot(timeouts.get("pool"))
        if conn is None:
            try:
                conn = await self._connect(request, host.decode("ascii"), port, scheme == b"https",
                                           timeouts.get("connect"))
            except BaseException:
                pool.release_slot()
                raise
        try:
            await _write_request(conn, request, timeouts.get("write"))
            return await _read_head(conn, pool, request, timeouts.get("read"))
        except BaseException:
            pool.lose(conn)
            raise

    async def _connect(
        self, request: httpx.Request, host: str, port: int, tls: bool, timeout: float | None
    ) -> _Connection:
        with _mapped(request, httpx.ConnectTimeout, httpx.ConnectError):
            async with _deadline(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=self._tls() if tls else None,
                    server_hostname=host if tls else None, limit=_BUFFER_LIMIT,
                )
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # A request goes out in one write and the answer must not wait for an ACK.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(reader, writer)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close_all()
        self._pools.clear()


def _head_bytes(request: httpx.Request) -> bytes:
    target = request.url.raw_path or b"/"
    lines = [request.method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


async def _write_request(conn: _Connection, request: httpx.Request, timeout: float | None) -> None:
    head = _head_bytes(request)
    if isinstance(request.stream, httpx.ByteStream):
        await _send(conn, request, head + request.content, timeout)
        return
    await _send(conn, request, head, timeout)
    chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
    # A streamed body (the client's, passed on as it arrives): the write timeout bounds each
    # piece, as httpx's does, not the wait for the client; the client's errors stay its own.
    assert isinstance(request.stream, httpx.AsyncByteStream)
    async for piece in request.stream:
        if piece:
            await _send(conn, request, b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece,
                        timeout)
    if chunked:
        await _send(conn, request, b"0\r\n\r\n", timeout)


async def _send(conn: _Connection, request: httpx.Request, data: bytes,
                timeout: float | None) -> None:
    with _mapped(request, httpx.WriteTimeout, httpx.WriteError):
        async with _deadline(timeout):
            conn.writer.write(data)
            await conn.writer.drain()


def _protocol_error(request: httpx.Request, message: str) -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError(message, request=request)


async def _read_head(
    conn: _Connection, pool: _Pool, request: httpx.Request, timeout: float | None
) -> httpx.Response:
    reader = conn.reader
    while True:
        with _mapped(request, httpx.ReadTimeout, httpx.ReadError):
            async with _deadline(timeout):
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial:
                        raise _protocol_error(
                            request, "the server disconnected without sending a response"
                        ) from None
                    raise
        lines = raw[:-4].split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise _protocol_error(request, f"malformed status line {lines[0][:100]!r}")
        try:
            status = int(status_line[1])
        except ValueError:
            raise _protocol_error(request, f"malformed status line {lines[0][:100]!r}") from None
        if 100 <= status < 200 and status != 101:
            continue  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        if status == 101:
            raise _protocol_error(request, "the server switched protocols; none was asked for")
        break
    headers: list[tuple[bytes, bytes]] = []
    # The framing headers are read here, from the raw lines: httpx.Headers lookups decode every
    # header on each call, which was a fifth of this function's cost.
    connection: set[bytes] = set()
    chunked = False
    lengths: list[bytes] | None = None
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in (b" ", b"\t"):
            raise _protocol_error(request, f"malformed header line {line[:100]!r}")
        value = value.strip(b" \t")
        headers.append((name, value))
        lower = name.lower()
        if lower == b"connection":
            connection.update(t.strip().lower() for t in value.split(b","))
        elif lower == b"transfer-encoding":
            chunked = chunked or b"chunked" in value.lower()
        elif lower == b"content-length":
            lengths = (lengths or []) + value.split(b",")
    reason = status_line[2] if len(status_line) > 2 else b""

    keep_alive = status_line[0] == b"HTTP/1.1" and b"close" not in connection
    if "close" in request.headers.get("connection", "").lower():
        keep_alive = False
    if request.method == "HEAD" or status in _NO_BODY_STATUSES:
        body: _Body = _Body(conn, pool, request, timeout, keep_alive, length=0)
    elif chunked:
        body = _Body(conn, pool, request, timeout, keep_alive, chunked=True)
    elif lengths is not None:
        try:
            distinct = {int(v) for v in lengths}
        except ValueError:
            distinct = set()
        if len(distinct) != 1 or min(distinct) < 0:
            raise _protocol_error(request, "invalid Content-Length")
        body = _Body(conn, pool, request, timeout, keep_alive, length=distinct.pop())
    else:
        body = _Body(conn, pool, request, timeout, keep_alive=False, length=None)
    return httpx.Response(
        status, headers=headers, stream=body,
        extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason},
    )


class _Body(httpx.AsyncByteStream):
    """The response body, read as the caller asks. The connection goes back to the pool only
    when the body was read to its end and both sides keep it alive; cut short (an `aclose`
    before the end, an error, a cancellation), it is closed: its next bytes are this body's."""

    def __init__(
        self, conn: _Connection, pool: _Pool, request: httpx.Request, timeout: float | None,
        keep_alive: bool, *, length: int | None = None, chunked: bool = False,
    ) -> None:
        self._conn: _Connection | None = conn
        self._pool = pool
        self._request = request
        self._timeout = timeout
        self._keep_alive = keep_alive
        self._length = length  # None with chunked (per chunk) or read-to-close
        self._chunked = chunked
        if length == 0:
            self._finish()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._conn is None:
            return
        reader = self._conn.reader
        try:
            with _mapped(self._request, httpx.ReadTimeout, httpx.ReadError):
                if self._chunked:
                    async for piece in self._chunks(reader):
                        yield piece
                elif self._length is not None:
                    remaining = self._length
                    while remaining:
                        piece = await self._read(reader, min(remaining, _READ_SIZE))
                        if not piece:
                            raise _protocol_error(
                                self._request, "the server closed the connection with "
                                f"{remaining} bytes of the body unsent",
                            )
                        remaining -= len(piece)
                        yield piece
                else:
                    while piece := await self._read(reader, _READ_SIZE):
                        yield piece
        except BaseException:
            self._abandon()
            raise
        self._finish()

    async def _chunks(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while True:
            line = await self._readline(reader)
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _protocol_error(
                    self._request, f"malformed chunk size {line[:40]!r}"
                ) from None
            if size < 0:
                raise _protocol_error(self._request, "negative chunk size")
            if size == 0:
                while await self._readline(reader) not in (b"\r\n", b"\n"):
                    pass  # trailers: dropped, as httpx drops them
                return
            while size:
                piece = await self._read(reader, min(size, _READ_SIZE))
                if not piece:
                    raise _protocol_error(self._request, "the server closed the connection "
                                          "in the middle of a chunk")
                size -= len(piece)
                yield piece
            if await self._readexactly(reader, 2) != b"\r\n":
                raise _protocol_error(self._request, "a chunk did not end with CRLF")

    async def _read(self, reader: asyncio.StreamReader, n: int) -> bytes:
        async with _deadline(self._timeout):
            return await reader.read(n)

    async def _readexactly(self, reader: asyncio.StreamReader, n: int) -> bytes:
        async with _deadline(self._timeout):
            return await reader.readexactly(n)

    async def _readline(self, reader: asyncio.StreamReader) -> bytes:
        async with _deadline(self._timeout):
            line = await reader.readline()
        if not line.endswith(b"\n"):
            raise _protocol_error(self._request, "the server closed the connection in the "
                                  "middle of a chunked body")
        return line

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._keep_alive:
            self._pool.put_back(conn)
        else:
            self._pool.lose(conn)

    def _abandon(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.lose(conn)

    async def aclose(self) -> None:
        self._abandon()

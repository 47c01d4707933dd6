"""Run the proxy under uvicorn: listen at once, load the model in the background, drain on
SIGTERM and exit 0, and close connections whose client stalls before its headers are in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from email.utils import formatdate

import h11
import orjson
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import create_app
from .config import ProxyConfig
from .errors import BadRequestError, ProxyError, RequestTimeoutError, error_body
from .logs import configure_logging

__all__ = [
    "MAX_HEAD_BYTES", "STARTUP_FAILURE", "HeaderTimeoutProtocol", "build_server",
    "header_timeout_protocol", "serve",
]

log = logging.getLogger(__name__)

# uvicorn exits with this when the app's startup fails (as `uvicorn.main.run` does).
STARTUP_FAILURE = 3
# The request line and headers: above this a request gets a 431, however TCP splits it. h11 is
# told the same limit (its own applies only to an incomplete head).
MAX_HEAD_BYTES = 64 * 1024


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus the header read timeout h11 and uvicorn lack: from the
    moment a connection opens, or the first byte of its next request arrives, the request line
    and headers must be complete within `header_timeout_s`. Otherwise a partial request gets a
    408 and the connection closes (a connection that sent nothing is just closed). The idle wait
    between requests stays uvicorn's `timeout_keep_alive`."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _rejected = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _no_delay(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        if self.conn.their_state is h11.IDLE and _head_size(self.conn, data) > MAX_HEAD_BYTES:
            # h11 refuses a head this large only while it is incomplete, so a big head that
            # happened to arrive in one read went through: the limit now holds however the
            # bytes are split.
            self._reject(_HeadTooLargeError(
                f"the request line and headers exceed {MAX_HEAD_BYTES // 1024} KiB"
            ))
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # a request has begun; its headers are not in yet
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse, in the OpenAI error shape (uvicorn
        sends plain text)."""
        self._reject(BadRequestError(f"malformed HTTP request ({msg.rstrip('.')})",
                                     code="invalid_http_request"))

    def _reject(self, error: ProxyError) -> None:
        self._rejected = True
        self._cancel_header_timer()
        log.info("closing a connection from %s: %s", _peer(self.client), error.message)
        self.transport.write(_error_response(error))
        self.transport.close()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and self.header_timeout_s > 0:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        partial, _ = self.conn.trailing_data
        if partial:
            log.info("closing a connection from %s: request headers incomplete after %gs",
                     _peer(self.client), self.header_timeout_s)
            self.transport.write(_request_timeout_response())
        self.transport.close()


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off on a client's TCP connection. asyncio does so only for sockets
    it created with `IPPROTO_TCP`; a socket accepted from a listener bound elsewhere (the
    parent's socket under `--workers`, made with protocol 0) keeps Nagle on, and then the body
    uvicorn writes after the headers waits for the client's delayed ACK: ~40 ms a response."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "an unknown client"


class _HeadTooLargeError(ProxyError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}


def _head_size(conn: h11.Connection, data: bytes) -> int:
    """Bytes of the request line and headers so far: up to the blank line once it is in."""
    buffered = bytes(conn.trailing_data[0]) + data
    end = buffered.find(b"\r\n\r\n")
    return end if end >= 0 else len(buffered)


def _request_timeout_response() -> bytes:
    return _error_response(RequestTimeoutError("the request headers did not arrive in time"))


def _error_response(error: ProxyError) -> bytes:
    """Written by hand: h11 cannot send a response before it has read a request."""
    body = orjson.dumps(error_body(error.message, error.type, error.code))
    head = (
        f"HTTP/1.1 {error.status} {_REASONS[error.status]}\r\n"
        f"date: {formatdate(usegmt=True)}\r\n"
        "content-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class for `uvicorn.Config(http=...)`, which takes a class, not an object."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": seconds})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's own version re-raises SIGTERM after a graceful shutdown, so a drained,
        clean stop would end with 143. A stop we finished is a success: exit 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def build_server(config: ProxyConfig, *, on_ready: Callable[[], None] | None = None) -> _Server:
    """One proxy under uvicorn, not yet running; `on_ready` runs once it accepts requests."""
    app = create_app(config)
    server = _Server(
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level=config.log_level.lower(),
            log_config=None,  # configure_logging's tree carries uvicorn's loggers too
            timeout_graceful_shutdown=int(config.drain_timeout_s), lifespan="on",
            timeout_keep_alive=math.ceil(config.keep_alive_timeout_s),
            proxy_headers=False, server_header=False,
            http=header_timeout_protocol(config.header_read_timeout_s),
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        )
    )
    if on_ready is not None:
        original = server.startup

        async def startup(sockets: object = None) -> None:
            await original(sockets=sockets)  # type: ignore[arg-type]
            if server.started:
                on_ready()

        server.startup = startup  # type: ignore[method-assign]
    return server


def serve(config: ProxyConfig, *, on_ready: Callable[[], None] | None = None) -> None:
    """Blocking. SIGTERM or SIGINT starts a graceful shutdown, which runs the app's lifespan
    exit: in-flight requests finish and pending memory writes drain, then the process exits 0.
    A failed startup exits 3. `config.workers` > 1 runs that many proxy processes on the one
    port (proxy.workers), with the same exits."""
    configure_logging(config.log_level)
    if config.workers > 1:
        from .workers import serve_workers

        serve_workers(config, on_ready=on_ready)
        return
    server = build_server(config, on_ready=on_ready)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)

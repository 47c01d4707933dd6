"""Owns the one `httpx.AsyncClient`: forwards the client's auth and body, drops hop-by-hop
headers, streams, and maps httpx errors to `UpstreamError`s.

A request is sent once. The only resend is after a connect error, when no connection existed
and so no byte of the request can have left; a kept-alive connection the upstream has closed is
discarded before use (it is readable at checkout; proxy.http1 and httpcore both check). A
connection that breaks after the request was written is a 502, never a second paid call.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import httpx
from starlette.datastructures import MutableHeaders

from ..memory.errors import ConfigError
from .config import ProxyConfig
from .errors import UpstreamTimeoutError, UpstreamUnreachableError
from .http1 import Http1Transport
from .scope import HEADROOM_HEADER_PREFIX
from .timing import ProxyClock

__all__ = [
    "HOP_BY_HOP", "UPSTREAM_TRANSPORTS", "TotalDeadline", "Upstream", "network_transport",
    "request_headers", "response_headers", "target",
]

_RECONNECT_PAUSE_S = 0.05

# RFC 9110 §7.6.1 connection-specific headers, plus the ones httpx/uvicorn recompute.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    }
)


def request_headers(
    incoming: Mapping[str, str], config: ProxyConfig, *, decode: bool
) -> dict[str, str]:
    """What the upstream gets: the client's headers minus hop-by-hop and our own X-Headroom-*.
    `decode=True` asks for an unencoded body because the proxy must read it (chat completions)."""
    connection_named = {
        h.strip().lower() for h in incoming.get("connection", "").split(",") if h.strip()
    }
    out: dict[str, str] = {}
    for name, value in incoming.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in connection_named:
            continue
        if lower.startswith(HEADROOM_HEADER_PREFIX):
            continue
        out[lower] = value
    # The operator's upstream key is never added here: proxy.auth puts it on authenticated
    # requests only (and only for allowlisted routes), replacing the client's proxy key.
    if decode:
        out["accept-encoding"] = "identity"
    return out


def target(scope: Mapping[str, Any]) -> tuple[str, bytes]:
    """The request's path and query exactly as the client sent them: percent-escapes such as
    `%2F` stay escaped (the ASGI `path` is already decoded)."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else scope["path"]
    return path, scope.get("query_string", b"")


# What httpx decodes in `aiter_bytes`/`aread` (brotli and zstd only with their optional modules).
_DECODED_BY_HTTPX = frozenset(
    {"identity", "gzip", "deflate"}
    | ({"br"} if importlib.util.find_spec("brotli") or importlib.util.find_spec("brotlicffi")
       else set())
    | ({"zstd"} if importlib.util.find_spec("zstandard") else set())
)


def response_headers(
    upstream: httpx.Response, *, keep_length: bool, extra: Mapping[str, str] | None = None
) -> MutableHeaders:
    """The upstream's headers minus hop-by-hop ones, then `extra` (our receipt) set on top.
    Repeated headers stay separate: two Set-Cookie values joined by a comma are unreadable.

    `keep_length=True`: the body goes out byte for byte as received (`aiter_raw`), so its
    Content-Length and Content-Encoding stay. `False`: the body is httpx's decoded text or one we
    rebuilt, so both go (the server frames it anew), and a client never decodes twice.
    The upstream's Date goes too: uvicorn adds its own, and two Date headers are invalid."""
    drop = {b"date"}
    if not keep_length:
        drop.add(b"content-length")
        encoding = upstream.headers.get("content-encoding", "")
        codings = {c.strip().lower() for c in encoding.split(",")}
        if codings <= _DECODED_BY_HTTPX | {""}:
            drop.add(b"content-encoding")
    raw = [
        (name.lower(), value)
        for name, value in upstream.headers.raw
        if name.lower() not in drop
        and (name.lower().decode("latin-1") not in HOP_BY_HOP or name.lower() == b"content-length")
    ]
    out = MutableHeaders(raw=raw)
    for name, value in (extra or {}).items():
        out[name] = value
    return out


class TotalDeadline(httpx.AsyncBaseTransport):
    """Bounds a whole exchange, answer body included (httpx's timeouts bound one operation
    each). Past the deadline the request or the body read fails as an `httpx.ReadTimeout`."""

    def __init__(self, inner: httpx.AsyncBaseTransport, seconds: float) -> None:
        self.inner = inner
        self.seconds = seconds

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        deadline = anyio.current_time() + self.seconds
        try:
            with anyio.fail_after(self.seconds):
                response = await self.inner.handle_async_request(request)
        except TimeoutError:
            raise _total_timeout(request, self.seconds) from None
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code, headers=response.headers, extensions=response.extensions,
            stream=_DeadlineStream(response.stream, deadline, request, self.seconds),
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


class _DeadlineStream(httpx.AsyncByteStream):
    def __init__(
        self, inner: httpx.AsyncByteStream, deadline: float, request: httpx.Request,
        seconds: float,
    ) -> None:
        self.inner = inner
        self.deadline = deadline
        self.request = request
        self.seconds = seconds

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = self.inner.__aiter__()
        while True:
            try:
                with anyio.fail_after(max(0.0, self.deadline - anyio.current_time())):
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise _total_timeout(self.request, self.seconds) from None
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


def _total_timeout(request: httpx.Request, seconds: float) -> httpx.ReadTimeout:
    return httpx.ReadTimeout(
        f"the exchange took longer than the total timeout ({seconds:g}s)", request=request
    )


# What an `httpx.AsyncClient` sends unless the request has its own (header names lowercase, as
# `request_headers` gives them): the upstream sees the same request as when a client sent it.
_CLIENT_DEFAULTS = {
    "accept": "*/*",
    "accept-encoding": ", ".join(
        c for c in ("gzip", "deflate", "br", "zstd") if c in _DECODED_BY_HTTPX
    ),
    "connection": "keep-alive",
    "user-agent": f"python-httpx/{httpx.__version__}",
}

# Parsed upstream URLs kept per (path, query): chat completions always go to the same few
# targets, and httpx's URL parsing and base-URL merge were a tenth of a pass-through's CPU.
_URL_CACHE_SIZE = 256


# Idle connections expire before common servers' keep-alive (uvicorn: 5 s), so we rarely reuse
# one the upstream is closing at that very moment.
_MAX_CONNECTIONS, _MAX_KEEPALIVE, _KEEPALIVE_EXPIRY_S = 512, 64, 4.0
UPSTREAM_TRANSPORTS = ("http1", "httpx")


def network_transport(config: ProxyConfig) -> httpx.AsyncBaseTransport:
    """The transport that reaches the upstream: our lean HTTP/1.1 one (proxy.http1) unless the
    config asks for httpx's (`upstream_transport="httpx"`) or the URL is one it cannot send to."""
    if config.upstream_transport not in UPSTREAM_TRANSPORTS:
        raise ConfigError(f"upstream transport {config.upstream_transport!r} is not one of "
                          f"{', '.join(UPSTREAM_TRANSPORTS)}")
    if config.upstream_transport == "http1" and Http1Transport.supports(config.upstream_base):
        return Http1Transport(
            max_connections=_MAX_CONNECTIONS, max_keepalive_connections=_MAX_KEEPALIVE,
            keepalive_expiry=_KEEPALIVE_EXPIRY_S,
        )
    return httpx.AsyncHTTPTransport(
        limits=httpx.Limits(
            max_connections=_MAX_CONNECTIONS, max_keepalive_connections=_MAX_KEEPALIVE,
            keepalive_expiry=_KEEPALIVE_EXPIRY_S,
        ),
    )


class Upstream:
    """Sends through the transport itself rather than an `httpx.AsyncClient`: the client's
    per-request work (base-URL merge, header merge, cookie jar, auth and redirect machinery,
    none of which a proxy uses) cost about a third of a pass-through's CPU. What the client
    added is added here once: its default headers (under the client's own), the timeouts."""

    def __init__(self, config: ProxyConfig, transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        network = transport or network_transport(config)
        if config.upstream_total_timeout_s > 0:
            network = TotalDeadline(network, config.upstream_total_timeout_s)
        self.transport: httpx.AsyncBaseTransport = network
        connect, read = config.upstream_connect_timeout_s, config.upstream_read_timeout_s
        # A write waits on the upstream reading, like a read; the pool wait is like a connect.
        self.timeout = httpx.Timeout(connect=connect, read=read, write=read, pool=connect)
        self._extensions = {"timeout": self.timeout.as_dict()}
        base = httpx.URL(config.upstream_base)
        # As httpx's base_url: the client's path is appended after the base's own path.
        self._base = base.copy_with(raw_path=base.raw_path.rstrip(b"/") + b"/")
        self._urls: dict[tuple[str, bytes], httpx.URL] = {}

    def url(self, path: str, query: bytes) -> httpx.URL:
        """The upstream URL of a client's path and query (both as sent, see `target`)."""
        key = (path, query)
        url = self._urls.get(key)
        if url is None:
            # An empty query would still put a "?" on the request line.
            relative = httpx.URL(path=path, query=query) if query else httpx.URL(path=path)
            url = self._base.copy_with(
                raw_path=self._base.raw_path + relative.raw_path.lstrip(b"/")
            )
            if len(self._urls) >= _URL_CACHE_SIZE:
                self._urls.pop(next(iter(self._urls)))  # the oldest; dicts keep insertion order
            self._urls[key] = url
        return url

    async def send(
        self, method: str, path: str, *, query: bytes, headers: Mapping[str, str],
        content: bytes | AsyncIterator[bytes] | None, clock: ProxyClock | None = None,
    ) -> httpx.Response:
        """Send and return the response with its body not yet read (the caller streams it and
        must close it). `clock` (the receipt's) is paused as the request goes out."""
        request = httpx.Request(
            method, self.url(path, query), headers={**_CLIENT_DEFAULTS, **headers},
            content=content, extensions=self._extensions,
        )
        try:
            try:
                return await self._send_once(request, clock)
            except httpx.ConnectError:
                # No connection was made, so no byte of the request left: the one case where
                # sending again cannot make the upstream act twice. (A streamed body was not
                # read either, so it can still be sent.)
                await anyio.sleep(_RECONNECT_PAUSE_S)
                return await self._send_once(request, clock)
        except httpx.ConnectTimeout as exc:
            raise UpstreamUnreachableError(
                f"could not connect to the upstream at {self.config.upstream_base}: timed out"
            ) from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(
                f"the upstream at {self.config.upstream_base} did not answer in time"
            ) from exc
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.NetworkError) as exc:
            raise UpstreamUnreachableError(
                f"could not reach the upstream at {self.config.upstream_base}: {exc}"
            ) from exc

    async def _send_once(
        self, request: httpx.Request, clock: ProxyClock | None
    ) -> httpx.Response:
        if clock is not None:
            clock.pause()  # from here on, the time is the network's and the upstream's
        try:
            response = await self.transport.handle_async_request(request)
        except httpx.RequestError as exc:
            exc.request = request  # as httpx's client does: the error names its request
            raise
        response.request = request  # httpx's body readers name the request in their errors
        return response

    async def read(self, response: httpx.Response) -> bytes:
        """The whole body of a response from `send`, closed afterwards. A body that stalls or
        breaks off is an upstream error too (504 / 502), not a proxy failure."""
        try:
            return await response.aread()
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(
                f"the upstream at {self.config.upstream_base} stopped sending its answer"
            ) from exc
        except httpx.TransportError as exc:
            raise UpstreamUnreachableError(
                f"the upstream at {self.config.upstream_base} broke off its answer: {exc}"
            ) from exc
        finally:
            await self.close_response(response)

    @staticmethod
    async def close_response(response: httpx.Response) -> None:
        """Close even while the surrounding task is being cancelled (client went away)."""
        with anyio.CancelScope(shield=True):
            await response.aclose()

    async def aclose(self) -> None:
        await self.transport.aclose()

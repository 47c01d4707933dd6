"""Owns the one `httpx.AsyncClient`: forwards the client's auth and body, drops hop-by-hop
headers, streams, and maps httpx errors to `UpstreamError`s."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import httpx
from starlette.datastructures import MutableHeaders

from .config import ProxyConfig
from .errors import UpstreamTimeoutError, UpstreamUnreachableError
from .scope import HEADROOM_HEADER_PREFIX

__all__ = ["HOP_BY_HOP", "Upstream", "request_headers", "response_headers", "target"]

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


def response_headers(
    upstream: httpx.Response, *, keep_length: bool, extra: Mapping[str, str] | None = None
) -> MutableHeaders:
    """The upstream's headers minus hop-by-hop ones, then `extra` (our receipt) set on top.
    Repeated headers stay separate: two Set-Cookie values joined by a comma are unreadable."""
    raw = [
        (name.lower(), value)
        for name, value in upstream.headers.raw
        if name.lower().decode("latin-1") not in HOP_BY_HOP
        or (keep_length and name.lower() == b"content-length")
    ]
    out = MutableHeaders(raw=raw)
    for name, value in (extra or {}).items():
        out[name] = value
    return out


class Upstream:
    def __init__(self, config: ProxyConfig, transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        self.client = httpx.AsyncClient(
            base_url=config.upstream_base,
            timeout=httpx.Timeout(
                config.upstream_timeout_s, connect=config.upstream_connect_timeout_s
            ),
            # Idle connections expire before common servers' keep-alive (uvicorn: 5 s), so we
            # rarely reuse one the upstream is closing at that very moment.
            limits=httpx.Limits(
                max_connections=512, max_keepalive_connections=64, keepalive_expiry=4.0
            ),
            transport=transport,
            follow_redirects=False,
        )

    async def send(
        self, method: str, path: str, *, query: bytes, headers: Mapping[str, str],
        content: bytes | AsyncIterator[bytes] | None,
    ) -> httpx.Response:
        """Send and return the response with its body not yet read (the caller streams it and
        must close it)."""
        url = httpx.URL(path=path, query=query)
        request = self.client.build_request(method, url, headers=dict(headers), content=content)
        try:
            try:
                return await self.client.send(request, stream=True)
            except httpx.RemoteProtocolError:
                # A kept-alive connection the upstream closed as we reused it: nothing was
                # answered, so a request whose body we hold is sent once more on a new one.
                if not isinstance(content, bytes | None):
                    raise
                request = self.client.build_request(
                    method, url, headers=dict(headers), content=content
                )
                return await self.client.send(request, stream=True)
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
        await self.client.aclose()

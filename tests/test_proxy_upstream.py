"""The upstream client's own rules, with httpx's MockTransport standing in for the network."""

from __future__ import annotations

import httpx
import pytest

from headroom.proxy.config import ProxyConfig
from headroom.proxy.errors import UpstreamUnreachableError
from headroom.proxy.upstream import Upstream


def _dropping(times: int) -> tuple[httpx.MockTransport, list[bytes]]:
    """Fails the first `times` sends the way a closed kept-alive connection does."""
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        if len(seen) <= times:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json={"ok": True})

    return httpx.MockTransport(handler), seen


async def test_a_dropped_kept_alive_connection_is_retried_once_with_the_same_body() -> None:
    transport, seen = _dropping(1)
    upstream = Upstream(ProxyConfig(upstream_url="http://up"), transport=transport)
    try:
        response = await upstream.send(
            "POST", "/v1/chat/completions", query=b"", headers={}, content=b'{"a": 1}'
        )
        assert response.status_code == 200
        assert seen == [b'{"a": 1}', b'{"a": 1}']
    finally:
        await upstream.aclose()


async def test_a_second_drop_is_a_502() -> None:
    transport, seen = _dropping(2)
    upstream = Upstream(ProxyConfig(upstream_url="http://up"), transport=transport)
    try:
        with pytest.raises(UpstreamUnreachableError):
            await upstream.send("POST", "/v1/x", query=b"", headers={}, content=b"{}")
        assert len(seen) == 2  # retried once, not forever
    finally:
        await upstream.aclose()

"""The upstream client's own rules, with httpx's MockTransport standing in for the network:
what is resent (only what provably never left), the timeouts, the URL, the relayed headers."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from headroom.proxy.config import ProxyConfig
from headroom.proxy.errors import UpstreamTimeoutError, UpstreamUnreachableError
from headroom.proxy.upstream import Upstream, response_headers


def _failing(times: int, error: Callable[[str], Exception]) -> tuple[httpx.MockTransport,
                                                                     list[bytes]]:
    """Fails the first `times` sends with `error`; records every send's body."""
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        if len(seen) <= times:
            raise error("fails")
        return httpx.Response(200, json={"ok": True})

    return httpx.MockTransport(handler), seen


async def _send(upstream: Upstream, path: str = "/v1/chat/completions",
                query: bytes = b"") -> httpx.Response:
    return await upstream.send("POST", path, query=query, headers={}, content=b'{"a": 1}')


@pytest.mark.parametrize("error", [
    # The upstream read the request, then closed: it may be generating (and billing) already.
    lambda m: httpx.RemoteProtocolError("Server disconnected without sending a response."),
    httpx.ReadError, httpx.WriteError,
])
async def test_a_connection_lost_after_sending_is_a_502_never_a_resend(
    error: Callable[[str], Exception],
) -> None:
    transport, seen = _failing(1, error)
    upstream = Upstream(ProxyConfig(upstream_url="http://up"), transport=transport)
    try:
        with pytest.raises(UpstreamUnreachableError):
            await _send(upstream)
        assert seen == [b'{"a": 1}']  # sent once
    finally:
        await upstream.aclose()


async def test_a_connect_error_is_retried_once_with_the_same_body() -> None:
    transport, seen = _failing(1, httpx.ConnectError)
    upstream = Upstream(ProxyConfig(upstream_url="http://up"), transport=transport)
    try:
        response = await _send(upstream)
        assert response.status_code == 200
        assert seen == [b'{"a": 1}', b'{"a": 1}']
    finally:
        await upstream.aclose()


async def test_a_second_connect_error_is_a_502() -> None:
    transport, seen = _failing(2, httpx.ConnectError)
    upstream = Upstream(ProxyConfig(upstream_url="http://up"), transport=transport)
    try:
        with pytest.raises(UpstreamUnreachableError):
            await _send(upstream)
        assert len(seen) == 2  # retried once, not forever
    finally:
        await upstream.aclose()


async def test_no_stray_question_mark_and_the_query_kept_byte_for_byte() -> None:
    targets: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        targets.append(request.url.raw_path)
        return httpx.Response(200)

    upstream = Upstream(ProxyConfig(upstream_url="http://up/prefix/v1"),
                        transport=httpx.MockTransport(handler))
    try:
        await _send(upstream, "/v1/models")
        await _send(upstream, "/v1/models", query=b"q=%C3%A9+x&a=")
        await _send(upstream, "/v1/models/a%2Fb")
    finally:
        await upstream.aclose()
    assert targets == [b"/prefix/v1/models", b"/prefix/v1/models?q=%C3%A9+x&a=",
                       b"/prefix/v1/models/a%2Fb"]


async def test_the_timeouts_come_from_the_config() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    upstream = Upstream(ProxyConfig(upstream_url="http://up", upstream_connect_timeout_s=3,
                                    upstream_read_timeout_s=42),
                        transport=httpx.MockTransport(handler))
    try:
        await _send(upstream)
    finally:
        await upstream.aclose()
    # httpcore reads each request's timeouts from this extension.
    assert sent[0].extensions["timeout"] == {"connect": 3, "read": 42, "write": 42, "pool": 3}


async def test_the_upstream_gets_a_clients_default_headers_under_the_callers_own() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    upstream = Upstream(ProxyConfig(upstream_url="http://up"),
                        transport=httpx.MockTransport(handler))
    try:
        await upstream.send("POST", "/v1/x", query=b"", content=b"{}",
                            headers={"user-agent": "my-sdk/1", "authorization": "Bearer k"})
        await upstream.send("POST", "/v1/x", query=b"", content=b"{}", headers={})
    finally:
        await upstream.aclose()
    plain = httpx.AsyncClient().headers
    assert sent[0].headers["user-agent"] == "my-sdk/1"
    assert sent[0].headers["authorization"] == "Bearer k"
    assert sent[0].headers["accept"] == plain["accept"]
    # With nothing of its own, the upstream sees what an httpx client sends.
    assert {k: sent[1].headers[k] for k in plain} == dict(plain)


def _slow(head_delay_s: float, chunk_delay_s: float, chunks: int) -> httpx.MockTransport:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(chunks):
            await asyncio.sleep(chunk_delay_s)
            yield b"x"

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(head_delay_s)
        return httpx.Response(200, content=body())

    return httpx.MockTransport(handler)


async def test_the_total_timeout_bounds_the_wait_for_the_answer() -> None:
    config = ProxyConfig(upstream_url="http://up", upstream_total_timeout_s=0.2)
    upstream = Upstream(config, transport=_slow(1.0, 0, 1))
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeoutError):
            await _send(upstream)
        assert asyncio.get_running_loop().time() - started < 0.8
    finally:
        await upstream.aclose()


async def test_the_total_timeout_bounds_a_body_that_keeps_trickling() -> None:
    # Every piece comes well within the read timeout; the whole takes longer than the total.
    config = ProxyConfig(upstream_url="http://up", upstream_total_timeout_s=0.3)
    upstream = Upstream(config, transport=_slow(0, 0.05, 100))
    try:
        response = await _send(upstream)
        with pytest.raises(UpstreamTimeoutError, match="stopped sending"):
            await upstream.read(response)
    finally:
        await upstream.aclose()
    # And without a total bound the same trickle is read to its end.
    upstream = Upstream(ProxyConfig(upstream_url="http://up"), transport=_slow(0, 0.001, 100))
    try:
        assert await upstream.read(await _send(upstream)) == b"x" * 100
    finally:
        await upstream.aclose()


def _response(**headers: str) -> httpx.Response:
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return httpx.Response(200, headers=[*raw, (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")])


def test_relayed_headers_never_carry_the_upstreams_date() -> None:
    response = _response(date="Tue, 01 Dec 2026 10:00:00 GMT", content_length="5")
    for keep_length in (True, False):
        headers = response_headers(response, keep_length=keep_length)
        assert "date" not in headers
        assert headers.getlist("set-cookie") == ["a=1", "b=2"]
    assert response_headers(response, keep_length=True)["content-length"] == "5"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP"])
def test_a_decoded_body_loses_its_content_encoding_a_raw_one_keeps_it(encoding: str) -> None:
    response = _response(content_encoding=encoding, content_length="99")
    decoded = response_headers(response, keep_length=False, extra={"x-headroom-a": "1"})
    assert "content-encoding" not in decoded and "content-length" not in decoded
    assert decoded["x-headroom-a"] == "1"
    raw = response_headers(response, keep_length=True)
    assert (raw["content-encoding"], raw["content-length"]) == (encoding, "99")


def test_an_encoding_httpx_cannot_decode_is_kept_with_the_undecoded_bytes() -> None:
    # httpx passes such bytes through undecoded: the client must be told how to decode them.
    response = _response(content_encoding="compress")
    assert response_headers(response, keep_length=False)["content-encoding"] == "compress"


async def test_httpx_decodes_what_the_headers_then_stop_claiming() -> None:
    """The pairing the pipeline relies on: `aread` decodes gzip, and the relayed headers drop
    the encoding, so a client reading the relay sees plain JSON."""
    payload = b'{"compressed": true}'

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=gzip.compress(payload),
                              headers={"content-encoding": "gzip"})

    upstream = Upstream(ProxyConfig(upstream_url="http://up"),
                        transport=httpx.MockTransport(handler))
    try:
        response = await _send(upstream)
        assert await upstream.read(response) == payload
        assert "content-encoding" not in response_headers(response, keep_length=False)
    finally:
        await upstream.aclose()

"""Every route other than chat completions, and any method, passes byte for byte: bodies streamed
both ways, content-encoding kept, hop-by-hop headers handled. Authorization reaches the upstream
(or the configured upstream key when the client sends none); X-Headroom-* never does."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from tests.servers import COOKIES, FakeUpstream, Proxy, Reply, running_proxy, running_server

HEADROOM = {"X-Headroom-User-Id": "pat", "X-Headroom-Session-Id": "s1",
            "X-Headroom-Agent-Id": "a1", "X-Headroom-Turn-Id": "t1", "X-Headroom-Memory": "on"}


@pytest.fixture
def proxy(tmp_path: Path, local_embedder: Any) -> Iterator[Proxy]:
    with running_proxy(tmp_path / "proxy.db", local_embedder) as p:
        yield p


def no_headroom_headers(headers: dict[str, str]) -> bool:
    return not any(name.lower().startswith("x-headroom-") for name in headers)


def test_models_and_embeddings_through_the_sdk(proxy: Proxy) -> None:
    client = proxy.client("pat", api_key="sk-client-1")
    assert [m.id for m in client.models.list()] == ["fake-model"]
    seen = proxy.upstream.received_headers[-1]
    assert seen["authorization"] == "Bearer sk-client-1"
    assert no_headroom_headers(seen)

    raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small",
                                                      input=["a", "b"])
    echo = json.loads(raw.content)
    assert echo["method"] == "POST" and echo["path"] == "/v1/embeddings"
    assert echo["body_len"] > 0
    assert raw.headers["x-upstream"] == "fake"
    assert no_headroom_headers(proxy.upstream.received_headers[-1])
    assert proxy.upstream.received == []  # nothing went the chat route


# OPTIONS is answered by the proxy from its CORS policy, never forwarded (test_auth_gate.py).
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
def test_any_method_and_query_byte_for_byte(proxy: Proxy, method: str) -> None:
    path = "/files/file-abc/content?purpose=batch&limit=2&q=%C3%A9+x"
    body = os.urandom(1000) if method in ("POST", "PUT", "PATCH") else None
    through = httpx.request(method, proxy.base_url + path, content=body,
                            headers={"authorization": "Bearer sk-m", **HEADROOM})
    direct = httpx.request(method, proxy.upstream_url + path, content=body,
                           headers={"authorization": "Bearer sk-m"})
    assert through.status_code == direct.status_code == 200
    assert through.content == direct.content
    if method != "HEAD":
        echo = through.json()
        assert (echo["method"], echo["path"]) == (method, "/v1/files/file-abc/content")
        assert echo["query"] == "purpose=batch&limit=2&q=%C3%A9+x"
        expected = hashlib.sha256(body or b"").hexdigest()
        assert (echo["body_len"], echo["body_sha"]) == (len(body or b""), expected)
    assert through.headers["content-length"] == direct.headers["content-length"]
    assert no_headroom_headers(proxy.upstream.received_headers[-2])


def test_stored_completions_routes_and_encoded_paths_pass_through(proxy: Proxy) -> None:
    """Only POST /v1/chat/completions is ours: listing, reading, updating and deleting stored
    completions go through, and a percent-encoded path is not decoded on the way."""
    for method, path in [("GET", "/chat/completions?limit=2"),
                         ("GET", "/chat/completions/chatcmpl-1/messages"),
                         ("POST", "/chat/completions/chatcmpl-1"),
                         ("DELETE", "/chat/completions/chatcmpl-1"),
                         ("GET", "/models/meta-llama%2FLlama-3.1-8B%20x")]:
        through = httpx.request(method, proxy.base_url + path, headers=HEADROOM)
        direct = httpx.request(method, proxy.upstream_url + path)
        assert through.status_code == 200, (method, path)
        assert through.json() == direct.json()
        assert through.json()["raw_path"] == "/v1" + path.split("?")[0]
    assert proxy.upstream.received == []


def test_upstream_url_with_a_path_prefix(tmp_path: Path, local_embedder: Any) -> None:
    """A gateway that serves the API under a prefix: upstream_url=http://host/prefix/v1."""
    fake = FakeUpstream()
    gateway = Starlette(routes=[Mount("/gateway/openai", app=fake.app())])
    with running_server(gateway) as server, running_proxy(
        tmp_path / "p.db", local_embedder, upstream=fake,
        upstream_url=f"{server.url}/gateway/openai/v1",
    ) as p:
        fake.queue(Reply("Hi from behind a gateway."))
        answer = p.client("pat").chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "Hi from behind a gateway."
        assert [m.id for m in p.client().models.list()] == ["fake-model"]
        echo = httpx.get(f"{p.base_url}/files?x=1").json()
        assert (echo["raw_path"], echo["query"]) == ("/gateway/openai/v1/files", "x=1")


def test_large_uploads_are_streamed_byte_for_byte(proxy: Proxy) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)

    def pieces() -> Iterator[bytes]:  # chunked: no content-length
        for i in range(0, len(data), 64 * 1024):
            yield data[i:i + 64 * 1024]

    for content in (data, pieces()):
        echo = httpx.put(f"{proxy.base_url}/uploads/up_1/parts", content=content,
                         timeout=30).json()
        assert echo["body_len"] == len(data)
        assert echo["body_sha"] == hashlib.sha256(data).hexdigest()

    # A multipart file upload, as the SDK's files.create sends it.
    request = httpx.Request("POST", f"{proxy.base_url}/files", data={"purpose": "batch"},
                            files={"file": ("batch.jsonl", data[:100_000], "application/jsonl")})
    request.read()
    with httpx.Client() as client:
        echo = client.send(request).json()
    assert echo["body_sha"] == hashlib.sha256(request.content).hexdigest()


def test_streaming_responses_are_streamed_untouched(proxy: Proxy) -> None:
    """Legacy completions are not chat: even a `<memory>` block in them passes as is, and the
    first piece arrives while the upstream is still pausing."""
    body = {"model": "gpt-test", "prompt": "Once", "stream": True, "delay": 1.0,
            "prompt_reply": "Hello world<memory>{\"add\":[\"x\"]}</memory>"}
    direct = httpx.post(f"{proxy.upstream_url}/completions", json=body, timeout=30).content
    started = time.monotonic()
    first_at = None
    received = b""
    with httpx.stream("POST", f"{proxy.base_url}/completions", json=body,
                      headers=HEADROOM, timeout=30) as response:
        for chunk in response.iter_raw():
            first_at = first_at or time.monotonic() - started
            received += chunk
    assert received == direct
    assert b"<memory>" in received
    assert first_at is not None and first_at < 0.9
    assert time.monotonic() - started >= 2.0
    assert proxy.upstream.passthrough_bodies[-1] == body


def test_content_encoding_is_kept(proxy: Proxy) -> None:
    compressed = gzip.compress(b'{"compressed": true}' * 50)
    with httpx.stream("GET", f"{proxy.base_url}/gzipped",
                      headers={"accept-encoding": "gzip"}) as response:
        raw = b"".join(response.iter_raw())
        assert response.headers["content-encoding"] == "gzip"
        assert int(response.headers["content-length"]) == len(raw)
    assert gzip.decompress(raw) == gzip.decompress(compressed)
    assert proxy.upstream.received_headers[-1]["accept-encoding"] == "gzip"
    assert httpx.get(f"{proxy.base_url}/gzipped").content == b'{"compressed": true}' * 50


def test_hop_by_hop_headers_are_dropped_end_to_end_ones_kept(proxy: Proxy) -> None:
    response = httpx.post(
        f"{proxy.base_url}/batches", content=b"{}",
        headers={"connection": "keep-alive, x-per-hop", "x-per-hop": "1",
                 "keep-alive": "timeout=5", "te": "trailers", "proxy-authorization": "Basic xx",
                 "x-end-to-end": "kept", "openai-organization": "org-1",
                 "openai-beta": "assistants=v2", "user-agent": "tests/1.0"},
    )
    assert response.status_code == 200
    seen = proxy.upstream.received_headers[-1]
    for dropped in ("x-per-hop", "keep-alive", "te", "proxy-authorization"):
        assert dropped not in seen
    assert seen.get("connection", "keep-alive") == "keep-alive"  # the proxy's own connection
    assert seen["x-end-to-end"] == "kept"
    assert (seen["openai-organization"], seen["openai-beta"]) == ("org-1", "assistants=v2")
    assert seen["user-agent"] == "tests/1.0"
    assert seen["host"] == proxy.upstream_root.removeprefix("http://")
    assert seen["content-length"] == "2"


def test_repeated_response_headers_are_not_merged(proxy: Proxy) -> None:
    """Two Set-Cookie headers (Cloudflare sends them) with commas in their dates: a merged
    header would be unreadable."""
    response = httpx.get(f"{proxy.base_url}/files")
    assert response.headers.get_list("set-cookie") == list(COOKIES)


def test_repeated_headers_survive_on_chat_completions(proxy: Proxy) -> None:
    proxy.upstream.queue(Reply("Hi!", headers={"x-ratelimit-remaining-requests": "99"}))
    response = httpx.post(f"{proxy.base_url}/chat/completions?api-version=2024-06-01",
                          json={"model": "gpt-test", "messages": [{"role": "user",
                                                                   "content": "hi"}]},
                          headers=HEADROOM)
    assert response.status_code == 200
    assert response.headers["x-ratelimit-remaining-requests"] == "99"
    assert proxy.upstream.received_queries[-1] == "api-version=2024-06-01"
    assert no_headroom_headers(proxy.upstream.received_headers[-1])


@pytest.mark.parametrize("user", [None, "quin"])
def test_authorization_client_key_or_configured_upstream_key(
    tmp_path: Path, local_embedder: Any, user: str | None
) -> None:
    # An upstream key means proxy keys (tests/test_auth.py); the explicit open relay keeps the
    # old rule, the client's own key first, for the allowlisted routes.
    with running_proxy(tmp_path / "p.db", local_embedder, upstream_key="sk-upstream",
                       auth="off", allow_unauthenticated=True) as p:
        headers = {"x-headroom-user-id": user} if user else {}
        chat = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
        for path, body in (("/chat/completions", chat), ("/embeddings", {"input": "x"})):
            httpx.post(p.base_url + path, json=body, headers=headers)
            assert p.upstream.received_headers[-1]["authorization"] == "Bearer sk-upstream"
            httpx.post(p.base_url + path, json=body,
                       headers={**headers, "authorization": "Bearer sk-client"})
            assert p.upstream.received_headers[-1]["authorization"] == "Bearer sk-client"
        assert [m.id for m in p.client(user, api_key="sk-sdk").models.list()] == ["fake-model"]
        assert p.upstream.received_headers[-1]["authorization"] == "Bearer sk-sdk"
    # Without a configured key, a client without one sends none either.
    with running_proxy(tmp_path / "q.db", local_embedder) as p:
        httpx.get(f"{p.base_url}/models")
        assert "authorization" not in p.upstream.received_headers[-1]

"""Proxy keys against a real server (uvicorn thread, fake upstream that records what it got, the
official `openai` SDK as client): every route with no key, a wrong, revoked, expired or other
tenant's key, and the right one; user bindings; tenants as namespaces; the operator's upstream key
only on authenticated requests to allowlisted routes; per-key limits; secrets never in logs or
files. Runs on both backends (conftest PROXY_MODULES): on PostgreSQL the memories and the keys
are both there."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest

from headroom.proxy.auth import AuthConfigError, log_policy, resolve_auth
from headroom.proxy.config import ProxyConfig
from headroom.proxy.keys import open_key_store
from tests.backend_targets import key_target
from tests.servers import Proxy, Reply, instructed, memory_block, recalled, running_proxy

OPERATOR_KEY = "sk-operator-5f1c2d9e8b7a"
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "What do I drink?"}]}


@dataclass
class Keys:
    alice: str  # acme, bound to user alice
    acme: str  # acme, any user
    acme_admin: str
    globex: str  # another tenant, any user
    revoked: str
    expired: str
    team: str  # acme, users starting with "team-"
    limited: str  # acme, 2 requests per minute
    ids: dict[str, str]

    def all(self) -> list[str]:
        return [self.alice, self.acme, self.acme_admin, self.globex, self.revoked, self.expired,
                self.team, self.limited]


def make_keys(target: Path | str) -> Keys:
    store = open_key_store(target)
    ids: dict[str, str] = {}

    def create(label: str, tenant: str, **kw: Any) -> str:
        record, secret = store.create(tenant, **kw)
        ids[label] = record.id
        return secret

    keys = Keys(
        alice=create("alice", "acme", user="alice"),
        acme=create("acme", "acme"),
        acme_admin=create("acme_admin", "acme", admin=True),
        globex=create("globex", "globex"),
        revoked=create("revoked", "acme"),
        expired=create("expired", "acme", expires_in=timedelta(microseconds=1)),
        team=create("team", "acme", user_prefix="team-"),
        limited=create("limited", "acme", requests_per_minute=2),
        ids=ids,
    )
    store.revoke(ids["revoked"])
    store.close()
    return keys


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, local_embedder: Any,
          request: pytest.FixtureRequest, proxy_backend: str) -> Iterator[tuple[Proxy, Keys]]:
    """Auth on because an upstream key is configured (loopback bind, `auth=auto`)."""
    root = tmp_path_factory.mktemp("gated")
    target = key_target(request, proxy_backend, root)
    keys = make_keys(target)
    with running_proxy(root / "p.db", local_embedder, upstream_key=OPERATOR_KEY,
                       key_db_path=target) as proxy:
        yield proxy, keys


@pytest.fixture
def keys_at(request: pytest.FixtureRequest, proxy_backend: str, tmp_path: Path) -> Path | str:
    """A fresh key store of this leg's backend, for a test's own server (`key_db_path`)."""
    return key_target(request, proxy_backend, tmp_path)


def bearer(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def assert_error(response: httpx.Response, status: int, type_: str, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == (type_, code)
    assert set(error) >= {"message", "type", "code"} and error["message"]


ROUTES = [
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/responses", {"model": "gpt-test", "input": "hi"}),
    ("POST", "/v1/messages", {"model": "claude-test", "max_tokens": 64,
                              "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/embeddings", {"model": "e", "input": "hi"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/files", None),
    ("GET", "/admin/v1/users", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_refuses_missing_wrong_revoked_and_expired_keys(
    gated: tuple[Proxy, Keys], method: str, path: str, body: Any
) -> None:
    proxy, keys = gated
    before = len(proxy.upstream.received_headers)
    cases = [
        (None, "missing_api_key"),
        ("sk-not-a-proxy-key", "invalid_api_key"),
        ("hk_000000000000_forged", "invalid_api_key"),
        (keys.acme[:-1] + ("A" if keys.acme[-1] != "A" else "B"), "invalid_api_key"),
        (keys.revoked, "api_key_revoked"),
        (keys.expired, "api_key_expired"),
    ]
    for key, code in cases:
        response = httpx.request(method, proxy.url + path, json=body,
                                 headers={**bearer(key), "x-headroom-user-id": "alice"})
        assert_error(response, 401, "authentication_error", code)
    assert len(proxy.upstream.received_headers) == before  # none reached the upstream


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_with_the_right_key(
    gated: tuple[Proxy, Keys], method: str, path: str, body: Any
) -> None:
    proxy, keys = gated
    before = len(proxy.upstream.received_headers)
    response = httpx.request(method, proxy.url + path, json=body, headers=bearer(keys.acme))
    if path == "/v1/files":  # not on the operator key's allowlist
        assert_error(response, 403, "permission_error", "route_not_allowed")
        assert len(proxy.upstream.received_headers) == before
        return
    if path.startswith("/admin/"):  # a tenant key that is not an admin key
        assert_error(response, 403, "permission_error", "admin_key_required")
        response = httpx.request(method, proxy.url + path, headers=bearer(keys.acme_admin))
        assert response.status_code == 200
        return
    assert response.status_code == 200, response.text
    sent = proxy.upstream.received_headers[-1]
    if path == "/v1/messages":  # Anthropic's API takes its key in x-api-key
        assert sent["x-api-key"] == OPERATOR_KEY and "authorization" not in sent
    else:
        assert sent["authorization"] == f"Bearer {OPERATOR_KEY}"  # the proxy key stayed here
    assert keys.acme not in str(sent)


def test_sdk_with_a_proxy_key_as_api_key_plain_and_streaming(gated: tuple[Proxy, Keys]) -> None:
    proxy, keys = gated
    client = proxy.client(api_key=keys.alice)  # only base_url and api_key: the key names alice
    proxy.upstream.queue(Reply("Noted." + memory_block(add=["Drinks green tea"])))
    answer = client.chat.completions.create(**CHAT)
    assert answer.choices[0].message.content == "Noted."
    proxy.settle()
    assert [m.content for m in proxy.memories("acme|alice")] == ["Drinks green tea"]
    assert proxy.memories("alice") == []  # not the keyless default tenant's alice

    proxy.upstream.queue(Reply("Green tea, " + "you said." + memory_block(add=["Likes tea"])))
    stream = client.chat.completions.create(**CHAT, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Green tea, you said."
    assert "Drinks green tea" in (recalled(proxy.upstream.last) or "")
    assert [m.id for m in client.models.list()] == ["fake-model"]
    with pytest.raises(openai.AuthenticationError):
        proxy.client(api_key=keys.revoked).chat.completions.create(**CHAT)


def test_tenants_never_meet(gated: tuple[Proxy, Keys]) -> None:
    proxy, keys = gated
    acme = proxy.client("tenant-test", api_key=keys.acme)
    globex = proxy.client("tenant-test", api_key=keys.globex)
    proxy.upstream.queue(Reply("ok" + memory_block(add=["Bank PIN is 4455"])))
    acme.chat.completions.create(**CHAT)
    proxy.settle()
    assert [m.content for m in proxy.memories("acme|tenant-test")] == ["Bank PIN is 4455"]

    globex.chat.completions.create(model="m", messages=[
        {"role": "user", "content": "What is my bank PIN?"}])
    assert recalled(proxy.upstream.last) is None  # the other tenant's "tenant-test" is not theirs
    memory_id = proxy.memories("acme|tenant-test")[0].id
    proxy.upstream.queue(Reply("ok" + memory_block(forget=[memory_id])))
    globex.chat.completions.create(**CHAT)  # an id it never saw, of another tenant
    proxy.settle()
    assert [m.content for m in proxy.memories("acme|tenant-test")] == ["Bank PIN is 4455"]
    acme.chat.completions.create(model="m", messages=[
        {"role": "user", "content": "What is my bank PIN?"}])
    assert "4455" in (recalled(proxy.upstream.last) or "")


def test_a_bound_key_cannot_act_for_another_user(gated: tuple[Proxy, Keys]) -> None:
    proxy, keys = gated
    url = proxy.base_url + "/chat/completions"
    before = len(proxy.upstream.received)
    for headers, body, status in (
        ({"x-headroom-user-id": "bob"}, CHAT, 403),
        ({}, {**CHAT, "user": "bob"}, 403),
        ({"x-headroom-user-id": "alice"}, {**CHAT, "user": "bob"}, 200),  # the header wins
    ):
        response = httpx.post(url, json=body, headers={**bearer(keys.alice), **headers})
        if status == 403:
            assert_error(response, 403, "permission_error", "user_not_allowed")
        else:
            assert response.status_code == 200
    assert len(proxy.upstream.received) == before + 1
    for user, status in (("team-red", 200), ("bob", 403), ("team", 403)):
        response = httpx.post(url, json=CHAT,
                              headers={**bearer(keys.team), "x-headroom-user-id": user})
        assert response.status_code == status, (user, response.text)


def test_memory_events_name_the_key_that_wrote_them(gated: tuple[Proxy, Keys]) -> None:
    proxy, keys = gated
    proxy.upstream.queue(Reply("ok" + memory_block(add=["Owns a red bicycle"])))
    response = httpx.post(proxy.base_url + "/chat/completions", json=CHAT,
                          headers={**bearer(keys.acme), "x-headroom-user-id": "evented"})
    assert response.headers["x-headroom-request-id"].endswith(f".k-{keys.ids['acme']}")
    memory = proxy.memories("acme|evented")[0]
    events = proxy.run(proxy.engine.get_events(memory.id))
    assert [e["op"] for e in events] == ["add"]
    assert events[0]["request_id"] == response.headers["x-headroom-request-id"]


def test_over_its_request_limit_a_key_gets_answers_without_memory(
    gated: tuple[Proxy, Keys],
) -> None:
    proxy, keys = gated
    client = proxy.client("limited-user", api_key=keys.limited)
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(**CHAT)
        assert "x-headroom-memory-notes" not in raw.headers
        assert instructed(proxy.upstream.last)
    raw = client.chat.completions.with_raw_response.create(**CHAT)
    assert raw.parse().choices[0].message.content == "Hello!"  # the answer still flows
    assert "over its limit of 2 requests/min" in raw.headers["x-headroom-memory-notes"]
    assert not instructed(proxy.upstream.last) and recalled(proxy.upstream.last) is None


def test_the_operator_key_never_reaches_an_unauthenticated_request(
    tmp_path: Path, local_embedder: Any
) -> None:
    # auth off with an upstream key is an explicit open relay: allowlisted routes only.
    with running_proxy(tmp_path / "p.db", local_embedder, upstream_key=OPERATOR_KEY,
                       auth="off", allow_unauthenticated=True) as proxy:
        seen = proxy.upstream.received_headers
        for method, path in (("GET", "/v1/files"), ("DELETE", "/v1/files/file-abc123"),
                             ("GET", "/v1/organization/api_keys")):
            response = httpx.request(method, proxy.url + path)
            assert_error(response, 403, "permission_error", "route_not_allowed")
        assert seen == []
        httpx.get(proxy.base_url + "/models")
        assert seen[-1]["authorization"] == f"Bearer {OPERATOR_KEY}"
        httpx.get(proxy.base_url + "/files", headers=bearer("sk-clients-own"))
        assert seen[-1]["authorization"] == "Bearer sk-clients-own"  # theirs to spend
    # The keyless quick start: no upstream key, so none is ever added; the client's goes on.
    with running_proxy(tmp_path / "q.db", local_embedder) as proxy:
        httpx.get(proxy.base_url + "/files")
        assert "authorization" not in proxy.upstream.received_headers[-1]
        assert proxy.client(api_key="sk-mine").models.list().data[0].id == "fake-model"
        assert proxy.upstream.received_headers[-1]["authorization"] == "Bearer sk-mine"


def _stored_text(proxy: Proxy, keys_at: Path | str, directory: Path) -> dict[str, bytes]:
    """What the proxy left on disk or in the database, by where: files, or PostgreSQL rows."""
    if isinstance(keys_at, Path):
        files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
        assert "p.db" in files and keys_at.name in files
        return files
    stored: dict[str, bytes] = {}
    memory_url = str(proxy.app.state.service.config.db_path)
    for url, tables in ((memory_url, ("memories", "memory_events", "outbox")),
                        (keys_at, ("headroom_keys",))):
        with psycopg.connect(url) as conn:
            for table in tables:
                rows = conn.execute(f"SELECT row_to_json(t)::text FROM {table} t").fetchall()
                stored[table] = "\n".join(r[0] for r in rows).encode()
    assert stored["headroom_keys"] and stored["memories"]
    return stored


def test_keys_never_reach_logs_or_files(
    tmp_path: Path, local_embedder: Any, caplog: pytest.LogCaptureFixture, keys_at: Path | str
) -> None:
    keys = make_keys(keys_at)
    caplog.set_level(logging.DEBUG)
    with running_proxy(tmp_path / "p.db", local_embedder, upstream_key=OPERATOR_KEY,
                       key_db_path=keys_at) as proxy:
        client = proxy.client("secret-user", api_key=keys.acme)
        proxy.upstream.queue(Reply("ok" + memory_block(add=["Keeps a diary"])))
        client.chat.completions.create(**CHAT)
        for key in keys.all():
            httpx.post(proxy.base_url + "/chat/completions", json=CHAT, headers=bearer(key))
        httpx.get(proxy.url + "/admin/v1/users", headers=bearer(keys.acme_admin))
        httpx.get(proxy.url + "/v1/%2e%2e/x", headers=bearer(keys.acme))
        proxy.settle()
        logged = "\n".join(r.getMessage() for r in caplog.records) + repr(proxy.app.state.config)
        stored = _stored_text(proxy, keys_at, tmp_path)
    assert "auth on (an upstream key is configured)" in logged  # the capture saw the server
    secrets = [*keys.all(), OPERATOR_KEY]
    for secret in secrets:
        assert secret not in logged
        secret_part = secret[len("hk_") + 13:] if secret.startswith("hk_") else secret
        for where, text in stored.items():
            assert secret_part.encode() not in text, where


def test_startup_mode_and_why() -> None:
    def policy(**kw: Any) -> Any:
        return resolve_auth(ProxyConfig(db_path="/tmp/x.db", **kw))

    keyless = policy()
    assert (keyless.required, keyless.reason) == (False, "loopback bind without an upstream key")
    assert policy(host="0.0.0.0").required
    assert "not loopback" in policy(host="0.0.0.0").reason
    assert policy(upstream_key="sk-x").reason == "an upstream key is configured"
    assert policy(host="::1").required is False and policy(host="localhost").required is False
    assert policy(auth="on").required
    for risky in ({"host": "0.0.0.0"}, {"upstream_key": "sk-x"}):
        with pytest.raises(AuthConfigError, match="allow-unauthenticated"):
            policy(auth="off", **risky)
        allowed = policy(auth="off", allow_unauthenticated=True, **risky)
        assert not allowed.required and allowed.reason.startswith("--auth off although")
    with pytest.raises(AuthConfigError):
        policy(upstream_routes=("GET /files",))


def test_each_tenant_can_spend_its_own_upstream_key(tmp_path: Path, local_embedder: Any,
                                                    keys_at: Path | str) -> None:
    keys = make_keys(keys_at)
    with running_proxy(tmp_path / "p.db", local_embedder, key_db_path=keys_at,
                       tenant_upstream_keys={"globex": "sk-globex-own"}) as proxy:
        assert proxy.app.state.auth.required  # a tenant key alone means auth is on
        seen = proxy.upstream.received_headers
        proxy.client("u1", api_key=keys.globex).chat.completions.create(**CHAT)
        assert seen[-1]["authorization"] == "Bearer sk-globex-own"
        proxy.client("u1", api_key=keys.acme).chat.completions.create(**CHAT)
        assert "authorization" not in seen[-1]  # acme has none, and the proxy key stays here
        response = httpx.get(proxy.base_url + "/files", headers=bearer(keys.globex))
        assert_error(response, 403, "permission_error", "route_not_allowed")
        assert httpx.get(proxy.base_url + "/files", headers=bearer(keys.acme)).status_code == 200
        assert "authorization" not in seen[-1]


def test_risky_modes_are_logged_loudly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    log_policy(resolve_auth(ProxyConfig(db_path="/tmp/x.db", host="0.0.0.0", auth="off",
                                        allow_unauthenticated=True, upstream_key="sk-x")))
    record = caplog.records[-1]
    assert record.levelno == logging.WARNING and record.getMessage().startswith("AUTH OFF")
    assert "spend the upstream key" in record.getMessage() and "sk-x" not in record.getMessage()
    log_policy(resolve_auth(ProxyConfig(db_path="/tmp/x.db")))
    assert caplog.records[-1].levelno == logging.INFO


def test_a_proxy_key_in_x_api_key_or_api_key_counts_and_stays_here(
    gated: tuple[Proxy, Keys],
) -> None:
    proxy, keys = gated
    for header in ("x-api-key", "api-key"):
        response = httpx.post(proxy.base_url + "/embeddings", json={"input": "x"},
                              headers={header: keys.acme})
        assert response.status_code == 200
        sent = proxy.upstream.received_headers[-1]
        assert header not in sent and sent["authorization"] == f"Bearer {OPERATOR_KEY}"
        assert_error(httpx.post(proxy.base_url + "/embeddings", json={"input": "x"},
                                headers={header: keys.revoked}),
                     401, "authentication_error", "api_key_revoked")
    both = httpx.post(proxy.base_url + "/embeddings", json={"input": "x"},
                      headers={**bearer(keys.acme), "x-api-key": keys.globex})
    assert_error(both, 400, "invalid_request_error", "invalid_header")


def test_over_its_new_memory_limit_a_key_stores_only_forgets(
    tmp_path: Path, local_embedder: Any, keys_at: Path | str
) -> None:
    store = open_key_store(keys_at)
    _, key = store.create("acme", memories_per_minute=2)
    store.close()
    with running_proxy(tmp_path / "p.db", local_embedder, auth="on",
                       key_db_path=keys_at) as proxy:
        client = proxy.client("writer", api_key=key)
        proxy.upstream.queue(Reply("ok" + memory_block(add=["Fact one", "Fact two", "Fact 3"])))
        raw = client.chat.completions.with_raw_response.create(**CHAT)
        assert raw.parse().choices[0].message.content == "ok"  # the answer still flows
        assert "over its limit of 2 new memories/min" in raw.headers["x-headroom-memory-notes"]
        assert proxy.memories("acme|writer") == []  # three asked, two allowed: none stored
        proxy.upstream.queue(Reply("ok" + memory_block(add=["Fact one", "Fact two"])))
        raw = client.chat.completions.with_raw_response.create(**CHAT)
        assert "x-headroom-memory-notes" not in raw.headers
        assert sorted(m.content for m in proxy.memories("acme|writer")) == ["Fact one",
                                                                            "Fact two"]
        raw = client.chat.completions.with_raw_response.create(**CHAT)  # out of new memories
        assert not instructed(proxy.upstream.last)  # the model is not asked to write
        assert "Fact one" in (recalled(proxy.upstream.last) or "")  # recall still runs
        assert "new memories/min" in raw.headers["x-headroom-memory-notes"]


def test_without_an_operator_key_a_client_brings_its_own(tmp_path: Path, local_embedder: Any,
                                                         keys_at: Path | str) -> None:
    keys = make_keys(keys_at)
    with running_proxy(tmp_path / "p.db", local_embedder, auth="on",
                       key_db_path=keys_at) as proxy:
        client = proxy.client("own-key-user", api_key="sk-the-clients-own",
                              **{"X-Api-Key": keys.acme})
        client.chat.completions.create(**CHAT)
        sent = proxy.upstream.received_headers[-1]
        assert sent["authorization"] == "Bearer sk-the-clients-own" and "x-api-key" not in sent
        with pytest.raises(openai.AuthenticationError):  # its own key alone is no proxy key
            proxy.client("own-key-user", api_key="sk-the-clients-own").models.list()


def test_the_new_memory_limit_holds_for_streamed_answers(tmp_path: Path, local_embedder: Any,
                                                         keys_at: Path | str) -> None:
    store = open_key_store(keys_at)
    _, key = store.create("acme", memories_per_minute=1)
    store.close()
    with running_proxy(tmp_path / "p.db", local_embedder, auth="on",
                       key_db_path=keys_at) as proxy:
        client = proxy.client("streamer", api_key=key)
        proxy.upstream.queue(Reply("Two facts." + memory_block(add=["Fact A", "Fact B"])),
                             Reply("One fact." + memory_block(add=["Fact C"])))
        for expected in ("Two facts.", "One fact."):
            stream = client.chat.completions.create(**CHAT, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream
                           if c.choices) == expected
            proxy.settle()
        assert [m.content for m in proxy.memories("acme|streamer")] == ["Fact C"]


def test_a_key_made_or_revoked_anywhere_counts_at_once_on_every_replica(
    tmp_path: Path, local_embedder: Any, keys_at: Path | str
) -> None:
    """Two servers on one database and one key store (replicas), keys managed from outside them
    (as `headroom keys` does): no replica serves a revoked key, none needs a restart."""
    with running_proxy(tmp_path / "p.db", local_embedder, auth="on",
                       key_db_path=keys_at) as replica_a, \
            running_proxy(tmp_path / "p.db", local_embedder, auth="on",
                          key_db_path=keys_at) as replica_b:
        admin = open_key_store(keys_at)
        try:
            record, key = admin.create("acme", user="alice")
            for replica in (replica_a, replica_b):  # both, without waiting
                answer = replica.client("alice", api_key=key).chat.completions.create(**CHAT)
                assert answer.choices[0].message.content == "Hello!"
            admin.revoke(record.id)
            for replica in (replica_a, replica_b):
                assert_error(httpx.post(replica.base_url + "/chat/completions", json=CHAT,
                                        headers={**bearer(key), "x-headroom-user-id": "alice"}),
                             401, "authentication_error", "api_key_revoked")
        finally:
            admin.close()

"""The admin HTTP API against a real server: an app's backend lists, searches, reads, traces,
forgets, exports and purges its users' memories; other tenants and non-admin keys see nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from headroom.proxy.keys import open_key_store
from tests.backend_targets import key_target
from tests.servers import Proxy, Reply, memory_block, running_proxy

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}]}


@dataclass
class Setup:
    proxy: Proxy
    acme: str
    acme_id: str
    admin: str
    admin_id: str
    globex_admin: str
    alice_admin: str  # acme admin bound to user alice
    revoked_admin: str


def write(proxy: Proxy, key: str, user: str, *facts: str) -> None:
    proxy.upstream.queue(Reply("ok" + memory_block(add=list(facts))))
    response = httpx.post(proxy.base_url + "/chat/completions", json=CHAT,
                          headers={"authorization": f"Bearer {key}", "x-headroom-user-id": user})
    assert response.status_code == 200
    proxy.settle()


@pytest.fixture
def setup(tmp_path: Path, local_embedder: Any, request: pytest.FixtureRequest,
          proxy_backend: str) -> Iterator[Setup]:
    keys = key_target(request, proxy_backend, tmp_path)  # the gate reads this leg's store
    store = open_key_store(keys)
    acme_rec, acme = store.create("acme")
    admin_rec, admin = store.create("acme", admin=True)
    _, globex = store.create("globex")
    _, globex_admin = store.create("globex", admin=True)
    _, alice_admin = store.create("acme", admin=True, user="alice")
    revoked_rec, revoked_admin = store.create("acme", admin=True)
    store.revoke(revoked_rec.id)
    store.close()
    with running_proxy(tmp_path / "p.db", local_embedder, auth="on", warm=False,
                       key_db_path=keys) as proxy:
        write(proxy, acme, "alice", "Lives in Lisbon", "Has a cat named Miso")
        write(proxy, acme, "bob", "Allergic to peanuts")
        write(proxy, globex, "alice", "Works night shifts")
        yield Setup(proxy, acme, acme_rec.id, admin, admin_rec.id, globex_admin, alice_admin,
                    revoked_admin)


def admin(s: Setup, method: str, path: str, key: str | None = None, **params: Any) -> Any:
    return httpx.request(method, f"{s.proxy.url}/admin/v1{path}", params=params,
                         headers={"authorization": f"Bearer {key or s.admin}"})


def contents(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return sorted(m["content"] for m in response.json()["data"])


def test_users_list_and_search_stay_in_the_tenant(setup: Setup) -> None:
    users = admin(setup, "GET", "/users").json()["data"]
    assert sorted((u["user_id"], u["memories"]) for u in users) == [("alice", 2), ("bob", 1)]
    globex = admin(setup, "GET", "/users", setup.globex_admin).json()["data"]
    assert globex == [{"user_id": "alice", "memories": 1}]

    assert contents(admin(setup, "GET", "/memories", user="alice")) == [
        "Has a cat named Miso", "Lives in Lisbon"]
    assert contents(admin(setup, "GET", "/memories", setup.globex_admin, user="alice")) == [
        "Works night shifts"]
    memory = admin(setup, "GET", "/memories", user="alice").json()["data"][0]
    assert memory["user_id"] == "alice" and "embedding" not in memory

    found = admin(setup, "GET", "/memories/search", user="alice", q="What pet do I have?")
    assert found.json()["data"][0]["content"] == "Has a cat named Miso"
    assert all(m["user_id"] == "alice" for m in found.json()["data"])
    nothing = admin(setup, "GET", "/memories/search", setup.globex_admin, user="alice",
                    q="cat named Miso")
    assert "Has a cat named Miso" not in [m["content"] for m in nothing.json()["data"]]


def test_get_history_and_forget_name_the_key(setup: Setup) -> None:
    memory = admin(setup, "GET", "/memories", user="bob").json()["data"][0]
    one = admin(setup, "GET", f"/memories/{memory['id']}")
    assert one.json()["content"] == "Allergic to peanuts"
    assert admin(setup, "GET", f"/memories/{memory['id']}", user="alice").status_code == 404
    assert admin(setup, "GET", f"/memories/{memory['id']}", setup.globex_admin).status_code == 404
    assert admin(setup, "DELETE", f"/memories/{memory['id']}",
                 setup.globex_admin).status_code == 404

    forgotten = admin(setup, "DELETE", f"/memories/{memory['id']}")
    assert forgotten.status_code == 200 and forgotten.json()["forgotten_at"]
    assert contents(admin(setup, "GET", "/memories", user="bob")) == []
    history = admin(setup, "GET", f"/memories/{memory['id']}/history").json()
    assert [e["op"] for e in history["events"]] == ["add", "forget"]
    assert [e["key_id"] for e in history["events"]] == [setup.acme_id, setup.admin_id]
    assert history["chain"][0]["user_id"] == "bob"
    again = admin(setup, "DELETE", f"/memories/{memory['id']}")
    assert again.status_code == 400


def test_export_and_purge_one_user(setup: Setup) -> None:
    exported = admin(setup, "GET", "/export", user="alice")
    assert exported.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in exported.text.splitlines()]
    assert lines[0]["format"] == "headroom-memory-export" and lines[0]["user_id"] == "alice"
    assert sorted(m["content"] for m in lines[1:]) == ["Has a cat named Miso", "Lives in Lisbon"]
    assert {m["user_id"] for m in lines[1:]} == {"alice"}

    purged = admin(setup, "DELETE", "/memories", user="alice")
    assert purged.status_code == 200 and purged.json()["purged"]["memories"] == 2
    assert contents(admin(setup, "GET", "/memories", user="alice")) == []
    assert contents(admin(setup, "GET", "/memories", user="bob")) == ["Allergic to peanuts"]
    assert contents(admin(setup, "GET", "/memories", setup.globex_admin, user="alice")) == [
        "Works night shifts"]  # the other tenant's alice is untouched


@pytest.mark.parametrize("route", [
    ("GET", "/users", {}), ("GET", "/memories", {"user": "alice"}),
    ("GET", "/memories/search", {"user": "alice", "q": "cat"}),
    ("GET", "/export", {"user": "alice"}), ("DELETE", "/memories", {"user": "alice"}),
])
def test_admin_routes_refuse_without_an_admin_key(setup: Setup, route: Any) -> None:
    method, path, params = route
    url = f"{setup.proxy.url}/admin/v1{path}"
    for headers, status, code in (
        ({}, 401, "missing_api_key"),
        ({"authorization": "Bearer hk_000000000000_nope"}, 401, "invalid_api_key"),
        ({"authorization": f"Bearer {setup.revoked_admin}"}, 401, "api_key_revoked"),
        ({"authorization": f"Bearer {setup.acme}"}, 403, "admin_key_required"),
    ):
        response = httpx.request(method, url, params=params, headers=headers)
        assert response.status_code == status, (headers, response.text)
        assert response.json()["error"]["code"] == code
    assert contents(admin(setup, "GET", "/memories", user="alice")) == [
        "Has a cat named Miso", "Lives in Lisbon"]


def test_an_admin_key_bound_to_one_user(setup: Setup) -> None:
    key = setup.alice_admin
    assert [u["user_id"] for u in admin(setup, "GET", "/users", key).json()["data"]] == ["alice"]
    assert admin(setup, "GET", "/memories", key, user="alice").status_code == 200
    refused = admin(setup, "GET", "/memories", key, user="bob")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "user_not_allowed"
    bob_memory = admin(setup, "GET", "/memories", user="bob").json()["data"][0]
    assert admin(setup, "GET", f"/memories/{bob_memory['id']}", key).status_code == 404
    assert admin(setup, "DELETE", "/memories", key, user="bob").status_code == 403


def test_bad_admin_requests_are_400(setup: Setup) -> None:
    assert admin(setup, "GET", "/memories").json()["error"]["param"] == "user"
    assert admin(setup, "GET", "/memories", user="a b").status_code == 400
    assert admin(setup, "GET", "/memories", user="alice", limit="lots").status_code == 400
    assert admin(setup, "GET", "/memories/search", user="alice").status_code == 400
    bad_flag = admin(setup, "GET", "/memories", user="alice", include_superseded="maybe")
    assert bad_flag.status_code == 400
    assert bad_flag.json()["error"]["param"] == "include_superseded"
    assert admin(setup, "GET", "/memories", user="alice",
                 include_superseded="false").status_code == 200
    headers = {"authorization": f"Bearer {setup.admin}"}
    base = f"{setup.proxy.url}/admin/v1/memories"
    # A repeated user, or bytes that are not UTF-8, would name a user the caller did not mean.
    twice = httpx.request("DELETE", base, params=[("user", "alice"), ("user", "bob")],
                          headers=headers)
    assert twice.status_code == 400 and twice.json()["error"]["param"] == "user"
    not_utf8 = httpx.request("DELETE", base + "?user=%ff%fe", headers=headers)
    assert not_utf8.status_code == 400 and not_utf8.json()["error"]["param"] == "user"
    assert contents(admin(setup, "GET", "/memories", user="alice")) == [
        "Has a cat named Miso", "Lives in Lisbon"]  # nothing was purged
    # A real U+FFFD, percent-encoded as UTF-8, is a valid id like any other.
    assert httpx.get(base + "?user=a%EF%BF%BDb", headers=headers).status_code == 200


def test_admin_work_over_the_key_limit_is_429(
    tmp_path: Path, local_embedder: Any, request: pytest.FixtureRequest, proxy_backend: str
) -> None:
    keys = key_target(request, proxy_backend, tmp_path)
    store = open_key_store(keys)
    _, key = store.create("acme", admin=True, requests_per_minute=2)
    store.close()
    with running_proxy(tmp_path / "p.db", local_embedder, auth="on", key_db_path=keys) as proxy:
        url = f"{proxy.url}/admin/v1/users"
        headers = {"authorization": f"Bearer {key}"}
        assert [httpx.get(url, headers=headers).status_code for _ in range(2)] == [200, 200]
        over = httpx.get(url, headers=headers)
        assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
        assert over.json()["error"]["type"] == "rate_limit_error"


def test_keyless_loopback_admin_sees_the_default_tenant(tmp_path: Path, local_embedder: Any,
                                                      ) -> None:
    with running_proxy(tmp_path / "p.db", local_embedder) as proxy:
        proxy.upstream.queue(Reply("ok" + memory_block(add=["Runs marathons"])))
        proxy.client("local-user").chat.completions.create(**CHAT)
        proxy.settle()
        users = httpx.get(f"{proxy.url}/admin/v1/users").json()["data"]
        assert users == [{"user_id": "local-user", "memories": 1}]
        foreign = httpx.get(f"{proxy.url}/admin/v1/users",
                            headers={"origin": "https://evil.example"})
        assert foreign.status_code == 403

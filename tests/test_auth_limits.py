"""Per-key limits as pure logic: the token bucket with a fake clock, the new-memory check a
block's ops go through, and the request scope a key over its memory limit gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from starlette.datastructures import Headers

from headroom.memory.models import AddOp, ForgetOp, MemoryOps, UpdateOp
from headroom.proxy.auth import AuthMiddleware, resolve_auth
from headroom.proxy.config import ProxyConfig
from headroom.proxy.keys import open_key_store
from headroom.proxy.limits import RateLimiter, admit_new_memories
from headroom.proxy.scope import KEYLESS, MemoryMode, Principal, RequestScope, scope_from_request


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_spends_and_refills_over_a_minute() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    assert [limiter.take("k", "requests", 3) for _ in range(4)] == [True, True, True, False]
    assert limiter.retry_after("k", "requests", 3) == 20
    clock.now += 20  # a third of a minute: one of three back
    assert limiter.take("k", "requests", 3) and not limiter.take("k", "requests", 3)
    assert limiter.take("other", "requests", 3)  # per key
    assert limiter.take("k", "memories", 3)  # per kind
    assert all(limiter.take("k", "requests", None) for _ in range(100))  # None: no limit
    assert not limiter.take("z", "requests", 0)


OPS = MemoryOps(add=(AddOp("a"), AddOp("b")), update=(UpdateOp("m1", "c"),),
                forget=(ForgetOp("m2"),))


def principal(limiter: RateLimiter, per_minute: int | None) -> Principal:
    return Principal(tenant="acme", key_id="k1", memories_per_minute=per_minute, limiter=limiter)


def test_new_memories_over_the_limit_keep_only_the_forgets() -> None:
    limiter = RateLimiter(Clock())
    who = principal(limiter, 4)
    assert admit_new_memories(OPS, who) == OPS  # 3 of 4
    assert admit_new_memories(OPS, who) == MemoryOps(forget=(ForgetOp("m2"),))
    assert who.notes == ["memory writes skipped: key over its limit of 4 new memories/min"]
    assert admit_new_memories(OPS, principal(limiter, None)) == OPS
    assert admit_new_memories(OPS, KEYLESS) == OPS  # keyless: no limit
    assert admit_new_memories(OPS) == OPS  # nothing bound: keyless


def test_a_key_out_of_new_memories_gets_recall_only() -> None:
    limiter = RateLimiter(Clock())
    who = principal(limiter, 1)
    headers = {"x-headroom-user-id": "alice"}
    assert scope_from_request(headers, None, who).mode is MemoryMode.ON
    admit_new_memories(MemoryOps(add=(AddOp("a"),)), who)  # the one it had
    rs = scope_from_request(headers, None, who)
    assert rs.mode is MemoryMode.READ and rs.scope is not None
    assert rs.scope.user_id == "acme|alice"
    assert "new memories/min" in who.notes[-1]
    write_only = scope_from_request({**headers, "x-headroom-memory": "write"}, None, who)
    assert write_only.mode is MemoryMode.OFF
    assert scope_from_request({**headers, "x-headroom-memory": "read"}, None,
                              who).mode is MemoryMode.READ


async def test_the_gates_notes_join_the_turns_own(tmp_path: Path) -> None:
    store = open_key_store(tmp_path / "k.db")
    _, key = store.create("acme", requests_per_minute=0)
    seen: list[RequestScope] = []

    async def turn(scope: Any, receive: Any, send: Any) -> None:  # stands in for the pipeline
        seen.append(scope_from_request(Headers(scope=scope), None))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-headroom-memory-notes", b"recall off: not ready")]})
        await send({"type": "http.response.body", "body": b"{}"})

    config = ProxyConfig(db_path=tmp_path / "m.db", key_db_path=tmp_path / "k.db", auth="on")
    gate = AuthMiddleware(turn, resolve_auth(config), store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(gate), base_url="http://t") as c:
        response = await c.post("/v1/chat/completions", json={},
                                headers={"authorization": f"Bearer {key}",
                                         "x-headroom-user-id": "alice"})
    assert response.headers.get_list("x-headroom-memory-notes") == [
        "recall off: not ready; memory skipped: key over its limit of 0 requests/min"]
    assert seen[0].mode is MemoryMode.OFF and seen[0].scope is not None

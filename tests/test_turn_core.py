"""The transport-free turn (headroom/turn/turn.py) on a real engine with the fake embedder:
prepare → strip → store, the query cap, the bounded durable store and fail-open."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from headroom.memory.db import connect
from headroom.memory.models import MemoryConfig, MemoryFilter, Scope
from headroom.turn import CHAT_COMPLETIONS, ChunkRewriter, MemoryService, RecallSettings, Turn
from headroom.turn.inject import EXTRACTION_INSTRUCTION, MAX_QUERY_CHARS, cap_query
from tests.fakes import FakeEmbedder

USER = Scope("tess")


@pytest.fixture
async def service(tmp_path: Path, fake_embedder: FakeEmbedder) -> AsyncIterator[MemoryService]:
    svc = MemoryService(MemoryConfig(db_path=tmp_path / "t.db"), embedder=fake_embedder)
    await svc.start(warm=False)
    try:
        yield svc
    finally:
        await svc.stop(10)


def turn(service: MemoryService, **kwargs: Any) -> Turn:
    return Turn(CHAT_COMPLETIONS, service, USER, request_id="hr-test", **kwargs)


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


def completion(content: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}]}


async def test_a_whole_turn_recalls_strips_and_stores(service: MemoryService) -> None:
    assert service.engine is not None
    await service.engine.add("Tess keeps bees", USER.user_id)
    t = turn(service)
    body = chat("do I keep bees?")
    sent = await t.prepare(body)
    assert body == chat("do I keep bees?")  # the caller's body is never modified
    assert sent["messages"][0] == {"role": "system", "content": EXTRACTION_INSTRUCTION}
    assert "Tess keeps bees" in sent["messages"][1]["content"]
    assert t.receipt()["x-headroom-memories-injected"] == "1"

    clean, block = t.strip_answer(completion('Yes. <memory>{"add":["Tess sells honey"]}</memory>'))
    assert clean["choices"][0]["message"]["content"] == "Yes."
    await t.store(block)
    assert t.stored is True  # durable (in the outbox) when store returns
    await service.flush(10)
    rows = await service.engine.query(MemoryFilter(user_id=USER.user_id, limit=None))
    assert sorted(m.content for m in rows) == ["Tess keeps bees", "Tess sells honey"]


async def test_the_embedded_query_is_capped(
    service: MemoryService, fake_embedder: FakeEmbedder
) -> None:
    """Issue 9: two 20 MB requests stalled recall for every user."""
    huge = "start of a pasted file " + "lorem ipsum " * 400_000 + " so what do I keep?"
    started = time.monotonic()
    await turn(service).prepare(chat(huge))
    assert time.monotonic() - started < 5
    embedded = [t for batch in fake_embedder.calls for t in batch]
    assert embedded and all(len(t) <= MAX_QUERY_CHARS for t in embedded)
    assert embedded[-1].startswith("start of a pasted file")
    assert embedded[-1].endswith("so what do I keep?")


def test_cap_query_keeps_head_and_tail() -> None:
    assert cap_query("short") == "short"
    capped = cap_query("a" * 3000 + "b" * 3000, limit=11)
    assert capped == "aaaaa\nbbbbb" and len(capped) == 11


@pytest.mark.sqlite_only("holds the SQLite file's write lock from another connection")
async def test_store_waits_only_its_bound_then_keeps_the_ops_queued(
    service: MemoryService,
) -> None:
    assert service.engine is not None
    t = turn(service, durable_wait_s=0.2)
    await t.prepare(chat("hi"))
    _, block = t.strip_answer(completion('Ok. <memory>{"add":["Tess waits for locks"]}</memory>'))
    # The engine's own SQLite library: two libraries in one process do not see each other's
    # locks (POSIX locks are per process).
    locker = connect(service.config.db_path)
    locker.execute("BEGIN IMMEDIATE")  # as if another process held the write lock
    try:
        started = time.monotonic()
        await t.store(block)
        assert 0.2 <= time.monotonic() - started < 1.0
        assert t.stored is False
        assert service.counters["ops_answered_before_durable"] == 1
        assert service.pending_writes == 1
    finally:
        await asyncio.sleep(0.3)
        locker.execute("ROLLBACK")
        locker.close()
    await service.flush(30)
    rows = await service.engine.query(MemoryFilter(user_id=USER.user_id, limit=None))
    assert [m.content for m in rows] == ["Tess waits for locks"]


async def test_json_modes_and_logprobs_ask_for_no_block(service: MemoryService) -> None:
    for extra in ({"response_format": {"type": "json_object"}}, {"logprobs": True}):
        t = turn(service)
        sent = await t.prepare(chat("hi", **extra))
        assert sent["messages"][0]["role"] == "user"
        assert "extraction off" in t.receipt()["x-headroom-memory-notes"]
        _, block = t.strip_answer(completion('{"a": 1} <memory>{"add":["x"]}</memory>'))
        await t.store(block)
        assert t.stored is None  # nothing was asked for, so nothing is stored


@pytest.mark.sqlite_only("a SQLite path that cannot be created")
async def test_without_a_database_the_request_goes_as_it_came(tmp_path: Path) -> None:
    svc = MemoryService(MemoryConfig(db_path=tmp_path / "missing" / "dir" / "x.db"))
    (tmp_path / "missing").write_text("a file where a directory should be")
    await svc.start(warm=False)
    try:
        t = turn(svc)
        body = chat("hi")
        assert await t.prepare(body) is body
        assert t.receipt()["x-headroom-memory-notes"] == "memory off: database unavailable"
    finally:
        await svc.stop(1)


async def test_per_call_settings(service: MemoryService) -> None:
    assert service.engine is not None
    for text in ("Tess grows basil", "Tess grows thyme", "Tess grows mint"):
        await service.engine.add(text, USER.user_id)
    wide, narrow = turn(service), turn(service, settings=RecallSettings(top_k=1))
    assert (await wide.prepare(chat("what does tess grow"))) and wide.injected == 3
    assert (await narrow.prepare(chat("what does tess grow?"))) and narrow.injected == 1


def test_chunk_rewriter_never_modifies_its_input() -> None:
    rw = ChunkRewriter()
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": "Hi <mem"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "ory>{}</memory>"},
                      "finish_reason": "stop"}]},
    ]
    before = copy.deepcopy(chunks)
    out = [c for chunk in chunks for c in rw.feed(chunk)] + rw.finish()
    assert chunks == before
    assert [c["choices"][0]["delta"]["content"] for c in out] == ["Hi", ""]
    assert rw.chosen_block is not None and rw.chosen_block.body == "{}"
    plain = {"choices": [{"index": 1, "delta": {"content": "x"}, "finish_reason": None}]}
    assert rw.feed(plain)[0] is plain  # unchanged: the very same object

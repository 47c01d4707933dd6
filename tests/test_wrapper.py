"""`with_memory(client, user_id=...)` in-process: the official `openai` SDK (sync, async, streaming,
and a sync client called from inside a running event loop) against the fake upstream, with the
real MiniLM, sqlite-vec and FTS5 underneath; plus the `.memory` API of the spec."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from headroom import MemoryCategory, MemoryConfig, with_memory
from headroom.memory.errors import ConfigError
from headroom.turn import runtime
from tests.fakes import FakeEmbedder
from tests.servers import (
    FakeUpstream,
    GatedEmbedder,
    Reply,
    instructed,
    memory_block,
    recalled,
    running_upstream,
)

GO = "Prefers Go for performance-critical code"


_sync_clients: list[OpenAI] = []


@pytest.fixture(scope="module")
def module_upstream() -> Iterator[tuple[str, FakeUpstream]]:
    """One fake upstream server for the whole module."""
    with running_upstream() as (url, fake):
        yield url + "/v1", fake


@pytest.fixture
def upstream(module_upstream: tuple[str, FakeUpstream]) -> Iterator[tuple[str, FakeUpstream]]:
    module_upstream[1].reset()
    yield module_upstream
    runtime.close_all()  # drain and stop every runtime this test opened (each has its own db)
    while _sync_clients:  # unclosed pools warn (an error here) when collected
        _sync_clients.pop().close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "wrapper.db"


def sync_client(url: str) -> OpenAI:
    client = OpenAI(base_url=url, api_key="sk-test", max_retries=0)
    _sync_clients.append(client)
    return client


def async_client(url: str) -> AsyncOpenAI:
    """The test closes it, on its own event loop."""
    return AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0)


def user_says(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_spec_multi_session_example(
    upstream: tuple[str, FakeUpstream], db: Path, local_embedder: Any
) -> None:
    url, fake = upstream
    client1 = with_memory(sync_client(url), user_id="bob", session_id="morning-session",
                          db_path=db, embedder=local_embedder)
    fake.queue(Reply("Go is a fine choice. " + memory_block(
        [{"text": GO, "category": "preference", "importance": 0.8, "scope": "user"}])))
    response = client1.chat.completions.create(
        model="gpt-4o", messages=user_says("I prefer Go for performance-critical code")
    )
    assert response.choices[0].message.content == "Go is a fine choice."
    assert instructed(fake.last)

    client2 = with_memory(sync_client(url), user_id="bob", session_id="afternoon-session",
                          db_path=db, embedder=local_embedder)
    fake.queue(Reply("Go, as you prefer."))
    response = client2.chat.completions.create(
        model="gpt-4o", messages=user_says("What language for my new microservice?")
    )
    assert response.choices[0].message.content == "Go, as you prefer."
    assert GO in (recalled(fake.last) or "")  # recalled from the morning session
    [memory] = client2.memory.get_all()
    assert (memory.content, memory.category) == (GO, MemoryCategory.PREFERENCE)


def test_sync_streaming(upstream: tuple[str, FakeUpstream], db: Path, local_embedder: Any) -> None:
    url, fake = upstream
    client = with_memory(sync_client(url), user_id="cleo", db_path=db, embedder=local_embedder)
    answer = "A streamed answer, in random pieces."
    for seed in range(3):
        fake.queue(Reply(f"{answer} " + memory_block(["Likes streamed answers"]),
                         chunk_seed=seed))
        with client.chat.completions.create(model="gpt-test", stream=True,
                                            messages=user_says("stream it")) as stream:
            pieces = [c.delta.content or "" for chunk in stream for c in chunk.choices]
        assert "".join(pieces) == answer
        assert not any("<" in p for p in pieces)
    # Three times the same block: one row, reinforced.
    assert [m.content for m in client.memory.get_all()] == ["Likes streamed answers"]
    assert client.memory.stats()["rows"] == 1


async def test_async_client(upstream: tuple[str, FakeUpstream], db: Path,
                            local_embedder: Any) -> None:
    url, fake = upstream
    async with async_client(url) as inner:
        client = with_memory(inner, user_id="dan", db_path=db, embedder=local_embedder)
        await _async_story(client, fake)


async def _async_story(client: Any, fake: FakeUpstream) -> None:
    fake.queue(Reply("Sure. " + memory_block(["Uses asyncio at work"])))
    response = await client.chat.completions.create(model="gpt-test",
                                                    messages=user_says("I use asyncio"))
    assert response.choices[0].message.content == "Sure."

    fake.queue(Reply("Yes, asyncio. " + memory_block(["Prefers trio for side projects"]),
                     chunk_seed=5))
    stream = await client.chat.completions.create(model="gpt-test", stream=True,
                                                  messages=user_says("What do I use at work?"))
    text = "".join([c.delta.content or "" async for chunk in stream for c in chunk.choices])
    assert text == "Yes, asyncio."
    assert "Uses asyncio at work" in (recalled(fake.last) or "")  # read-your-writes
    results = await client.memory.search("asynchronous python", top_k=5)
    assert {m.content for m in results} == {"Uses asyncio at work",
                                            "Prefers trio for side projects"}


async def test_sync_client_inside_a_running_event_loop(
    upstream: tuple[str, FakeUpstream], db: Path, local_embedder: Any
) -> None:
    asyncio.get_running_loop()  # we are inside one
    url, fake = upstream
    client = with_memory(sync_client(url), user_id="eve", db_path=db, embedder=local_embedder)
    fake.queue(Reply("Noted. " + memory_block(["Writes async code with a sync client"])))
    response = client.chat.completions.create(model="gpt-test", messages=user_says("hi"))
    assert response.choices[0].message.content == "Noted."
    fake.queue(Reply("Streaming too.", chunk_seed=2))
    text = "".join(c.delta.content or "" for chunk in client.chat.completions.create(
        model="gpt-test", stream=True, messages=user_says("how do I write code?"))
        for c in chunk.choices)
    assert text == "Streaming too."
    assert "Writes async code with a sync client" in (recalled(fake.last) or "")
    assert [m.content for m in client.memory.get_all()] == [
        "Writes async code with a sync client"
    ]


def test_memory_api(upstream: tuple[str, FakeUpstream], db: Path, local_embedder: Any) -> None:
    url, _ = upstream
    client = with_memory(sync_client(url), user_id="alice", db_path=db, embedder=local_embedder)
    other = with_memory(sync_client(url), user_id="mallory", db_path=db,
                        embedder=local_embedder)
    client.memory.add("User is a senior engineer", category="fact", importance=0.9)
    client.memory.add("Prefers Python for backend work", category=MemoryCategory.PREFERENCE)
    other.memory.add("Prefers Rust for everything", category="preference")

    results = client.memory.search("python preferences", top_k=5)
    assert results[0].content == "Prefers Python for backend work"
    assert all(m.user_id == "alice" for m in results)
    assert sorted(m.content for m in client.memory.get_all()) == [
        "Prefers Python for backend work", "User is a senior engineer",
    ]
    stats = client.memory.stats()
    assert stats["total"] == 2
    assert stats["categories"] == {"fact": 1, "preference": 1}

    counts = client.memory.clear()
    assert counts["memories"] == 2
    assert client.memory.get_all() == []
    assert client.memory.stats()["total"] == 0
    assert [m.content for m in other.memory.get_all()] == ["Prefers Rust for everything"]


def test_users_isolated_and_other_attributes_pass_through(
    upstream: tuple[str, FakeUpstream], db: Path, local_embedder: Any
) -> None:
    url, fake = upstream
    alice = with_memory(sync_client(url), user_id="alice", db_path=db, embedder=local_embedder)
    bob = with_memory(sync_client(url), user_id="bob", db_path=db, embedder=local_embedder)
    fake.queue(Reply("Ok. " + memory_block(["Allergic to peanuts"])))
    alice.chat.completions.create(model="gpt-test", messages=user_says("peanuts are bad"))
    fake.queue(Reply("Dunno."))
    bob.chat.completions.create(model="gpt-test", messages=user_says("am I allergic to peanuts?"))
    assert recalled(fake.last) is None
    assert bob.memory.get_all() == []
    assert [m.id for m in bob.models.list()] == ["fake-model"]

    # The SDK's own errors reach the caller unchanged; memory does not get in their way.
    fake.queue(Reply(status=429))
    with pytest.raises(openai.RateLimitError):
        bob.chat.completions.create(model="gpt-test", messages=user_says("hi"))


def test_response_format_json_has_no_instruction(
    upstream: tuple[str, FakeUpstream], db: Path, local_embedder: Any
) -> None:
    url, fake = upstream
    client = with_memory(sync_client(url), user_id="fay", db_path=db, embedder=local_embedder)
    client.memory.add("Likes green tea", category="preference")
    fake.queue(Reply('{"drink": "green tea"}'))
    response = client.chat.completions.create(
        model="gpt-test", response_format={"type": "json_object"},
        messages=user_says("What do I drink? JSON please."),
    )
    assert response.choices[0].message.content == '{"drink": "green tea"}'
    assert not instructed(fake.last)
    assert "Likes green tea" in (recalled(fake.last) or "")


def test_stream_closed_early_keeps_a_block_that_had_arrived(
    upstream: tuple[str, FakeUpstream], db: Path, local_embedder: Any
) -> None:
    """Like a client disconnecting from the proxy: the caller stops reading before the finish
    chunk (here at the tool-call delta that follows the text); the block that had fully arrived
    is still stored, once."""
    url, fake = upstream
    client = with_memory(sync_client(url), user_id="gus", db_path=db, embedder=local_embedder)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": "{}"}}
    fake.queue(Reply("Short answer. " + memory_block(["Leaves streams early"]),
                     tool_calls=[call], hold_before_finish_s=0.5, chunk_seed=3))
    text = ""
    with client.chat.completions.create(model="gpt-test", stream=True,
                                        messages=user_says("quick")) as stream:
        for chunk in stream:
            text += "".join(c.delta.content or "" for c in chunk.choices)
            if any(c.delta.tool_calls for c in chunk.choices):
                break
    assert text == "Short answer."
    assert [m.content for m in client.memory.get_all()] == ["Leaves streams early"]


# --- fail open, and settings per wrapper (issue 9, item 8) ----------------------------------------


def test_importing_the_wrapper_loads_no_web_stack() -> None:
    code = (
        "import sys\n"
        "import headroom.wrapper\n"
        "from headroom import with_memory\n"
        "loaded = [m for m in sys.modules if m.startswith(('headroom.proxy', 'starlette', "
        "'uvicorn'))]\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == ""


def test_embedder_down_the_call_goes_on_without_memory(
    upstream: tuple[str, FakeUpstream], db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, fake = upstream
    embedder = FakeEmbedder()
    client = with_memory(sync_client(url), user_id="hal", db_path=db, embedder=embedder)
    client.memory.add("Likes green tea", category="preference")
    embedder.fail_with = RuntimeError("embedding service down")
    for stream in (False, True, False):
        fake.queue(Reply("Tea. " + memory_block(["Drinks it at 5pm"]), chunk_seed=1))
        started = time.monotonic()
        response = client.chat.completions.create(model="gpt-test", stream=stream,
                                                  messages=user_says("what do I drink?"))
        text = ("".join(c.delta.content or "" for chunk in response for c in chunk.choices)
                if stream else response.choices[0].message.content)
        assert text == "Tea."
        assert recalled(fake.last) is None
        # At most one bounded wait for the writes the stuck writer cannot apply.
        assert time.monotonic() - started < 4.0
    assert any("recall failed" in r.getMessage() for r in caplog.records)
    embedder.fail_with = None
    client.memory.flush(30)
    assert sorted(m.content for m in client.memory.get_all()) == [
        "Drinks it at 5pm", "Likes green tea"
    ]


def test_recall_timing_out_never_raises(
    upstream: tuple[str, FakeUpstream], db: Path
) -> None:
    url, fake = upstream
    gated = GatedEmbedder(FakeEmbedder(), trigger="slow question")
    client = with_memory(sync_client(url), user_id="ivy", db_path=db, embedder=gated,
                         recall_timeout_s=0.3)
    client.memory.add("Plays the oboe", category="fact")
    gated.gate.clear()
    try:
        fake.queue(Reply("No idea."))
        started = time.monotonic()
        response = client.chat.completions.create(model="gpt-test",
                                                  messages=user_says("a slow question"))
        assert response.choices[0].message.content == "No idea."
        assert time.monotonic() - started < 2.0
        assert recalled(fake.last) is None
        assert instructed(fake.last)  # still asked for a block: only recall was skipped
    finally:
        gated.gate.set()


def test_two_wrappers_on_one_database_keep_their_own_settings(
    upstream: tuple[str, FakeUpstream], db: Path
) -> None:
    url, fake = upstream
    embedder = FakeEmbedder()
    wide = with_memory(sync_client(url), user_id="jo", db_path=db, embedder=embedder)
    narrow = with_memory(sync_client(url), user_id="jo", db_path=db, embedder=embedder,
                         top_k=1, recall_preset="bm25")
    tiny = with_memory(sync_client(url), user_id="jo", db_path=db, embedder=embedder,
                       token_budget=5)
    for text in ("Jo plays chess on Sundays", "Jo plays tennis on Mondays",
                 "Jo plays cards with friends"):
        wide.memory.add(text)

    def shown(client: Any, word: str) -> list[str]:
        fake.queue(Reply("Ok."))
        before = len(embedder.calls)
        # A new question each time: query vectors are cached.
        client.chat.completions.create(model="gpt-test",
                                       messages=user_says(f"what does jo play {word}"))
        embedded = [t for batch in embedder.calls[before:] for t in batch]
        assert bool(embedded) == (client is not narrow)  # bm25 recall embeds no query
        return re.findall(r"^\[m\d+\] \([^)]*\) (.*)$", recalled(fake.last) or "", re.M)

    assert len(shown(wide, "today")) == 3
    assert len(shown(narrow, "now")) == 1
    assert shown(tiny, "again") == []  # not even one line fits in 5 tokens
    assert len(shown(wide, "lately")) == 3  # the first wrapper's settings are untouched


def test_a_second_wrapper_asking_for_other_engine_settings_is_refused(
    upstream: tuple[str, FakeUpstream], db: Path
) -> None:
    url, _ = upstream
    embedder = FakeEmbedder()
    with_memory(sync_client(url), user_id="kim", db_path=db, embedder=embedder)
    with pytest.raises(ConfigError, match="dedup_threshold"):
        with_memory(sync_client(url), user_id="kim", embedder=embedder,
                    config=MemoryConfig(db_path=db, dedup_threshold=0.5))
    with pytest.raises(ConfigError, match="unknown recall preset"):
        with_memory(sync_client(url), user_id="kim", db_path=db, embedder=embedder,
                    recall_preset="no-such-preset")

"""`with_memory` over the whole surface of the official SDKs: every openai entry point that sends
a chat completion or a Responses call (create, stream(), parse(), with_raw_response,
with_streaming_response, with_options copies, sync and async) and the anthropic SDK's messages
(create, stream, sync and async), each against the scripted fake upstream. Every entry point
must strip the block, store it once, and recall it for the same user in a new session, never for
another user."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from anthropic import Anthropic, AsyncAnthropic
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel

from headroom import with_memory
from headroom.turn import runtime
from headroom.turn.inject import EXTRACTION_INSTRUCTION, MEMORY_PREAMBLE
from tests.servers import FakeUpstream, Reply, memory_block, recalled, running_upstream

TEA = "Drinks green tea every morning"
ANSWER = "Green tea it is."
BLOCKED = f"{ANSWER}\n{memory_block([TEA])}"

_closers: list[Any] = []


@pytest.fixture(scope="module")
def module_upstream() -> Iterator[tuple[str, FakeUpstream]]:
    with running_upstream() as (url, fake):
        yield url, fake


@pytest.fixture
def upstream(module_upstream: tuple[str, FakeUpstream]) -> Iterator[tuple[str, FakeUpstream]]:
    module_upstream[1].reset()
    yield module_upstream
    runtime.close_all()
    while _closers:
        _closers.pop().close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "surface.db"


def openai_client(url: str) -> OpenAI:
    client = OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
    _closers.append(client)
    return client


def anthropic_client(url: str) -> Anthropic:
    client = Anthropic(base_url=url, api_key="sk-ant", max_retries=0)
    _closers.append(client)
    return client


def wrap(client: Any, user: str, db: Path, embedder: Any, session: str = "s1") -> Any:
    return with_memory(client, user_id=user, session_id=session, db_path=db, embedder=embedder)


def assert_recalled_only_for_its_user(
    make: Any, fake: FakeUpstream, db: Path, embedder: Any, ask: Any, user: str,
) -> None:
    """The fact stored by the entry point under test reaches a new session of `user` (a plain
    chat completion) and never another user."""
    fake.queue("Sure.", "Hi.")
    ask(wrap(make(), user, db, embedder, session="s2"))
    body = fake.last
    memory = recalled(body) or _memory_in(body)
    assert memory is not None and TEA in memory
    ask(wrap(make(), f"other-{user}", db, embedder, session="s2"))
    assert recalled(fake.last) is None and _memory_in(fake.last) is None


def _memory_in(body: dict[str, Any]) -> str | None:
    """The injected memory text in a Responses or Messages body, if any."""
    found = json.dumps(body.get("input") or body.get("messages") or [])
    return found if MEMORY_PREAMBLE.split(":")[0] in found and TEA in found else None


def chat(client: Any) -> Any:
    return client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "what do I drink?"}])


def stored(client: Any) -> list[str]:
    client.memory.flush()
    return [m.content for m in client.memory.get_all()]


# --- openai, sync ----------------------------------------------------------------------------


def test_chat_stream_helper(upstream: tuple[str, FakeUpstream], db: Path,
                            local_embedder: Any) -> None:
    url, fake = upstream
    fake.queue(Reply(BLOCKED, chunk_seed=4))
    client = wrap(openai_client(url), "ann", db, local_embedder)
    with client.chat.completions.stream(
        model="m", messages=[{"role": "user", "content": "I drink green tea"}]
    ) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "content.delta")
        final = stream.get_final_completion()
    assert deltas == ANSWER
    assert final.choices[0].message.content == ANSWER
    assert fake.last["messages"][0]["content"] == EXTRACTION_INSTRUCTION
    assert stored(client) == [TEA]
    assert_recalled_only_for_its_user(lambda: openai_client(url), fake, db, local_embedder,
                                      chat, "ann")


class Drink(BaseModel):
    name: str


def test_chat_parse_with_json_schema_asks_for_no_block(
    upstream: tuple[str, FakeUpstream], db: Path, local_embedder: Any,
) -> None:
    url, fake = upstream
    client = wrap(openai_client(url), "bea", db, local_embedder)
    client.memory.add(TEA)
    fake.queue('{"name": "green tea"}')
    parsed = client.chat.completions.parse(
        model="m", messages=[{"role": "user", "content": "What do I drink?"}],
        response_format=Drink,
    )
    assert parsed.choices[0].message.parsed == Drink(name="green tea")
    assert fake.last["messages"][0]["content"] != EXTRACTION_INSTRUCTION  # no block asked
    assert recalled(fake.last) is not None and TEA in str(recalled(fake.last))  # recall still


def test_with_raw_response_and_streaming_response(
    upstream: tuple[str, FakeUpstream], db: Path, local_embedder: Any,
) -> None:
    url, fake = upstream
    fake.queue(BLOCKED, Reply(f"Again. {memory_block(['Lives in Oslo'])}", chunk_seed=1))
    client = wrap(openai_client(url), "cid", db, local_embedder)
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "tea"}])
    assert raw.parse().choices[0].message.content == ANSWER
    assert raw.headers["x-headroom-memory-block"] == "stored"
    with client.with_streaming_response.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "oslo"}], stream=True,
    ) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(json.loads(line)["choices"][0]["delta"].get("content") or ""
                   for line in lines)
    assert text == "Again."
    assert sorted(stored(client)) == sorted([TEA, "Lives in Oslo"])


def test_with_options_copies_keep_memory_also_with_their_own_http_client(
    upstream: tuple[str, FakeUpstream], db: Path, local_embedder: Any,
) -> None:
    url, fake = upstream
    fake.queue(BLOCKED, f"Ok. {memory_block(['Lives in Oslo'])}")
    client = wrap(openai_client(url), "dee", db, local_embedder)
    assert chat(client.with_options(timeout=20)).choices[0].message.content == ANSWER
    own = httpx.Client()
    _closers.append(own)
    answer = chat(client.with_options(http_client=own, max_retries=0))
    assert answer.choices[0].message.content == "Ok."
    assert sorted(stored(client)) == sorted([TEA, "Lives in Oslo"])


def test_responses_create_and_stream(upstream: tuple[str, FakeUpstream], db: Path,
                                     local_embedder: Any) -> None:
    url, fake = upstream
    fake.queue(BLOCKED, Reply(f"Noted. {memory_block(['Lives in Oslo'])}", chunk_seed=8))
    client = wrap(openai_client(url), "eli", db, local_embedder)
    assert client.responses.create(model="m", input="I drink tea").output_text == ANSWER
    assert fake.last["instructions"] == EXTRACTION_INSTRUCTION
    with client.responses.stream(model="m", input="I live in Oslo") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == "Noted." and final.output_text == "Noted."
    assert sorted(stored(client)) == sorted([TEA, "Lives in Oslo"])

    def ask(c: Any) -> Any:
        return c.responses.create(model="m", input="what do I drink?")

    assert_recalled_only_for_its_user(lambda: openai_client(url), fake, db, local_embedder,
                                      ask, "eli")


# --- openai, async ---------------------------------------------------------------------------


def test_async_openai_surface(upstream: tuple[str, FakeUpstream], db: Path,
                              local_embedder: Any) -> None:
    url, fake = upstream
    fake.queue(Reply(BLOCKED, chunk_seed=2), f"A. {memory_block(['Lives in Oslo'])}",
               Reply(f"B. {memory_block(['Has a cat'])}", chunk_seed=3))

    async def run() -> tuple[str, str, str]:
        inner = AsyncOpenAI(base_url=url + "/v1", api_key="sk", max_retries=0)
        client = wrap(inner, "fay", db, local_embedder)
        try:
            async with client.chat.completions.stream(
                model="m", messages=[{"role": "user", "content": "tea"}]
            ) as stream:
                final = await stream.get_final_completion()
            raw = await client.with_options(timeout=20).responses.with_raw_response.create(
                model="m", input="oslo")
            streamed = await client.responses.create(model="m", input="cat", stream=True)
            text = "".join([e.delta async for e in streamed
                            if e.type == "response.output_text.delta"])
            await client.memory.flush()
            return (str(final.choices[0].message.content), raw.parse().output_text, text)
        finally:
            await inner.close()

    assert asyncio.run(run()) == (ANSWER, "A.", "B.")
    check = wrap(openai_client(url), "fay", db, local_embedder)
    assert sorted(stored(check)) == sorted([TEA, "Lives in Oslo", "Has a cat"])


# --- anthropic -------------------------------------------------------------------------------


def ask_claude(client: Any) -> Any:
    return client.messages.create(model="c", max_tokens=50,
                                  messages=[{"role": "user", "content": "what do I drink?"}])


def test_anthropic_create_and_stream(upstream: tuple[str, FakeUpstream], db: Path,
                                     local_embedder: Any) -> None:
    url, fake = upstream
    fake.queue(BLOCKED, Reply(f"Noted. {memory_block(['Lives in Oslo'])}", chunk_seed=6))
    client = wrap(anthropic_client(url), "gil", db, local_embedder)
    message = client.messages.create(model="c", max_tokens=50, system="Be brief.",
                                     messages=[{"role": "user", "content": "I drink tea"}])
    assert message.content[0].text == ANSWER
    assert fake.last["system"][0]["text"] == EXTRACTION_INSTRUCTION
    with client.messages.stream(model="c", max_tokens=50,
                                messages=[{"role": "user", "content": "Oslo"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Noted." and final.content[0].text == "Noted."
    assert sorted(stored(client)) == sorted([TEA, "Lives in Oslo"])
    assert_recalled_only_for_its_user(lambda: anthropic_client(url), fake, db, local_embedder,
                                      ask_claude, "gil")


def test_async_anthropic(upstream: tuple[str, FakeUpstream], db: Path,
                         local_embedder: Any) -> None:
    url, fake = upstream
    fake.queue(Reply(BLOCKED, chunk_seed=5), f"A. {memory_block(['Lives in Oslo'])}")

    async def run() -> tuple[str, str]:
        inner = AsyncAnthropic(base_url=url, api_key="sk", max_retries=0)
        client = wrap(inner, "hub", db, local_embedder)
        try:
            async with client.messages.stream(
                model="c", max_tokens=5, messages=[{"role": "user", "content": "tea"}]
            ) as stream:
                streamed = "".join([t async for t in stream.text_stream])
            whole = await client.messages.create(
                model="c", max_tokens=5, messages=[{"role": "user", "content": "oslo"}])
            await client.memory.flush()
            return streamed, whole.content[0].text
        finally:
            await inner.close()

    assert asyncio.run(run()) == (ANSWER, "A.")
    check = wrap(anthropic_client(url), "hub", db, local_embedder)
    assert sorted(stored(check)) == sorted([TEA, "Lives in Oslo"])


# --- what gets no memory says so ----------------------------------------------------------------


def test_uncovered_parts_and_plain_clients_warn_once(
    upstream: tuple[str, FakeUpstream], db: Path, local_embedder: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from headroom import wrapper

    wrapper._warned.clear()
    url, fake = upstream
    client = wrap(openai_client(url), "ida", db, local_embedder)
    with caplog.at_level(logging.WARNING, logger="headroom.wrapper"):
        assert client.completions is not None
        assert client.completions is not None
    assert [r.getMessage() for r in caplog.records].count(
        "with_memory: legacy completions (client.completions) get no memory") == 1

    class Plain:
        """An OpenAI-compatible object that is not an SDK client."""

        def __init__(self, sdk: OpenAI) -> None:
            self.chat = sdk.chat

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="headroom.wrapper"):
        plain = wrap(Plain(openai_client(url)), "ida", db, local_embedder)
    assert any("only chat.completions.create gets memory" in r.getMessage()
               for r in caplog.records)
    fake.queue(BLOCKED)
    assert chat(plain).choices[0].message.content == ANSWER  # create still remembers


def test_closing_the_wrapper_closes_the_sdk_pool(upstream: tuple[str, FakeUpstream], db: Path,
                                                 local_embedder: Any) -> None:
    url, fake = upstream
    inner = OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
    with wrap(inner, "jan", db, local_embedder) as client:
        fake.queue(BLOCKED)
        assert chat(client).choices[0].message.content == ANSWER
    assert inner.is_closed()  # one pool, shared like a with_options copy's

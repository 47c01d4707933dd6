"""End to end: the official `openai` SDK -> the proxy (uvicorn in a thread) -> a fake upstream LLM
that streams its replies in random chunk sizes. Real MiniLM, sqlite-vec and FTS5 underneath.

Assertions look at what the upstream received (the injected messages, the instruction) and at
the rows in the database, not only at what the client got.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import httpx
import pytest

from headroom.memory.models import MemoryCategory
from headroom.turn.inject import EXTRACTION_INSTRUCTION
from tests.servers import Proxy, Reply, instructed, memory_block, proxy_fixtures, recalled

GO = "Prefers Go for performance-critical code"


# One proxy for the whole module; each test gets its own user ids (Proxy.uid).
_module_proxy, _proxy = proxy_fixtures()


def ask(client: Any, text: str | list[dict[str, Any]], **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": text}], **kwargs
    )


def joined(chunks: list[Any], index: int = 0) -> str:
    return "".join(
        c.delta.content or "" for chunk in chunks for c in chunk.choices if c.index == index
    )


def alias_of(body: dict[str, Any], text: str) -> str:
    """The alias (m1, m2, ...) the proxy gave the recalled memory with this text."""
    message = recalled(body)
    assert message is not None, "no memories were injected"
    for alias, content in re.findall(r"^\[(m\d+)\] \([^)]*\) (.*)$", message, re.M):
        if content == text:
            return alias
    raise AssertionError(f"{text!r} not among the injected memories:\n{message}")


def seed(p: Proxy, user: str, text: str, **kwargs: Any) -> Any:
    return p.run(p.engine.add(text, p.uid(user), **kwargs))


# --- the main story --------------------------------------------------------------------------


def test_memory_stored_in_one_session_is_recalled_in_a_new_session(proxy: Proxy) -> None:
    block = memory_block([{"text": GO, "category": "preference", "importance": 0.8}])
    proxy.upstream.queue(Reply(f"Noted, Go it is.\n\n{block}"))
    morning = proxy.client("bob", "morning")
    raw = morning.chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "I prefer Go for performance-critical code"}],
    )
    answer = raw.parse()
    assert answer.choices[0].message.content == "Noted, Go it is."
    assert raw.headers["x-headroom-memories-injected"] == "0"
    assert raw.headers["x-headroom-request-id"].startswith("hr-")
    assert float(raw.headers["x-headroom-memory-overhead-ms"]) >= 0
    first = proxy.upstream.received[0]
    assert first["messages"][0] == {"role": "system", "content": EXTRACTION_INSTRUCTION}
    assert recalled(first) is None
    assert "tools" not in first  # the proxy never adds a tool of its own

    [stored] = proxy.memories("bob")
    assert (stored.content, stored.category) == (GO, MemoryCategory.PREFERENCE)
    assert stored.session_id is None  # scope "user": visible from every session

    proxy.upstream.queue(Reply("Go, given your preference.", chunk_seed=3))
    afternoon = proxy.client("bob", "afternoon")
    raw = afternoon.chat.completions.with_raw_response.create(
        model="gpt-test", stream=True,
        messages=[{"role": "user", "content": "What language for my new microservice?"}],
    )
    assert raw.headers["x-headroom-memories-injected"] == "1"
    assert joined(list(raw.parse())) == "Go, given your preference."
    second = proxy.upstream.last
    assert alias_of(second, GO) == "m1"
    # The memories sit right before the latest user message; the instruction stays first.
    assert second["messages"][0]["content"] == EXTRACTION_INSTRUCTION
    assert second["messages"][-2]["content"] == recalled(second)
    assert second["messages"][-1]["content"] == "What language for my new microservice?"
    assert len(proxy.memories("bob")) == 1


FACTS = [
    "Has a golden retriever named Biscuit",
    "Works night shifts as a nurse in Lisbon",
    "Is learning to play the cello",
    "Allergic to shellfish",
    "Drives an old red Volvo estate",
    "Supports Benfica at football",
]


@pytest.mark.parametrize("seed_", range(len(FACTS)))
def test_streamed_block_split_across_random_chunks_never_leaks(proxy: Proxy, seed_: int) -> None:
    fact = FACTS[seed_]
    # The JSON string mentions the closing tag: only the real end may close the block.
    item = {"text": fact, "category": "fact", "importance": 0.6, "note": "not </memory> yet"}
    answer = "Here is a fairly long answer, written in several pieces, about your question."
    proxy.upstream.queue(Reply(f"{answer}  \n{memory_block([item])}\n", chunk_seed=seed_))
    with ask(proxy.client("carol"), "Tell me something", stream=True) as stream:
        chunks = list(stream)
    pieces = [c.delta.content or "" for chunk in chunks for c in chunk.choices]
    assert "".join(pieces) == answer
    assert not any("<" in piece or "memory" in piece for piece in pieces)
    assert [m.content for m in proxy.memories("carol")] == [fact]


def test_answer_text_is_forwarded_before_the_upstream_finishes(proxy: Proxy) -> None:
    """Only the block is held back: the answer reaches the client while the upstream is still
    busy (here: holding its finish chunk for a second)."""
    proxy.upstream.queue(
        Reply("Streaming right away. " + memory_block(["Likes fast feedback"]),
              hold_before_finish_s=1.0, chunk_seed=1)
    )
    started = time.monotonic()
    seen_at = None
    text = ""
    with ask(proxy.client("dora"), "hi", stream=True) as stream:
        for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
            if seen_at is None and text.startswith("Streaming right away."):
                seen_at = time.monotonic() - started
    assert seen_at is not None and seen_at < 0.8
    assert time.monotonic() - started >= 1.0
    assert text == "Streaming right away."
    assert [m.content for m in proxy.memories("dora")] == ["Likes fast feedback"]


async def test_async_client_streaming_and_not(proxy: Proxy) -> None:
    async with proxy.async_client("erin", "s1") as client:
        await _async_story(proxy, client)


async def _async_story(proxy: Proxy, client: Any) -> None:
    proxy.upstream.queue(Reply("Async hello. " + memory_block(["Prefers async Python"])))
    answer = await client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "I like asyncio"}]
    )
    assert answer.choices[0].message.content == "Async hello."
    await asyncio.to_thread(proxy.settle)  # write-behind: the answer did not wait for the write

    proxy.upstream.queue(Reply("Streamed. " + memory_block(["Uses uvloop in production"]),
                               chunk_seed=7))
    stream = await client.chat.completions.create(
        model="gpt-test", stream=True,
        messages=[{"role": "user", "content": "Which Python do I prefer?"}],
    )
    chunks = [chunk async for chunk in stream]
    assert joined(chunks) == "Streamed."
    assert "Prefers async Python" in (recalled(proxy.upstream.last) or "")
    await asyncio.to_thread(proxy.settle)
    texts = sorted(m.content for m in proxy.memories("erin"))
    assert texts == ["Prefers async Python", "Uses uvloop in production"]


def test_users_are_isolated(proxy: Proxy) -> None:
    proxy.upstream.queue(Reply("Noted. " + memory_block(["Allergic to peanuts"])))
    ask(proxy.client("alice"), "I am allergic to peanuts")
    [alices] = proxy.memories("alice")

    # bob asks about the very same thing, and tries to forget alice's memory by its real id and
    # by an alias that was never shown to him.
    proxy.upstream.queue(Reply("No idea. " + memory_block(forget=[alices.id, "m1"])))
    answer = ask(proxy.client("bob"), "Am I allergic to peanuts?")
    assert answer.choices[0].message.content == "No idea."
    assert recalled(proxy.upstream.last) is None
    assert proxy.memories("bob") == []
    assert [m.content for m in proxy.memories("alice")] == ["Allergic to peanuts"]
    assert proxy.run(proxy.engine.get(alices.id)).is_current

    proxy.upstream.queue(Reply("Careful with peanuts."))
    ask(proxy.client("alice", "other-session"), "Am I allergic to peanuts?")
    assert "Allergic to peanuts" in (recalled(proxy.upstream.last) or "")


def test_supersede_and_forget_through_the_block(proxy: Proxy) -> None:
    client = proxy.client("frank")
    proxy.upstream.queue(Reply("Ok. " + memory_block(["Works at Google", "Lives in Berlin"])))
    ask(client, "I work at Google and live in Berlin")
    assert len(proxy.memories("frank")) == 2

    # The model sees both memories with aliases and updates one, forgets the other.
    proxy.upstream.queue(Reply("Congrats!"))
    ask(client, "Where do I work and where do I live?")
    body = proxy.upstream.last
    work, home = alias_of(body, "Works at Google"), alias_of(body, "Lives in Berlin")
    proxy.upstream.queue(Reply("Congrats on the move! " + memory_block(
        update=[{"id": work, "text": "Works at Anthropic"}], forget=[home]
    )))
    ask(client, "Where do I work and where do I live?")
    rows = {m.content: m for m in proxy.memories("frank", include_superseded=True)}
    assert set(rows) == {"Works at Google", "Works at Anthropic", "Lives in Berlin"}
    old, new = rows["Works at Google"], rows["Works at Anthropic"]
    assert old.superseded_by == new.id and new.supersedes == old.id
    assert old.valid_until is not None and new.is_current
    assert rows["Lives in Berlin"].forgotten_at is not None
    assert [m.content for m in proxy.memories("frank")] == ["Works at Anthropic"]
    history = proxy.run(proxy.engine.get_history(new.id))
    assert [m.content for m in history] == ["Works at Google", "Works at Anthropic"]

    proxy.upstream.queue(Reply("Anthropic."))
    ask(client, "Where do I work and where do I live?")
    message = recalled(proxy.upstream.last) or ""
    assert "Works at Anthropic" in message
    assert "Google" not in message and "Berlin" not in message


def test_scopes_chosen_in_the_block_are_clamped_to_the_request(proxy: Proxy) -> None:
    proxy.upstream.queue(Reply("Ok. " + memory_block([
        {"text": "Is debugging a flaky CI job right now", "scope": "session",
         "importance": 0.5},
        {"text": "Wants terse answers from this assistant", "scope": "agent",
         "importance": 0.4},
        {"text": "Is a staff engineer at a bank", "scope": "session", "importance": 0.95},
    ])))
    ask(proxy.client("quinn", "s1"), "help me with CI")  # no agent id: "agent" clamps to s1
    rows = {m.content: m for m in proxy.memories("quinn")}
    assert rows["Is debugging a flaky CI job right now"].session_id == "s1"
    assert rows["Wants terse answers from this assistant"].session_id == "s1"
    assert rows["Wants terse answers from this assistant"].agent_id is None
    assert rows["Is a staff engineer at a bank"].session_id is None  # important: bubbled up

    proxy.upstream.queue(Reply("Sure."), Reply("Sure."))
    ask(proxy.client("quinn", "s2"), "help me with CI as a staff engineer, tersely")
    other_session = recalled(proxy.upstream.last) or ""
    ask(proxy.client("quinn", "s1"), "help me with CI as a staff engineer, tersely")
    same_session = recalled(proxy.upstream.last) or ""
    assert "staff engineer" in other_session and "flaky CI" not in other_session
    assert "terse" not in other_session
    assert "flaky CI" in same_session and "terse" in same_session


def test_logprobs_turn_extraction_off(proxy: Proxy) -> None:
    """Token logprobs would carry the block's tokens to the client past the stripper."""
    seed(proxy, "rita", "Likes green tea")
    proxy.upstream.queue(Reply("Tea."))
    raw = proxy.client("rita").chat.completions.with_raw_response.create(
        model="gpt-test", logprobs=True, top_logprobs=2,
        messages=[{"role": "user", "content": "What do I like to drink?"}],
    )
    assert raw.parse().choices[0].message.content == "Tea."
    assert "extraction off" in raw.headers["x-headroom-memory-notes"]
    assert not instructed(proxy.upstream.last)
    assert "Likes green tea" in (recalled(proxy.upstream.last) or "")


def test_the_same_block_twice_is_one_row_reinforced(proxy: Proxy) -> None:
    block = memory_block([{"text": "Prefers tabs over spaces", "importance": 0.4}])
    for _ in range(2):
        proxy.upstream.queue(Reply("Sure. " + block))
        ask(proxy.client("gina"), "tabs!")
    [row] = proxy.memories("gina", include_superseded=True)
    kinds = [e["op"] for e in proxy.run(proxy.engine.get_events(row.id))]
    assert kinds.count("add") == 1 and kinds.count("reinforce") == 1
    assert proxy.run(proxy.engine.stats(proxy.uid("gina")))["rows"] == 1


# --- modes, identity ---------------------------------------------------------------------------


def test_memory_mode_header(proxy: Proxy) -> None:
    seed(proxy, "hank", "Likes green tea")
    block = memory_block(["Hank has two cats"])
    messages = [{"role": "user", "content": "What do I like to drink?"}]

    # off: the upstream gets exactly the client's body; nothing is stored or stripped.
    proxy.upstream.queue(Reply("Tea. " + block))
    raw = proxy.client("hank", **{"X-Headroom-Memory": "off"}).chat.completions.with_raw_response
    answer = raw.create(model="gpt-test", messages=messages)
    assert proxy.upstream.last == {"model": "gpt-test", "messages": messages}
    assert answer.parse().choices[0].message.content == "Tea. " + block
    assert "x-headroom-memories-injected" not in answer.headers

    # read: recall only; the block is still stripped but not stored.
    proxy.upstream.queue(Reply("Tea. " + block))
    answer = ask(proxy.client("hank", **{"X-Headroom-Memory": "read"}), messages[0]["content"])
    assert answer.choices[0].message.content == "Tea."
    assert not instructed(proxy.upstream.last)
    assert "Likes green tea" in (recalled(proxy.upstream.last) or "")

    # write: extraction only.
    proxy.upstream.queue(Reply("Tea. " + memory_block(["Hank drinks it without sugar"])))
    answer = ask(proxy.client("hank", **{"X-Headroom-Memory": "WRITE"}), messages[0]["content"])
    assert answer.choices[0].message.content == "Tea."
    assert instructed(proxy.upstream.last)
    assert recalled(proxy.upstream.last) is None
    texts = sorted(m.content for m in proxy.memories("hank"))
    assert texts == ["Hank drinks it without sugar", "Likes green tea"]


def test_without_a_user_id_the_proxy_is_transparent(proxy: Proxy) -> None:
    seed(proxy, "ivan", "Likes green tea")
    block = memory_block(["Should not be stored"])
    proxy.upstream.queue(Reply("Hi. " + block))
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "tea?"}],
            "temperature": 0.3, "x_unknown": {"kept": True}}
    response = httpx.post(f"{proxy.base_url}/chat/completions", json=body,
                          headers={"authorization": "Bearer sk-x"})
    assert response.status_code == 200
    assert proxy.upstream.last == body
    assert response.json()["choices"][0]["message"]["content"] == "Hi. " + block
    assert response.headers["x-headroom-request-id"].startswith("hr-")
    assert response.headers["x-upstream"] == "fake"
    # Streaming too: the upstream's bytes, block and all.
    stream_body = {**body, "stream": True}
    proxy.upstream.queue(Reply("Hi. " + block, chunk_seed=1), Reply("Hi. " + block, chunk_seed=1))
    direct = _post_raw(f"{proxy.upstream_url}/chat/completions", stream_body, {})
    assert _post_raw(f"{proxy.base_url}/chat/completions", stream_body, {}) == direct
    assert proxy.upstream.last == stream_body

    # The body's `user` field names the user when no header does.
    proxy.upstream.queue(Reply("Tea! " + memory_block(["Ivan drinks tea at 5pm"])))
    answer = ask(proxy.client(), "tea?", user=proxy.uid("ivan"))
    assert answer.choices[0].message.content == "Tea!"
    assert "Likes green tea" in (recalled(proxy.upstream.last) or "")
    assert proxy.upstream.last["user"] == proxy.uid("ivan")
    assert sorted(m.content for m in proxy.memories("ivan")) == [
        "Ivan drinks tea at 5pm", "Likes green tea",
    ]


# --- what passes through a stream untouched ----------------------------------------------------


def _events(raw: bytes) -> list[str]:
    return [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]


def _post_raw(url: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    with httpx.stream("POST", url, json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        return r.read()


TOOL_CALL = {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_stream_without_a_block_is_byte_for_byte(proxy: Proxy) -> None:
    """Role chunks, tool-call deltas, finish_reason, the usage chunk, unknown fields and [DONE]:
    with nothing to strip, the client gets exactly the upstream's bytes."""
    body = {"model": "gpt-test", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS}
    reply = dict(content="Checking the weather for you.", tool_calls=[TOOL_CALL],
                 finish_reason="tool_calls", chunk_seed=5,
                 extra_chunk_fields={"system_fingerprint": "fp_1", "x_vendor": {"a": 1}})
    proxy.upstream.queue(Reply(**reply), Reply(**reply))
    direct = _post_raw(f"{proxy.upstream_url}/chat/completions", body, {})
    through = _post_raw(f"{proxy.base_url}/chat/completions", body,
                        {"x-headroom-user-id": proxy.uid("jack")})
    assert through == direct
    events = _events(through)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["total_tokens"] == 2
    assert instructed(proxy.upstream.last)


def test_stream_with_a_block_keeps_every_other_field(proxy: Proxy) -> None:
    body = {"model": "gpt-test", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS}
    content = "Let me check. " + memory_block(["Lives in Paris"])
    reply = dict(content=content, tool_calls=[TOOL_CALL], finish_reason="tool_calls",
                 chunk_seed=11, extra_chunk_fields={"x_vendor": {"a": 1}})
    proxy.upstream.queue(Reply(**reply), Reply(**reply))
    direct = [json.loads(e) for e in _events(
        _post_raw(f"{proxy.upstream_url}/chat/completions", body, {}))[:-1]]
    through_raw = _events(_post_raw(f"{proxy.base_url}/chat/completions", body,
                                    {"x-headroom-user-id": proxy.uid("kate")}))
    assert through_raw[-1] == "[DONE]"
    through = [json.loads(e) for e in through_raw[:-1]]

    def text(events: list[dict[str, Any]]) -> str:
        return "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])

    def non_content(events: list[dict[str, Any]]) -> list[Any]:
        out = []
        for e in events:
            for c in e["choices"]:
                rest = {k: v for k, v in c["delta"].items() if k != "content"}
                if rest or c["finish_reason"] is not None:
                    out.append((rest, c["finish_reason"]))
            if e.get("usage"):
                out.append(e["usage"])
        return out

    assert text(direct) == content
    assert text(through) == "Let me check."
    assert non_content(through) == non_content(direct)
    assert all(e["x_vendor"] == {"a": 1} for e in through)
    assert [m.content for m in proxy.memories("kate")] == ["Lives in Paris"]


def test_upstream_ignoring_stream_true_still_gets_stripped(proxy: Proxy) -> None:
    """Some compatible servers answer `stream: true` with one JSON body: it is not SSE, so it
    takes the non-streaming path instead of leaking its block."""
    proxy.upstream.queue(Reply("Plain JSON. " + memory_block(["Runs an old server"]),
                               ignore_stream=True))
    response = httpx.post(f"{proxy.base_url}/chat/completions",
                          json={"model": "gpt-test", "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]},
                          headers={"x-headroom-user-id": proxy.uid("sid")})
    assert response.json()["choices"][0]["message"]["content"] == "Plain JSON."
    assert [m.content for m in proxy.memories("sid")] == ["Runs an old server"]


# --- cut off, tools, response_format, n > 1, multimodal ----------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_block_cut_off_by_max_tokens_never_leaks(proxy: Proxy, stream: bool) -> None:
    cut = ('Sure, I will remember that. <memory>{"add":[{"text":"Likes green tea",'
           '"category":"preference"},{"text":"Lives in Par')
    proxy.upstream.queue(Reply(cut, finish_reason="length", chunk_seed=2))
    answer = ask(proxy.client("liam"), "remember", max_tokens=40, stream=stream)
    if stream:
        chunks = list(answer)
        text = joined(chunks)
        assert chunks[-1].choices[0].finish_reason == "length"
    else:
        text = answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "length"
    assert text == "Sure, I will remember that."
    assert [m.content for m in proxy.memories("liam")] == ["Likes green tea"]

    # Cut inside the opening tag: the dangling "<memo" is not shown either.
    proxy.upstream.queue(Reply("Another answer. <memo", finish_reason="length", chunk_seed=4))
    answer = ask(proxy.client("liam"), "again", stream=stream)
    text = joined(list(answer)) if stream else answer.choices[0].message.content
    assert text == "Another answer."


@pytest.mark.parametrize("stream", [False, True])
def test_tools_untouched_and_extraction_still_works(proxy: Proxy, stream: bool) -> None:
    history = [
        {"role": "user", "content": "What's the weather in Paris? I live there."},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    ]
    proxy.upstream.queue(Reply("It is 21 degrees. " + memory_block(["Lives in Paris"]),
                               tool_calls=[TOOL_CALL], finish_reason="tool_calls", chunk_seed=6))
    answer = proxy.client("mia").chat.completions.create(
        model="gpt-test", messages=history, tools=TOOLS, tool_choice="auto", stream=stream
    )
    if stream:
        chunks = list(answer)
        text = joined(chunks)
        calls = [tc for ch in chunks for c in ch.choices for tc in (c.delta.tool_calls or [])]
        assert [tc.model_dump(exclude_none=True) for tc in calls] == [{"index": 0, **TOOL_CALL}]
    else:
        text = answer.choices[0].message.content
        assert [tc.model_dump() for tc in answer.choices[0].message.tool_calls] == [TOOL_CALL]
    assert text == "It is 21 degrees."
    sent = proxy.upstream.last
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "auto"
    assert sent["messages"][-3:] == history  # the assistant tool call and tool result untouched
    assert [m.content for m in proxy.memories("mia")] == ["Lives in Paris"]


@pytest.mark.parametrize("response_format", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "drink", "schema": {"type": "object"}}},
])
def test_response_format_json_gets_no_instruction_but_recall(
    proxy: Proxy, response_format: dict[str, Any]
) -> None:
    seed(proxy, "noah", "Likes green tea")
    proxy.upstream.queue(Reply('{"drink": "green tea"}'))
    raw = proxy.client("noah").chat.completions.with_raw_response.create(
        model="gpt-test", response_format=response_format,
        messages=[{"role": "user", "content": "What do I like to drink? Answer in JSON."}],
    )
    assert raw.parse().choices[0].message.content == '{"drink": "green tea"}'
    assert "extraction off" in raw.headers["x-headroom-memory-notes"]
    sent = proxy.upstream.last
    assert not instructed(sent)
    assert not any("<memory>" in str(m.get("content")) for m in sent["messages"])
    assert "Likes green tea" in (recalled(sent) or "")
    assert sent["response_format"] == response_format


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_all_stripped_ops_from_one(proxy: Proxy, stream: bool) -> None:
    contents = [
        "First take. " + memory_block(["Plays chess on weekends"]),
        "Second take. " + memory_block(["Plays poker on weekends"]),
        "Third take, no block.",
    ]
    proxy.upstream.queue(Reply(contents, chunk_seed=8))
    answer = ask(proxy.client("olga"), "hobbies?", n=3, stream=stream)
    if stream:
        chunks = list(answer)
        texts = [joined(chunks, i) for i in range(3)]
    else:
        texts = [c.message.content for c in sorted(answer.choices, key=lambda c: c.index)]
    assert texts == ["First take.", "Second take.", "Third take, no block."]
    assert [m.content for m in proxy.memories("olga")] == ["Plays chess on weekends"]


def test_multimodal_content_recalls_with_its_text(proxy: Proxy) -> None:
    seed(proxy, "pia", "Likes green tea")
    parts = [
        {"type": "text", "text": "What do I like to drink?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    proxy.upstream.queue(Reply("Tea. " + memory_block(["Sent a photo of a teapot"])))
    answer = ask(proxy.client("pia"), parts)
    assert answer.choices[0].message.content == "Tea."
    sent = proxy.upstream.last
    assert sent["messages"][-1] == {"role": "user", "content": parts}
    assert "Likes green tea" in (recalled(sent) or "")
    assert "Sent a photo of a teapot" in [m.content for m in proxy.memories("pia")]


# --- many users at once ------------------------------------------------------------------------


async def test_concurrent_users_no_errors_no_cross_user_leak(proxy: Proxy) -> None:
    users = [f"user{n:02d}" for n in range(24)]

    def respond(body: dict[str, Any]) -> Reply:
        question = body["messages"][-1]["content"]
        user = question.split()[0]
        if "remember" in question:
            fact = f"Secret code of {user} is K{user[-2:]}Q"
            return Reply(f"OK {user}. " + memory_block([fact]), chunk_seed=int(user[-2:]))
        return Reply(f"Answer for {user}.", chunk_seed=int(user[-2:]))

    proxy.upstream.responder = respond
    clients = {u: proxy.async_client(u, f"{u}-session") for u in users}
    try:
        await _concurrent_story(proxy, users, clients)
    finally:
        for client in clients.values():
            await client.close()


async def _concurrent_story(proxy: Proxy, users: list[str], clients: dict[str, Any]) -> None:
    async def talk(user: str, text: str, stream: bool) -> str:
        messages = [{"role": "user", "content": f"{user} {text}"}]
        create = clients[user].chat.completions.create
        if stream:
            return joined([c async for c in await create(
                model="gpt-test", messages=messages, stream=True)])
        answer = await create(model="gpt-test", messages=messages)
        return answer.choices[0].message.content

    first = await asyncio.gather(*(
        talk(u, "please remember my secret code", i % 2 == 0) for i, u in enumerate(users)
    ))
    assert first == [f"OK {u}." for u in users]
    await asyncio.to_thread(proxy.settle)
    before = len(proxy.upstream.received)
    second = await asyncio.gather(*(
        talk(u, "what is my secret code?", i % 2 == 1) for i, u in enumerate(users)
    ))
    assert second == [f"Answer for {u}." for u in users]

    asked = proxy.upstream.received[before:]
    assert len(asked) == len(users)
    for body in asked:
        user = body["messages"][-1]["content"].split()[0]
        codes = set(re.findall(r"K\d\dQ", recalled(body) or ""))
        assert codes == {f"K{user[-2:]}Q"}, (user, recalled(body))
    for user in users:
        assert [m.content for m in proxy.memories(user)] == [
            f"Secret code of {user} is K{user[-2:]}Q"
        ]


# --- the bytes on the wire -------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_non_ascii_goes_upstream_unescaped(proxy: Proxy, stream: bool) -> None:
    """Issue 11: the stdlib's json.dumps re-escaped non-ASCII, a 92.5 KB CJK request went
    upstream as 183.9 KB. With orjson the forwarded body is about its UTF-8 size."""
    question = "我喜欢在周末去山里徒步旅行，也喜欢喝绿茶。" * 1500  # ~66 KB of UTF-8
    proxy.upstream.queue(Reply("好的。" + memory_block(["喜欢徒步旅行"]), chunk_seed=3))
    answer = ask(proxy.client("cjk"), question, stream=stream)
    text = joined(list(answer)) if stream else answer.choices[0].message.content
    assert text == "好的。"
    sent = int(proxy.upstream.received_headers[-1]["content-length"])
    utf8 = len(question.encode())
    escaped = len(json.dumps(question))
    assert utf8 < sent < utf8 + len(EXTRACTION_INSTRUCTION) + 1000 < escaped
    assert [m.content for m in proxy.memories("cjk")] == ["喜欢徒步旅行"]

"""Anthropic's Messages API (`POST /v1/messages`) end to end: the official `anthropic` SDK (sync
and async, `messages.create` and `messages.stream`) -> the proxy -> a scripted fake upstream.
Real MiniLM and SQLite underneath; assertions read what the upstream received and the rows."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from anthropic import Anthropic, AsyncAnthropic

from headroom.turn.inject import EXTRACTION_INSTRUCTION, MEMORY_PREAMBLE
from tests.servers import (
    Proxy,
    Reply,
    memory_block,
    proxy_fixtures,
    running_proxy,
    running_upstream,
)

TEA = "Drinks green tea every morning"
ANSWER = "Green tea it is."

_module_proxy, _proxy = proxy_fixtures()


def client(p: Proxy, user: str | None, session: str | None = None) -> Anthropic:
    c = Anthropic(base_url=p.url, api_key="sk-ant-client", max_retries=0, timeout=30,
                  default_headers=p.headers(user, session))
    p.clients.append(c)
    return c


def ask(c: Anthropic, text: str, **kwargs: Any) -> Any:
    return c.messages.create(model="claude-test", max_tokens=100,
                             messages=[{"role": "user", "content": text}], **kwargs)


def memory_text(body: dict[str, Any]) -> str | None:
    """The injected memory text block in the upstream's latest user message, if any."""
    for block in body["messages"][-1]["content"]:
        if isinstance(block, dict) and str(block.get("text", "")).startswith(MEMORY_PREAMBLE):
            return str(block["text"])
    return None


def test_fact_written_in_one_session_is_recalled_in_a_new_session_only_for_its_user(
    proxy: Proxy,
) -> None:
    proxy.upstream.queue(f"{ANSWER}\n{memory_block([TEA])}", "Sure.", "Hi.")
    raw = client(proxy, "ann", "s1").messages.with_raw_response.create(
        model="claude-test", max_tokens=100, system="Be brief.",
        messages=[{"role": "user", "content": "I drink green tea every morning"}],
    )
    message = raw.parse()
    assert [b.text for b in message.content if b.type == "text"] == [ANSWER]
    assert raw.headers["x-headroom-memory-block"] == "stored"
    sent = proxy.upstream.last
    assert sent["system"] == [{"type": "text", "text": EXTRACTION_INSTRUCTION},
                              {"type": "text", "text": "Be brief."}]
    assert [m.content for m in proxy.memories("ann")] == [TEA]

    ask(client(proxy, "ann", "s2"), "What should I drink?")
    sent = proxy.upstream.last
    recalled = memory_text(sent)
    assert recalled is not None and TEA in recalled
    # The user's own text stays last, after the memory block.
    assert sent["messages"][-1]["content"][-1] == {"type": "text",
                                                   "text": "What should I drink?"}

    ask(client(proxy, "bob"), "What should I drink?")
    assert proxy.upstream.last["messages"][-1]["content"] == "What should I drink?"


def test_metadata_user_id_names_the_user_and_sdk_headers_are_forwarded(proxy: Proxy) -> None:
    proxy.upstream.queue(f"Ok.{memory_block([TEA])}")
    # Anthropic's own API reads `x-api-key` (this SDK version sends its api_key as a bearer
    # token to a custom base_url: both must reach the upstream).
    c = client(proxy, None).with_options(default_headers={"x-api-key": "sk-ant-header"})
    ask(c, "tea", metadata={"user_id": proxy.uid("cat")})
    headers = proxy.upstream.received_headers[-1]
    assert headers["x-api-key"] == "sk-ant-header"
    assert headers["authorization"] == "Bearer sk-ant-client"
    assert headers["anthropic-version"] == c.default_headers["anthropic-version"]
    assert [m.content for m in proxy.memories("cat")] == [TEA]


def test_stream_strips_the_block_and_stores_it(proxy: Proxy) -> None:
    proxy.upstream.queue(Reply(f"{ANSWER} {memory_block([TEA])}", chunk_seed=5))
    with client(proxy, "dan").messages.stream(
        model="claude-test", max_tokens=100, messages=[{"role": "user", "content": "tea?"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == ANSWER
    assert final.content[0].type == "text" and final.content[0].text == ANSWER
    assert final.stop_reason == "end_turn"
    assert [m.content for m in proxy.memories("dan")] == [TEA]


def test_tool_use_and_tool_result_pass_untouched(proxy: Proxy) -> None:
    proxy.run(proxy.engine.add(TEA, proxy.uid("eve")))
    calls = [{"id": "toolu_1", "type": "function",
              "function": {"name": "brew", "arguments": '{"kind": "green"}'}}]
    proxy.upstream.queue(Reply("Brewing.", tool_calls=calls, finish_reason="tool_calls"))
    result = {"type": "tool_result", "tool_use_id": "toolu_0", "content": "water hot"}
    message = client(proxy, "eve").messages.create(
        model="claude-test", max_tokens=100,
        tools=[{"name": "brew", "input_schema": {"type": "object"}}],
        messages=[{"role": "user", "content": "make tea"},
                  {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_0",
                                                     "name": "boil", "input": {}}]},
                  {"role": "user", "content": [result]}],
    )
    sent = proxy.upstream.last
    assert sent["messages"][1]["content"][0]["type"] == "tool_use"
    last = sent["messages"][-1]["content"]
    assert last[0] == result  # tool_result blocks stay first
    assert last[1]["text"].startswith(MEMORY_PREAMBLE)
    assert message.content[1].type == "tool_use"
    assert message.content[1].input == {"kind": "green"}
    assert message.stop_reason == "tool_use"


def test_forced_tool_choice_asks_for_no_block(proxy: Proxy) -> None:
    proxy.upstream.queue("x")
    raw = client(proxy, "fay").messages.with_raw_response.create(
        model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "hi"}],
        tools=[{"name": "t", "input_schema": {"type": "object"}}],
        tool_choice={"type": "tool", "name": "t"},
    )
    assert "system" not in proxy.upstream.last
    assert raw.headers["x-headroom-memory-block"] == "off"


def test_async_client_create_and_stream(proxy: Proxy) -> None:
    proxy.upstream.queue(Reply(f"{ANSWER}{memory_block([TEA])}", chunk_seed=2),
                         f"{ANSWER}{memory_block(['Lives in Oslo'])}")

    async def run() -> tuple[str, str]:
        c = AsyncAnthropic(base_url=proxy.url, api_key="sk-ant", max_retries=0,
                           default_headers=proxy.headers("gus"))
        try:
            async with c.messages.stream(model="m", max_tokens=10,
                                         messages=[{"role": "user", "content": "a"}]) as s:
                streamed = "".join([t async for t in s.text_stream])
            whole = await c.messages.create(model="m", max_tokens=10,
                                            messages=[{"role": "user", "content": "b"}])
            assert whole.content[0].type == "text"
            return streamed, whole.content[0].text
        finally:
            await c.close()

    assert asyncio.run(run()) == (ANSWER, ANSWER)
    assert sorted(m.content for m in proxy.memories("gus")) == sorted([TEA, "Lives in Oslo"])


@pytest.mark.usefixtures("local_embedder")
def test_anthropic_upstream_url_routes_messages_only(tmp_path: Path, local_embedder: Any) -> None:
    with running_upstream() as (anthropic_url, anthropic_fake), running_proxy(
        tmp_path / "m.db", local_embedder, anthropic_upstream_url=anthropic_url,
    ) as p:
        anthropic_fake.queue("from anthropic")
        p.upstream.queue("from openai")
        assert ask(client(p, "hal"), "hi").content[0].text == "from anthropic"
        chat = p.client("hal").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == "from openai"
        assert len(anthropic_fake.received) == len(p.upstream.received) == 1

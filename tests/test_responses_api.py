"""The Responses API (`POST /v1/responses`) end to end: the official `openai` SDK (sync and
async, `responses.create` and `responses.stream`) -> the proxy -> a scripted fake upstream.
Real MiniLM and SQLite underneath; assertions read what the upstream received and the rows."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from headroom.turn.inject import EXTRACTION_INSTRUCTION, MEMORY_PREAMBLE
from tests.servers import Proxy, Reply, memory_block, proxy_fixtures

TEA = "Drinks green tea every morning"
ANSWER = "Green tea it is."

_module_proxy, _proxy = proxy_fixtures()


def memory_item(body: dict[str, Any]) -> str | None:
    """The injected memory item's text in an upstream Responses body, if any."""
    given = body.get("input")
    for item in given if isinstance(given, list) else []:
        content = item.get("content")
        if item.get("role") == "system" and isinstance(content, str) and content.startswith(
            MEMORY_PREAMBLE
        ):
            return content
    return None


def readyz_counters(p: Proxy) -> dict[str, int]:
    return dict(httpx.get(f"{p.url}/readyz", timeout=10).json()["counters"])


def test_fact_written_in_one_session_is_recalled_in_a_new_session_only_for_its_user(
    proxy: Proxy,
) -> None:
    proxy.upstream.queue(f"{ANSWER}\n{memory_block([TEA])}", "Sure.", "Hi.")
    raw = proxy.client("ann", "s1").responses.with_raw_response.create(
        model="gpt-test", input="I drink green tea every morning", instructions="Be brief."
    )
    assert raw.parse().output_text == ANSWER
    assert raw.headers["x-headroom-memory-block"] == "stored"
    sent = proxy.upstream.last
    # The instruction leads `instructions` (stable bytes); the client's own follow.
    assert sent["instructions"] == f"{EXTRACTION_INSTRUCTION}\n\nBe brief."
    assert [m.content for m in proxy.memories("ann")] == [TEA]

    proxy.client("ann", "s2").responses.create(model="gpt-test", input="What should I drink?")
    sent = proxy.upstream.last
    recalled = memory_item(sent)
    assert recalled is not None and TEA in recalled
    # The memory item goes right before the latest user input (the string became an item).
    assert sent["input"][-1] == {"role": "user", "content": "What should I drink?"}

    proxy.client("bob", "s1").responses.create(model="gpt-test", input="What should I drink?")
    assert memory_item(proxy.upstream.last) is None


def test_stream_strips_every_text_event_and_stores_the_block(proxy: Proxy) -> None:
    before = readyz_counters(proxy).get("memory_block_stored", 0)
    proxy.upstream.queue(Reply(f"{ANSWER} {memory_block([TEA])}", chunk_seed=3))
    client = proxy.client("cat", "s1")
    with client.responses.stream(model="gpt-test", input="Tea please") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == ANSWER
    assert final.output_text == ANSWER
    assert TEA not in final.model_dump_json()
    assert final.usage is not None and final.usage.total_tokens == 2  # usage relayed
    assert [m.content for m in proxy.memories("cat")] == [TEA]
    assert readyz_counters(proxy)["memory_block_stored"] == before + 1


def test_streamed_headers_say_pending_and_raw_events_carry_no_block(proxy: Proxy) -> None:
    proxy.upstream.queue(Reply(f"{ANSWER}<memory>{json.dumps({'add': [TEA]})}</memory>",
                               chunk_seed=9))
    with httpx.stream(
        "POST", f"{proxy.base_url}/responses", headers=proxy.headers("dan"),
        json={"model": "gpt-test", "input": "hi", "stream": True}, timeout=30,
    ) as response:
        body = response.read().decode()
    assert response.headers["x-headroom-memory-block"] == "pending"
    assert TEA not in body and "<memory>" not in body
    assert body.rstrip().splitlines()[-1].startswith('data: {"type":"response.completed"')


def test_json_text_format_and_tools_pass_without_extraction(proxy: Proxy) -> None:
    tool = {"type": "function", "name": "weather", "parameters": {"type": "object"}}
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}]
    proxy.upstream.queue(Reply('{"ok": true}', tool_calls=calls))
    raw = proxy.client("eve").responses.with_raw_response.create(
        model="gpt-test", input="weather?", tools=[tool],  # type: ignore[list-item]
        text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
    )
    sent = proxy.upstream.last
    assert "instructions" not in sent
    assert sent["tools"] == [tool]
    assert raw.headers["x-headroom-memory-block"] == "off"
    assert "text.format asks for JSON" in raw.headers["x-headroom-memory-notes"]
    output = raw.parse().output
    assert output[1].type == "function_call" and output[1].arguments == '{"city":"Oslo"}'


def test_previous_response_id_recalls_from_the_new_input_only(proxy: Proxy) -> None:
    proxy.run(proxy.engine.add(TEA, proxy.uid("fay")))
    proxy.upstream.queue("Ok.")
    proxy.client("fay").responses.create(
        model="gpt-test", previous_response_id="resp_earlier",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Morning drink?"}]}],
    )
    sent = proxy.upstream.last
    assert sent["previous_response_id"] == "resp_earlier"
    recalled = memory_item(sent)
    assert recalled is not None and TEA in recalled
    assert sent["input"][0]["role"] == "system" and sent["input"][1]["role"] == "user"


def test_async_client_create_stream_and_whole(proxy: Proxy) -> None:
    proxy.upstream.queue(Reply(f"{ANSWER}{memory_block([TEA])}", chunk_seed=1),
                         f"{ANSWER}{memory_block(['Lives in Oslo'])}")

    async def run() -> tuple[str, str]:
        client = proxy.async_client("gus")
        try:
            stream = await client.responses.create(model="gpt-test", input="a", stream=True)
            text = "".join([e.delta async for e in stream
                            if e.type == "response.output_text.delta"])
            whole = await client.responses.create(model="gpt-test", input="b")
            return text, whole.output_text
        finally:
            await client.close()

    assert asyncio.run(run()) == (ANSWER, ANSWER)
    assert sorted(m.content for m in proxy.memories("gus")) == sorted([TEA, "Lives in Oslo"])


def test_groq_style_path_alias_reaches_the_memory_route(proxy: Proxy) -> None:
    from openai import OpenAI

    proxy.upstream.queue(f"Hi.{memory_block([TEA])}")
    client = OpenAI(base_url=f"{proxy.url}/openai/v1", api_key="sk-x", max_retries=0,
                    default_headers=proxy.headers("hal"))
    proxy.clients.append(client)
    answer = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "tea"}]
    )
    assert answer.choices[0].message.content == "Hi."
    assert [m.content for m in proxy.memories("hal")] == [TEA]
    assert client.models.list().data[0].id == "fake-model"  # pass-through routes too


def test_block_receipt_per_outcome_and_its_counters(proxy: Proxy) -> None:
    before = readyz_counters(proxy)
    proxy.upstream.queue("No block here.", 'Cut <memory>{"add": ["Likes ',
                         "Odd.<memory>not json at all</memory>")
    client = proxy.client("ivy")
    outcomes = [client.responses.with_raw_response.create(model="m", input="hi")
                .headers["x-headroom-memory-block"] for _ in range(3)]
    assert outcomes == ["none", "truncated", "invalid"]
    after = readyz_counters(proxy)
    for outcome in ("none", "truncated", "invalid"):
        key = f"memory_block_{outcome}"
        assert after.get(key, 0) == before.get(key, 0) + 1


def test_path_aliases_are_configurable() -> None:
    from headroom.proxy.aliases import PathAliases

    seen: list[tuple[str, bytes]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["path"], scope["raw_path"]))

    aliases = PathAliases(app, [("/openai/v1/", "/v1/"), ("/openai/v1/x/", "/v1/y/")])
    for path in ("/openai/v1/chat/completions", "/openai/v1/x/z", "/v1/models",
                 "/other/v1/models"):
        scope = {"type": "http", "path": path, "raw_path": path.encode()}
        asyncio.run(aliases(scope, None, None))
    assert [p for p, _ in seen] == ["/v1/chat/completions", "/v1/y/z", "/v1/models",
                                    "/other/v1/models"]
    assert seen[0][1] == b"/v1/chat/completions"  # the upstream gets the served path

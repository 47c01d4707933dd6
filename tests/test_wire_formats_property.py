"""The SSE rule, per wire format: for every chunking of the same upstream answer (text pieces and
the SSE bytes cut anywhere), the client sees exactly the non-streamed answer's visible text, in
every event that carries it, and the same block is stored."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from headroom.proxy.stream import SSEStripper
from headroom.turn.anthropic import MESSAGES
from headroom.turn.chat import CHAT_COMPLETIONS
from headroom.turn.responses import RESPONSES
from tests.servers import (
    message_object,
    messages_events,
    named_sse,
    response_object,
    responses_events,
)

_FRAGMENTS = [
    "Hello", " ", "\n", "<memory>", "</memory>", '{"add":["Likes tea"]}', "<mem", "ory>",
    "```json\n", "```", '"', "{", "}", "[", "]", "words here", "é", "\\", "</mem",
]
texts = st.lists(st.sampled_from(_FRAGMENTS), max_size=14).map("".join)


@st.composite
def chunked(draw: st.DrawFn) -> tuple[str, list[str], list[int]]:
    """A text, its split into deltas, and cut points for the SSE bytes."""
    text = draw(texts)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=8))))
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    byte_cuts = draw(st.lists(st.integers(1, 4000), max_size=12))
    return text, pieces, byte_cuts


def _relay(stripper: Any, wire: bytes, byte_cuts: list[int]) -> list[dict[str, Any]]:
    """What the client receives: the wire bytes cut at `byte_cuts`, through an SSEStripper."""
    sse = SSEStripper(stripper)
    out = b""
    points = sorted({c for c in byte_cuts if c < len(wire)})
    for a, b in zip([0, *points], [*points, len(wire)], strict=True):
        out += sse.feed(wire[a:b])
    out += sse.finish() + sse.release()
    events = []
    for raw in out.split(b"\n\n"):
        data = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
        names = [line[7:] for line in raw.decode().split("\n") if line.startswith("event: ")]
        if data and data[0] != "[DONE]":
            event = json.loads("\n".join(data))
            if names and isinstance(event, dict) and "type" in event:
                assert names == [event["type"]]  # the event: line names what the data is
            events.append(event)
    return events


@settings(max_examples=150, deadline=None)
@given(chunked())
def test_responses_stream_equals_whole(case: tuple[str, list[str], list[int]]) -> None:
    text, pieces, byte_cuts = case
    whole, block = RESPONSES.strip_answer(response_object(text, "m"))
    visible = whole["output"][0]["content"][0]["text"]
    stripper = RESPONSES.stream_stripper()
    events = _relay(stripper, named_sse(responses_events(pieces, "m")), byte_cuts)
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == visible
    by_type = {e["type"]: e for e in events}
    assert by_type["response.output_text.done"]["text"] == visible
    assert by_type["response.content_part.done"]["part"]["text"] == visible
    assert by_type["response.output_item.done"]["item"]["content"][0]["text"] == visible
    final = by_type["response.completed"]["response"]
    assert final["output"][0]["content"][0]["text"] == visible
    assert final["usage"] == whole["usage"]  # usage relayed
    assert events[-1]["type"] == "response.completed"
    assert stripper.chosen_block == block
    if "<memory>" not in text:
        assert visible == text


@settings(max_examples=150, deadline=None)
@given(chunked())
def test_messages_stream_equals_whole(case: tuple[str, list[str], list[int]]) -> None:
    text, pieces, byte_cuts = case
    whole, block = MESSAGES.strip_answer(message_object(text, "m"))
    visible = whole["content"][0]["text"]
    stripper = MESSAGES.stream_stripper()
    events = _relay(stripper, named_sse(messages_events(pieces, "m")), byte_cuts)
    deltas = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert deltas == visible
    kinds = [e["type"] for e in events]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert stripper.chosen_block == block


@settings(max_examples=150, deadline=None)
@given(chunked())
def test_chat_stream_equals_whole(case: tuple[str, list[str], list[int]]) -> None:
    text, pieces, byte_cuts = case
    completion = {"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    ]}
    whole, block = CHAT_COMPLETIONS.strip_answer(completion)
    base = {"id": "c", "object": "chat.completion.chunk"}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"content": p},
                                    "finish_reason": None}]} for p in pieces]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    wire = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
    stripper = CHAT_COMPLETIONS.stream_stripper()
    events = _relay(stripper, wire, byte_cuts)
    deltas = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert deltas == whole["choices"][0]["message"]["content"]
    assert stripper.chosen_block == block


def test_a_block_never_reaches_the_client_in_any_responses_event() -> None:
    text = 'Noted, you like tea.\n<memory>{"add":["Likes green tea"]}</memory>'
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    events = _relay(RESPONSES.stream_stripper(), named_sse(responses_events(pieces, "m")), [])
    assert "Likes green tea" not in json.dumps(events)
    assert any(e["type"] == "response.output_text.delta" for e in events)

"""The per-choice stripper (headroom/turn/stripper.py), the SSE reader (proxy/sse.py), and chat
completion chunks through both (headroom/turn/chat.py under proxy/stream.py).

The central property: for any answer and any split into chunks, the client sees exactly what the
non-streaming path would show, and no byte of a real block reaches it."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from headroom.proxy.sse import SSEDecoder, SSEEvent
from headroom.proxy.stream import SSEStripper
from headroom.turn.chat import ChunkRewriter, strip_completion
from headroom.turn.stripper import Block, BlockStripper, pick_block, split_block

FAST = settings(
    max_examples=100,
    deadline=None,
    # The only function-scoped fixture is conftest's autouse env setup, which is safe to share.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# --- strategies ----------------------------------------------------------------------------------

LOOKALIKES = [
    "<", "<m", "<mem", "<memory", "<memory ", "<memory>", "</memory>", "</mem", "<Memory>",
    "< memory>", "<memory/>", "<memories>", "memory>", ">", "<<", " ", "\n", "\t", "\r\n", "x",
    "é", "日本", "🙂", "{", "}", "[", "]", '"', "\\", "```", "```json\n", "\u00a0", "\u2028",
]  # fmt: skip
PROSE_LOOKALIKES = [f for f in LOOKALIKES if not set(f) & set("{[")]

any_text = st.lists(st.one_of(st.sampled_from(LOOKALIKES), st.text(max_size=6)), max_size=25).map(
    "".join
)
# Without "{" or "[", a stray `<memory>` in the answer always reads as prose, so it can never hide
# the real block inside a JSON string: the expected visible text is the prefix, right-stripped.
prefix_text = st.lists(
    st.one_of(
        st.sampled_from(PROSE_LOOKALIKES),
        st.text(alphabet=st.characters(blacklist_characters="{["), max_size=6),
    ),
    max_size=20,
).map("".join)
whitespace = st.text(alphabet=" \t\n\r\u00a0\u3000", max_size=4)
memory_text = st.one_of(
    st.sampled_from(["uses </memory> tags", "<memory>{}</memory>", 'say "hi"\\', "}]"]),
    st.text(max_size=30),
)
ops_json = st.builds(
    lambda adds, forgets, ascii_: json.dumps(
        {"add": [{"text": t, "category": "fact"} for t in adds], "forget": forgets},
        ensure_ascii=ascii_,
    ),
    st.lists(memory_text, max_size=3),
    st.lists(st.sampled_from(["m1", "m2"]), max_size=2),
    st.booleans(),
)
block_body = st.one_of(
    ops_json, ops_json.map(lambda j: f"\n```json\n{j}\n```\n"), ops_json.map(lambda j: f" {j} ")
)


@st.composite
def chunkings(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def stream(parts: list[str], *, cut_off: bool = False) -> tuple[str, BlockStripper]:
    stripper = BlockStripper()
    out = "".join(stripper.feed(p) for p in parts)
    return out + stripper.finish(cut_off=cut_off), stripper


# --- BlockStripper -------------------------------------------------------------------------------


@FAST
@given(text=any_text, cut_off=st.booleans(), data=st.data())
@example(text="a <memory>{}</memory>", cut_off=False, data=None)
@example(text="a\n\n<memo", cut_off=True, data=None)
@example(text='<memory>{"a":"</memory>"} b', cut_off=False, data=None)
def test_chunking_never_matters(text: str, cut_off: bool, data: st.DataObject | None) -> None:
    parts = data.draw(chunkings(text)) if data else list(text)
    streamed, stripper = stream(parts, cut_off=cut_off)
    assert (streamed, stripper.block, stripper.truncated) == split_block(text, cut_off=cut_off)


@FAST
@given(prefix=prefix_text, gap=whitespace, body=block_body, trail=whitespace, data=st.data())
@example(prefix="", gap="", body="{}", trail="", data=None)
@example(prefix="I use <memory> tags", gap=" ", body="{}", trail="\n", data=None)  # brief's case
@example(prefix="x <memory>a</memory>", gap=" ", body="{}", trail="", data=None)
@example(prefix="<mem", gap="", body="{}", trail="", data=None)
@example(prefix='see <memory> "x', gap="\n", body="{}", trail="", data=None)
@example(prefix="<memory>```", gap="", body="{}", trail="", data=None)
def test_a_final_block_never_leaks(
    prefix: str, gap: str, body: str, trail: str, data: st.DataObject | None
) -> None:
    text = f"{prefix}{gap}<memory>{body}</memory>{trail}"
    parts = data.draw(chunkings(text)) if data else [text]
    streamed, stripper = stream(parts)
    assert streamed == prefix.rstrip()
    assert stripper.block == body
    assert stripper.truncated is False


@FAST
@given(prefix=prefix_text, gap=whitespace, body=block_body, data=st.data())
@example(prefix="answer", gap="\n", body="{}", data=None)
def test_a_cut_off_block_never_leaks(
    prefix: str, gap: str, body: str, data: st.DataObject | None
) -> None:
    full = f"<memory>{body}"
    keep = data.draw(st.integers(1, len(full))) if data else len(full)
    text = prefix + gap + full[:keep]
    parts = data.draw(chunkings(text)) if data else [text]
    streamed, stripper = stream(parts, cut_off=True)
    assert stripper.truncated is True
    if keep >= len("<memory>"):
        assert streamed == prefix.rstrip()
        assert stripper.block == full[len("<memory>") : keep]
    else:
        # Cut inside the opening tag: an earlier unclosed `<memory>` in the prose (if any) now
        # runs to the end and is stripped with it; either way no part of the tag is shown.
        assert prefix.rstrip().startswith(streamed)
        assert streamed == (prefix.rstrip() if "<memory>" not in prefix else streamed)


@FAST
@given(text=prefix_text, data=st.data())
def test_text_without_a_block_is_unchanged(text: str, data: st.DataObject) -> None:
    if "<memory>" in text:
        text = text.replace("<memory>", "<memory >")
    streamed, stripper = stream(data.draw(chunkings(text)))
    assert streamed == text
    assert stripper.block is None


@pytest.mark.parametrize(
    ("text", "visible", "block", "truncated"),
    [
        ("Hi.\n\n<memory>{}</memory>\n", "Hi.", "{}", False),
        ("<memory>{}</memory>", "", "{}", False),
        ("Use <memory> tags. More.", "Use <memory> tags. More.", None, False),
        # Prose mentioning the tag that ends normally stays; a JSON-looking body is a block.
        ("Use the <memory> tag.", "Use the <memory> tag.", None, False),
        ('A <memory>{"add":[', "A", '{"add":[', True),
        ("A <memory>", "A", "", True),
        ("A <memory>\n```json\n{", "A", "\n```json\n{", True),
        ("A <memory>```json\n", "A", "```json\n", True),
        ("Use <memory> `tags`.", "Use <memory> `tags`.", None, False),
        ("A <memory>```\nhello", "A <memory>```\nhello", None, False),
        # Prose with brackets and an odd quote cannot hide the real block that follows.
        ('I <memory> x[ "b]. <memory>{"a":[]}</memory>', 'I <memory> x[ "b].', '{"a":[]}', False),
        ("x <memory></memory>", "x", "", False),
        ("<memory>a</memory> b <memory>{}</memory>", "<memory>a</memory> b", "{}", False),
        # A JSON block with text after it leaves too; two blocks are both kept.
        ('Ok.<memory>{"add":["a"]}</memory>\n<memory>{"add":["b"]}</memory>', "Ok.",
         '{"add":["a"]}\n{"add":["b"]}', False),
        ("A <memory>{}</memory> B", "A B", "{}", False),
        ("A<memory>{}</memory>\n\nB", "A\n\nB", "{}", False),
        ("Ok.<memory>{}</memory>\u200b", "Ok.\u200b", "{}", False),
        ("Use <memory>tags</memory> here.", "Use <memory>tags</memory> here.", None, False),
        ("<memory>a</memory>\n<memory>{}</memory>", "<memory>a</memory>", "{}", False),
        ('x <memory>{"t":"</memory> y"}</memory>', "x", '{"t":"</memory> y"}', False),
        ('x <memory>{"t":"<memory>"}</memory>', "x", '{"t":"<memory>"}', False),
        ('x <memory>{"t":"a\\"</memory>"}</memory>', "x", '{"t":"a\\"</memory>"}', False),
        ("x </memory> y", "x </memory> y", None, False),
        ("trailing space only  \n", "trailing space only  \n", None, False),
        ("a <mem", "a <mem", None, False),
    ],
)
def test_split_block_cases(text: str, visible: str, block: str | None, truncated: bool) -> None:
    assert split_block(text) == (visible, block, truncated)


def test_cut_off_strips_a_dangling_partial_tag_only_when_cut_off() -> None:
    assert split_block("answer\n<mem", cut_off=True) == ("answer", "", True)
    assert split_block("answer\n<mem") == ("answer\n<mem", None, False)
    assert split_block("answer <", cut_off=True) == ("answer", "", True)
    assert split_block("answer  ", cut_off=True) == ("answer  ", None, False)


def test_cut_off_unclosed_prose_candidate_is_stripped() -> None:
    assert split_block("Use the <memory> tag", cut_off=True) == ("Use the", " tag", True)


def test_forwards_text_early_and_holds_only_what_could_be_the_tag() -> None:
    s = BlockStripper()
    assert s.feed("Hello wor") == "Hello wor"
    assert s.feed("ld <mem") == "ld"  # " <mem" could still open a block
    assert s.feed("o") == ""
    assert s.feed("s are nice\n") == " <memos are nice"  # the newline may precede a block
    assert s.feed("<memory>{") == ""
    # Text after a JSON block is answer text; the block leaves all the same.
    assert s.feed('"add":[]}</memory> more') == "\nmore"
    assert s.feed("  ") == ""
    assert s.finish() == "  "
    assert s.block == '{"add":[]}'


@FAST
@given(prefix=prefix_text, gap=whitespace, body=block_body, mid=prefix_text, second=st.booleans(),
       data=st.data())
@example(prefix="Ok.", gap="", body='{"add":["a"]}', mid="", second=True, data=None)  # review's
@example(prefix="A", gap=" ", body="{}", mid=" B", second=False, data=None)
@example(prefix="Ok.", gap="", body="{}", mid="\u200b", second=False, data=None)
def test_a_block_followed_by_text_or_another_block_never_leaks(
    prefix: str, gap: str, body: str, mid: str, second: bool, data: st.DataObject | None
) -> None:
    """Models write a closing line after the block, or two blocks: each block leaves the
    answer and every one is kept, whatever the chunking."""
    tail = f"<memory>{body}</memory>" if second else ""
    text = f"{prefix}{gap}<memory>{body}</memory>x{mid}{tail}"
    parts = data.draw(chunkings(text)) if data else [text]
    streamed, stripper = stream(parts)
    assert (streamed, stripper.block) == split_block(text)[:2]
    assert f"<memory>{body}</memory>" not in streamed
    assert streamed.startswith(prefix.rstrip()) and ("x" + mid).rstrip() in streamed
    assert stripper.block == (f"{body}\n{body}" if second else body)


def test_feed_after_finish_is_an_error_and_finish_is_idempotent() -> None:
    s = BlockStripper()
    s.feed("a<memory>{}</memory>")
    assert s.finish() == ""
    assert s.finish() == ""
    assert s.block == "{}"
    with pytest.raises(RuntimeError):
        s.feed("x")


# --- SSEDecoder ----------------------------------------------------------------------------------

sse_value = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=20
)
sse_event = st.one_of(
    st.lists(sse_value, min_size=1, max_size=3).map(lambda vs: [f"data: {v}" for v in vs]),
    sse_value.map(lambda v: [f": {v}"]),
    st.tuples(sse_value, sse_value).map(lambda t: [f"event: {t[0]}", f"data:{t[1]}"]),
    st.just(["data: [DONE]"]),
)


@FAST
@given(
    events=st.lists(sse_event, max_size=6),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    data=st.data(),
)
def test_sse_decoder_any_chunking(events: list[list[str]], eol: str, data: st.DataObject) -> None:
    wire = "".join(eol.join(lines) + eol + eol for lines in events).encode()
    cuts = sorted(data.draw(st.sets(st.integers(0, len(wire)), max_size=10)))
    decoder = SSEDecoder()
    got: list[SSEEvent] = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += decoder.feed(wire[a:b])
    got += decoder.flush()
    assert b"".join(e.raw for e in got) == wire  # nothing lost, nothing invented
    assert [list(e.lines) for e in got] == events
    expected = [
        "\n".join(x.split(":", 1)[1].removeprefix(" ") for x in lines if x.startswith("data"))
        for lines in events
    ]
    assert [e.data or "" for e in got] == expected


def test_sse_decoder_details() -> None:
    decoder = SSEDecoder()
    snowman = "data: ☃\n\n".encode()
    assert decoder.feed(b"\xef\xbb\xbf" + snowman[:7]) == []  # split inside the UTF-8 sequence
    (event,) = decoder.feed(snowman[7:])
    assert event.data == "☃"
    assert decoder.feed(b"data: a\r") == []  # a CR may be half of CRLF
    (event,) = decoder.feed(b"\n\r\n")
    assert event.data == "a" and event.raw == b"data: a\r\n\r\n"
    (event,) = decoder.feed(b": keep-alive\n\n")
    assert event.data is None
    (event,) = decoder.feed(b"data\ndata:x\n\n")
    assert event.data == "\nx"
    assert decoder.feed(b"data: [DONE]") == []
    (event,) = decoder.flush()  # the upstream forgot the final blank line
    assert event.data == "[DONE]" and event.raw == b"data: [DONE]"
    assert decoder.flush() == []


def test_event_with_data_keeps_other_fields() -> None:
    event = SSEEvent(b"", ("event: chunk", "data: a", "data: b", "id: 7"))
    assert event.with_data("x\ny").lines == ("event: chunk", "data: x", "data: y", "id: 7")
    assert SSEEvent.from_data("z").raw == b"data: z\n\n"


# --- ChunkRewriter -------------------------------------------------------------------------------

ENVELOPE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}


def chunk(*choices: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**ENVELOPE, "choices": list(choices), **extra}


def choice(index: int = 0, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def sse(obj: dict[str, Any] | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def run(wire: bytes, pieces: int = 1) -> tuple[bytes, SSEStripper]:
    s = SSEStripper(ChunkRewriter())
    step = max(1, len(wire) // pieces)
    out = b"".join(s.feed(wire[i : i + step]) for i in range(0, len(wire), step))
    return out + s.finish() + s.release(), s


def parsed(wire: bytes) -> Iterator[dict[str, Any] | str]:
    decoder = SSEDecoder()
    for event in decoder.feed(wire) + decoder.flush():
        if event.data is not None:
            yield event.data if event.data == "[DONE]" else json.loads(event.data)


def contents(wire: bytes) -> dict[int, str]:
    out: dict[int, str] = {}
    for obj in parsed(wire):
        if isinstance(obj, dict):
            for c in obj["choices"]:
                out[c["index"]] = out.get(c["index"], "") + (c["delta"].get("content") or "")
    return out


def answer_stream(parts_by_choice: dict[int, list[str]], finish: str = "stop") -> bytes:
    wire = [sse(chunk(choice(i, role="assistant", content=""))) for i in parts_by_choice]
    longest = max(len(p) for p in parts_by_choice.values())
    for n in range(longest):
        for i, parts in parts_by_choice.items():
            if n < len(parts):
                wire.append(sse(chunk(choice(i, content=parts[n]))))
    wire += [sse(chunk(choice(i, finish))) for i in parts_by_choice]
    wire += [sse(chunk(usage={"total_tokens": 3})), sse("[DONE]")]
    return b"".join(wire)


answers = st.one_of(
    any_text,
    st.builds(lambda p, b: f"{p}\n<memory>{b}</memory>", prefix_text, block_body),
    st.builds(lambda p, b, k: f"{p} <memory>{b}"[: len(p) + 9 + k], prefix_text, block_body,
              st.integers(0, 40)),  # a block cut off by max_tokens
)


@settings(FAST, max_examples=60)  # each example is a whole multi-choice SSE stream
@given(
    texts=st.lists(answers, min_size=1, max_size=3),
    finish=st.sampled_from(["stop", "length"]),
    crlf=st.booleans(),
    pieces=st.integers(1, 40),
    data=st.data(),
)  # fmt: skip
def test_stream_equals_non_stream_for_every_choice(
    texts: list[str], finish: str, crlf: bool, pieces: int, data: st.DataObject
) -> None:
    parts = {i: data.draw(chunkings(t)) for i, t in enumerate(texts)}
    wire = answer_stream(parts, finish)
    if crlf:
        wire = wire.replace(b"\n", b"\r\n")
    out, s = run(wire, pieces)
    expected = {i: split_block(t, cut_off=finish == "length") for i, t in enumerate(texts)}
    assert contents(out) == {i: e[0] for i, e in expected.items()}
    blocks = {i: Block(i, e[1], e[2]) for i, e in expected.items() if e[1] is not None}
    assert s.stripper.blocks == blocks
    assert s.chosen_block == pick_block(blocks)
    assert list(parsed(out))[-1] == "[DONE]"


def test_untouched_events_pass_byte_for_byte() -> None:
    role = b'data: {"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    tool = sse(chunk(choice(tool_calls=[{"index": 0, "id": "c", "function": {"name": "f"}}])))
    plain = sse(chunk(choice(content="Hello")))
    usage = sse(chunk(usage={"total_tokens": 1}) | {"choices": []})
    comment, error, done = b": keep-alive\r\n\r\n", b"data: not json\n\n", b"data: [DONE]\n\n"
    wire = role + comment + tool + plain + usage + error + done
    out, _ = run(wire)
    assert out == wire


def test_held_text_goes_out_before_the_finish_chunk() -> None:
    wire = sse(chunk(choice(content="Hi <mem"))) + sse(chunk(choice(finish="stop"), usage=None))
    out, s = run(wire)
    objs = list(parsed(out))
    assert [o["choices"][0]["delta"] for o in objs] == [
        {"content": "Hi"}, {"content": " <mem"}, {}
    ]  # fmt: skip
    extra = objs[1]
    assert {k: extra[k] for k in ENVELOPE} == ENVELOPE
    assert extra["usage"] is None and extra["choices"][0]["finish_reason"] is None
    assert objs[2]["choices"][0]["finish_reason"] == "stop"
    assert s.chosen_block is None


def test_finish_chunk_with_its_own_content_carries_the_rest() -> None:
    wire = sse(chunk(choice(content="Hi\n"))) + sse(chunk(choice(finish="stop", content="you <")))
    out, _ = run(wire)
    assert [o["choices"][0]["delta"]["content"] for o in parsed(out)] == ["Hi", "\nyou <"]


def test_emptied_chunks_are_dropped_unless_they_carry_something() -> None:
    wire = b"".join(
        [
            sse(chunk(choice(content="Done."))),
            sse(chunk(choice(content="\n<memory>{"))),  # dropped: nothing else in it
            sse(chunk(choice(content="}", role="assistant"))),  # kept for its role
            sse(chunk(choice(content="</memory>"), x_vendor={"a": 1})),  # unknown field: kept
            sse(chunk(choice(content="\n") | {"logprobs": {"content": []}})),  # kept
            sse(chunk(choice(content=" "), obfuscation="pad")),  # padding only: dropped
            sse(chunk(choice(finish="length"))),
        ]
    )
    out, s = run(wire)
    objs = list(parsed(out))
    assert [o["choices"][0]["delta"].get("content") for o in objs] == ["Done.", "", "", "", None]
    assert objs[1]["choices"][0]["delta"]["role"] == "assistant"
    assert objs[2]["x_vendor"] == {"a": 1}
    assert s.chosen_block == Block(0, "{}", False)


def test_done_flushes_a_choice_that_never_finished() -> None:
    wire = sse(chunk(choice(content='Hi\n<memory>{"add"'))) + sse(chunk(choice(content="\n")))
    out, s = run(wire + b"data: [DONE]\n\n")
    assert contents(out) == {0: "Hi"}
    assert s.chosen_block == Block(0, '{"add"\n', True)
    out, _ = run(sse(chunk(choice(content="Hi <mem"))) + b"data: [DONE]\n\n")
    assert list(parsed(out)) == [chunk(choice(content="Hi")), "[DONE]"]  # cut off: tag dropped
    out, _ = run(sse(chunk(choice(content="Hi \n"))))  # no [DONE]: finish() flushes
    assert contents(out) == {0: "Hi \n"}


def test_after_done_everything_passes() -> None:
    late = sse(chunk(choice(content="<memory>{}</memory>")))
    wire = b"data: [DONE]\n\n" + late
    out, s = run(wire)
    assert out == wire and s.chosen_block is None
    rw = ChunkRewriter()
    assert rw.finish() == []
    data = chunk(choice(content="<memory>{}</memory>"))
    assert rw.feed(data)[0] is data


def test_content_after_finish_reason_is_forwarded_unchanged() -> None:
    rw = ChunkRewriter()
    rw.feed(chunk(choice(finish="stop")))
    late = chunk(choice(content=" <memory>"))
    (out,) = rw.feed(late)
    assert out is late


def test_done_and_what_follows_are_held_until_released() -> None:
    """The caller makes the block durable between `done` and `release()`."""
    s = SSEStripper(ChunkRewriter())
    head = sse(chunk(choice(content="Hi <memory>{}</memory>", finish="stop")))
    out = s.feed(head + b"data: [DONE]\n\n: after\n\n")
    assert list(parsed(out)) == [chunk(choice(content="Hi", finish="stop"))]
    assert s.done and s.chosen_block == Block(0, "{}", False)
    assert s.feed(b": more\n\n") == b""
    assert s.release() == b"data: [DONE]\n\n: after\n\n: more\n\n"
    assert s.feed(b": later\n\n") == b": later\n\n"


def test_rewritten_chunks_are_compact_utf8() -> None:
    """orjson re-serialises a changed chunk: non-ASCII text stays UTF-8, never \\u escapes."""
    wire = sse(chunk(choice(content="日本語の答え <mem"))) + sse(chunk(choice(finish="stop")))
    out, _ = run(wire)
    assert "日本語の答え".encode() in out and b"\\u" not in out


def test_a_chunk_orjson_refuses_is_still_stripped() -> None:
    """A lone surrogate escape is valid JSON that orjson refuses: the block must not leak."""
    wire = b'data: {"choices":[{"index":0,"delta":{"content":"a\\ud800 <memory>{}</memory>"},'
    wire += b'"finish_reason":"stop"}]}\n\n'
    out, s = run(wire)
    assert b"memory" not in out and s.chosen_block == Block(0, "{}", False)


def test_choices_are_independent_and_choice_zero_is_preferred() -> None:
    parts = {0: ["A", "\n<memory>", '{"add":["x"]}', "</memory>"], 1: ["B <memory>{}</memory>"]}
    out, s = run(answer_stream(parts))
    assert contents(out) == {0: "A", 1: "B"}
    assert s.chosen_block == Block(0, '{"add":["x"]}', False)
    out, s = run(answer_stream({0: ["A"], 1: ["B <memory>{}</memory>"]}))
    assert s.chosen_block == Block(1, "{}", False)
    assert pick_block({}) is None


def test_rewritten_event_keeps_its_other_sse_fields() -> None:
    data = json.dumps(chunk(choice(content="a <mem")))
    out, _ = run(f"id: 4\ndata: {data}\n\n".encode())
    first = out.split(b"\n\n")[0].split(b"\n")
    assert first[0] == b"id: 4"
    assert json.loads(first[1][6:])["choices"][0]["delta"]["content"] == "a"


# --- the non-streaming path ----------------------------------------------------------------------


def test_strip_completion_uses_the_same_rules() -> None:
    completion = {
        "id": "c",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi\n<memory>{}</memory>"},
             "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": []},
             "finish_reason": "tool_calls"},
            {"index": 2, "message": {"content": "Yo <memory>{\"add\":"}, "finish_reason": "length"},
            {"index": 3, "message": {"content": "Cut <mem"}, "finish_reason": "length"},
        ],
        "usage": {"total_tokens": 5},
    }  # fmt: skip
    before = json.dumps(completion)
    out, blocks = strip_completion(completion)
    assert json.dumps(completion) == before  # the input is not modified
    assert [c["message"]["content"] for c in out["choices"]] == ["Hi", None, "Yo", "Cut"]
    assert out["usage"] == completion["usage"]
    assert blocks == {0: Block(0, "{}", False), 2: Block(2, '{"add":', True), 3: Block(3, "", True)}


def test_strip_completion_tolerates_odd_shapes() -> None:
    assert strip_completion({"error": {"message": "x"}}) == ({"error": {"message": "x"}}, {})
    out, blocks = strip_completion({"choices": ["junk", {"message": {"content": "a"}}]})
    assert out["choices"][1]["message"]["content"] == "a" and blocks == {}


def test_several_choices_in_one_chunk() -> None:
    wire = sse(chunk(choice(0, content="a <mem"), choice(1, content="b\n<memory>{}</memory>")))
    wire += sse(chunk(choice(0, "stop"), choice(1, "stop")))
    out, s = run(wire)
    objs = list(parsed(out))
    assert [[c["delta"].get("content") for c in o["choices"]] for o in objs] == [
        ["a", "b"],
        [" <mem"],
        [None, None],
    ]
    assert objs[1]["choices"][0]["index"] == 0
    assert s.stripper.blocks == {1: Block(1, "{}", False)}

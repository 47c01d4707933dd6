"""Parsing the `<memory>` block into ops (headroom/turn/block.py): every tolerance, no raise."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from headroom.memory.models import AddOp, ForgetOp, MemoryCategory, MemoryOps, ScopeLevel, UpdateOp
from headroom.memory.text import clean_text
from headroom.turn.block import MAX_ITEMS, MAX_TEXT_CHARS, ParsedBlock, parse_ops
from headroom.turn.stripper import split_block

FAST = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
ALIASES = {"m1": "id-1", "m2": "id-2", "m3": "id-3"}


def parse(body: str | None, *, truncated: bool = False) -> ParsedBlock:
    return parse_ops(body, truncated=truncated, aliases=ALIASES)


def ops(body: str, *, truncated: bool = False) -> MemoryOps:
    return parse(body, truncated=truncated).ops


def test_the_design_example() -> None:
    body = (
        '{"add":[{"text":"Prefers Go for performance-critical code","category":"preference",'
        '"importance":0.8,"scope":"user"}],'
        '"update":[{"id":"m2","text":"Works at Anthropic (previously Google)"}],"forget":["m3"]}'
    )
    result = parse(body)
    assert result.warnings == ()
    assert result.ops == MemoryOps(
        add=(AddOp("Prefers Go for performance-critical code", MemoryCategory.PREFERENCE, 0.8),),
        update=(UpdateOp("id-2", "Works at Anthropic (previously Google)"),),
        forget=(ForgetOp("id-3"),),
    )


def test_split_block_returns_visible_body_and_truncation() -> None:
    assert split_block("Sure.\n<memory>{}</memory>") == ("Sure.", "{}", False)
    assert split_block("Sure.") == ("Sure.", None, False)


@pytest.mark.parametrize(
    "body",
    [
        '```json\n{"add":[{"text":"Likes tea"}]}\n```',
        '\n```\n{"add":[{"text":"Likes tea"}]}\n```\n',
        'Here you go: {"add":[{"text":"Likes tea"}]} done',
        '{"add":[{"text":"Likes tea",},],}',  # trailing commas
        '{"add":{"text":"Likes tea"}}',  # a single item instead of a list
        '{"add":"Likes tea"}',  # a bare string item
        '{"ADD":[{"Text":"  Likes\n tea "}]}',  # key case, whitespace
        '{"add":[{"content":"Likes tea"}]}',  # "content" for "text"
        '[{"text":"Likes tea"}]',  # a bare list of adds (warned)
    ],
)
def test_tolerated_shapes(body: str) -> None:
    assert ops(body) == MemoryOps(add=(AddOp("Likes tea"),))


def test_trailing_comma_inside_a_string_is_kept() -> None:
    assert ops('{"add":[{"text":"a, ]"},]}').add == (AddOp("a, ]"),)


@pytest.mark.parametrize(
    ("forget", "expected"),
    [
        ('["m1","m2"]', ("id-1", "id-2")),
        ('"m1"', ("id-1",)),
        ('[{"id":"m1"},{"alias":"M2"}]', ("id-1", "id-2")),
        ('{"id":"[m3]"}', ("id-3",)),
        ('["m1","m1"]', ("id-1",)),  # duplicates collapse
    ],
)
def test_forget_forms(forget: str, expected: tuple[str, ...]) -> None:
    result = parse(f'{{"forget":{forget}}}')
    assert result.ops.forget == tuple(ForgetOp(i) for i in expected)
    assert result.warnings == ()


def test_delete_and_remove_mean_forget() -> None:
    assert ops('{"delete":["m1"],"remove":"m2"}').forget == (ForgetOp("id-1"), ForgetOp("id-2"))


def test_unknown_category_defaults_to_fact_with_a_warning() -> None:
    result = parse('{"add":[{"text":"x","category":"hobby"}]}')
    assert result.ops.add == (AddOp("x", MemoryCategory.FACT),)
    assert "unknown category 'hobby'" in result.warnings[0]


def test_category_case_and_plural() -> None:
    result = parse('{"add":[{"text":"x","category":" Preferences "}]}')
    assert result.ops.add[0].category is MemoryCategory.PREFERENCE and result.warnings == ()


@pytest.mark.parametrize(
    ("raw", "expected", "warns"),
    [
        ("0.8", 0.8, False),
        ("1.7", 1.0, False),
        ("-3", 0.0, False),
        ('"0.3"', 0.3, False),
        ('"high"', 0.5, True),
        ("true", 0.5, True),
        ("null", 0.5, False),
        ("NaN", 0.5, True),
        ("Infinity", 0.5, True),
        ("[1]", 0.5, True),
    ],
)
def test_importance_is_clamped_or_defaulted(raw: str, expected: float, warns: bool) -> None:
    result = parse(f'{{"add":[{{"text":"x","importance":{raw}}}]}}')
    assert result.ops.add[0].importance == pytest.approx(expected)
    assert bool(result.warnings) is warns


@pytest.mark.parametrize(
    ("raw", "expected", "warns"),
    [
        ('"session"', ScopeLevel.SESSION, False),
        ('"AGENT"', ScopeLevel.AGENT, False),
        ('"turn"', ScopeLevel.TURN, False),
        ('"global"', ScopeLevel.USER, True),
        ("3", ScopeLevel.USER, True),
    ],
)
def test_scope_is_clamped(raw: str, expected: ScopeLevel, warns: bool) -> None:
    result = parse(f'{{"add":[{{"text":"x","scope":{raw}}}]}}')
    assert result.ops.add[0].scope is expected
    assert bool(result.warnings) is warns


def test_entity_refs() -> None:
    result = parse('{"add":[{"text":"x","entities":["Go"," Go ","",3,"Rust"]},'
                   '{"text":"y","entity_refs":"Anthropic"}]}')  # fmt: skip
    assert [a.entity_refs for a in result.ops.add] == [("Go", "Rust"), ("Anthropic",)]


@pytest.mark.parametrize(
    "item",
    ['{"text":"   "}', '{"text":""}', '{"category":"fact"}', '{"text":5}', "7", "null", '"  "'],
)
def test_items_without_usable_text_are_dropped_with_a_warning(item: str) -> None:
    result = parse(f'{{"add":[{item},{{"text":"kept"}}]}}')
    assert result.ops.add == (AddOp("kept"),)
    assert len(result.warnings) == 1


def test_over_long_text_is_dropped() -> None:
    result = parse(json.dumps({"add": [{"text": "x" * (MAX_TEXT_CHARS + 1)}, "ok"]}))
    assert result.ops.add == (AddOp("ok"),) and "longer" in result.warnings[0]


def test_too_many_items_are_capped() -> None:
    result = parse(json.dumps({"add": [f"fact {i}" for i in range(MAX_ITEMS + 5)]}))
    assert len(result.ops.add) == MAX_ITEMS and "only the first" in result.warnings[0]


def test_ops_on_memories_not_shown_are_dropped() -> None:
    result = parse('{"update":[{"id":"m9","text":"x"},{"id":"id-1","text":"y"}],"forget":["m7",3]}')
    assert result.ops == MemoryOps()
    assert len(result.warnings) == 4
    assert all("dropped" in w for w in result.warnings)


def test_update_fields() -> None:
    result = parse('{"update":[{"id":"m1","text":"new","category":"decision","importance":2},'
                   '{"id":"m2","text":"n2","category":"bogus","importance":"?"},'
                   '{"id":"m3"},{"id":"m3","text":"   "},"m1"]}')  # fmt: skip
    assert result.ops.update == (
        UpdateOp("id-1", "new", MemoryCategory.DECISION, 1.0),
        UpdateOp("id-2", "n2", None, None),
    )
    assert len(result.warnings) == 5
    assert "kept the memory's category" in result.warnings[0]


def test_one_op_per_memory() -> None:
    result = parse(
        '{"update":[{"id":"m1","text":"a"},{"id":"m1","text":"b"}],"forget":["m1","m2"]}'
    )
    assert result.ops.update == (UpdateOp("id-1", "a"),)
    assert result.ops.forget == (ForgetOp("id-2"),)
    assert len(result.warnings) == 2


def test_unknown_keys_are_warned_and_ignored() -> None:
    result = parse('{"add":["x"],"remember":["y"]}')
    assert result.ops.add == (AddOp("x"),) and "unknown key 'remember'" in result.warnings[0]


@pytest.mark.parametrize(
    "body",
    ["", "   ", "nothing here", "{", "[[[", '"just a string"', "{]", "}{", "\x00\ud800", "42"],
)
def test_junk_gives_empty_ops_and_a_warning(body: str) -> None:
    result = parse(body)
    assert result.ops == MemoryOps()
    assert result.warnings


def test_no_block_and_an_empty_object_are_silent() -> None:
    assert parse(None) == ParsedBlock(MemoryOps())
    assert parse("{}") == ParsedBlock(MemoryOps())
    assert parse('{"add":[],"update":[],"forget":[]}') == ParsedBlock(MemoryOps())


def test_truncated_block_keeps_complete_items_only() -> None:
    body = '{"add":[{"text":"Likes tea"},{"text":"Lives in Par'
    result = parse(body, truncated=True)
    assert result.ops.add == (AddOp("Likes tea"),)
    assert "cut off" in result.warnings[0]
    body = '```json\n{"add":[{"text":"a"}],"forget":["m1","m2'
    assert ops(body, truncated=True) == MemoryOps(add=(AddOp("a"),), forget=(ForgetOp("id-1"),))
    body = '{"add":[{"text":"a","category":"fact","importance":0.'
    assert ops(body, truncated=True) == MemoryOps()
    body = '{"add":[{"text":"a","entities":["Go"]'  # the item itself never closed
    assert ops(body, truncated=True) == MemoryOps()
    assert ops('{"add":[{"text":"a"}],"upd', truncated=True).add == (AddOp("a"),)


def test_malformed_but_not_truncated_is_repaired_too() -> None:
    result = parse('{"add":[{"text":"a"},{"text":"b" "c"}]}')
    assert result.ops.add == (AddOp("a"),)
    assert "malformed" in result.warnings[0]


# --- properties ----------------------------------------------------------------------------------

texts = st.text(min_size=1, max_size=20).filter(lambda t: t.strip())
add_items = st.fixed_dictionaries(
    {"text": texts},
    optional={
        "category": st.sampled_from([c.value for c in MemoryCategory]),
        "importance": st.floats(0, 1),
        "scope": st.sampled_from([s.value for s in ScopeLevel]),
    },
)
blocks = st.fixed_dictionaries(
    {},
    optional={
        "add": st.lists(add_items, max_size=4),
        "update": st.lists(
            st.fixed_dictionaries({"id": st.sampled_from(list(ALIASES)), "text": texts}),
            max_size=3,
        ),
        "forget": st.lists(st.sampled_from(list(ALIASES)), max_size=3),
    },
)


def normal(text: str) -> str:
    """Text as stored: made valid (clean_text), whitespace runs as one space."""
    return " ".join(clean_text(text).split())


def expected_ops(block: dict[str, Any]) -> MemoryOps:
    """What a well-formed block means, computed independently of the parser."""
    updates: dict[str, UpdateOp] = {}
    for u in block.get("update", []):
        memory_id = ALIASES[u["id"]]
        if normal(u["text"]):
            updates.setdefault(memory_id, UpdateOp(memory_id, normal(u["text"])))
    forgets = dict.fromkeys(ALIASES[f] for f in block.get("forget", []))
    return MemoryOps(
        add=tuple(
            AddOp(
                normal(a["text"]),
                MemoryCategory(a.get("category", "fact")),
                a.get("importance", 0.5),
                ScopeLevel(a.get("scope", "user")),
            )
            for a in block.get("add", [])
            if normal(a["text"])
        ),
        update=tuple(updates.values()),
        forget=tuple(ForgetOp(i) for i in forgets if i not in updates),
    )


@FAST
@given(block=blocks, ascii_=st.booleans(), indent=st.sampled_from([None, 1]))
def test_well_formed_blocks_round_trip(
    block: dict[str, Any], ascii_: bool, indent: int | None
) -> None:
    assert ops(json.dumps(block, ensure_ascii=ascii_, indent=indent)) == expected_ops(block)


@FAST
@given(block=blocks, data=st.data())
@example(block={"add": [{"text": "a"}, {"text": "b"}]}, data=None)
def test_any_truncation_keeps_a_prefix_of_the_items(
    block: dict[str, Any], data: st.DataObject | None
) -> None:
    full = json.dumps(block)
    cut = data.draw(st.integers(0, len(full))) if data else len(full) - 5
    got = ops(full[:cut], truncated=True)
    want = ops(full)
    assert want.add[: len(got.add)] == got.add
    assert want.update[: len(got.update)] == got.update
    assert set(got.forget) <= set(want.forget) | {ForgetOp(u.id) for u in want.update}


@FAST
@given(body=st.text(max_size=80), truncated=st.booleans())
@example(body='{"add":[{"text":"\\', truncated=True)
@example(body="[" * 2000, truncated=False)
def test_never_raises(body: str, truncated: bool) -> None:
    result = parse(body, truncated=truncated)
    assert isinstance(result.ops, MemoryOps)


def test_text_is_made_valid_at_parse_time() -> None:
    """Issue 9: `"\\ud800"` is valid JSON but no UTF-8 text; such a memory stopped every write."""
    (add,) = ops('{"add":[{"text":"poison \\ud800 tok","entities":["Bo\\udc00b"]}]}').add
    assert add.text == "poison \ufffd tok" and add.entity_refs == ("Bo\ufffdb",)
    add.text.encode()  # encodable
    assert ops('{"add":["a\\u0000b\\r\\nc"]}').add[0].text == "ab c"


def test_every_json_value_in_a_body_is_read() -> None:
    """The stripper joins several blocks' bodies with newlines: each one's ops count."""
    body = '```json\n{"add":["Has a dog"]}\n```\n{"add":["Likes tea"],"forget":["m1"]}'
    parsed = parse_ops(body, aliases={"m1": "id-1"})
    assert [op.text for op in parsed.ops.add] == ["Has a dog", "Likes tea"]
    assert [op.id for op in parsed.ops.forget] == ["id-1"]
    assert parsed.warnings == ()


def test_prose_with_brackets_after_the_object_stays_ignored() -> None:
    parsed = parse_ops('{"add":["Has a dog"]} [see above] {broken', aliases={})
    assert [op.text for op in parsed.ops.add] == ["Has a dog"]
    assert parsed.warnings == ()


def test_a_cut_off_second_block_keeps_its_complete_items() -> None:
    parsed = parse_ops('{"add":["Has a dog"]}\n{"add":["Likes tea", "Hal', truncated=True,
                       aliases={})
    assert [op.text for op in parsed.ops.add] == ["Has a dog", "Likes tea"]

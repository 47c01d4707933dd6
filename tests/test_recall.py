"""Unit tests of the pure ranking functions in memory.recall (no database, no model)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from headroom.memory.errors import ConfigError
from headroom.memory.hierarchical import HierarchicalMemory, MemoryDraft
from headroom.memory.models import Memory, MemoryCategory, MemoryFilter, Scope
from headroom.memory.recall import (
    PRESETS,
    RecallPreset,
    Scored,
    TimeWindow,
    add_context,
    adjacent,
    apply_budget,
    clean_query,
    context_rowids,
    drop_words,
    estimate_tokens,
    fuse,
    get_preset,
    minmax,
    query_terms,
    query_windows,
    rescore,
    strip_spans,
)
from tests.fakes import FakeEmbedder

NOW = datetime(2024, 3, 15, 12, 0, tzinfo=UTC)
PLAIN = RecallPreset("plain", w_importance=0.0, w_recency=0.0)


def mem(content: str = "x", *, user: str = "u", days_ago: float = 0.0, **kw: object) -> Memory:
    when = NOW - timedelta(days=days_ago)
    return Memory(content=content, user_id=user, created_at=when, valid_from=when, **kw)  # type: ignore[arg-type]


# --- minmax, fuse -------------------------------------------------------------------------------


def test_minmax_scales_to_unit_interval() -> None:
    assert minmax([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]


def test_minmax_of_equal_or_no_values() -> None:
    assert minmax([]) == []
    assert minmax([7.0]) == [1.0]
    assert minmax([3.0, 3.0]) == [1.0, 1.0]


def test_weighted_fusion_adds_raw_cosine_and_minmaxed_bm25() -> None:
    preset = RecallPreset("p", w_vector=0.4, w_text=0.6)
    out = fuse([(1, 0.8), (2, -0.3)], [(2, 10.0), (3, 4.0)], preset)
    assert set(out) == {1, 2, 3}
    assert out[1].score == pytest.approx(0.4 * 0.8)
    assert out[2].score == pytest.approx(0.0 + 0.6 * 1.0)  # negative cosine counts as 0
    assert out[3].score == pytest.approx(0.0)  # the weakest BM25 hit scales to 0
    assert (out[2].similarity, out[2].bm25) == (-0.3, 10.0)
    assert out[1].bm25 is None


def test_weighted_fusion_can_minmax_the_cosines() -> None:
    preset = RecallPreset("p", w_vector=1.0, w_text=0.0, vector_norm="minmax")
    out = fuse([(1, 0.9), (2, 0.5), (3, 0.7)], [], preset)
    assert [out[i].score for i in (1, 2, 3)] == pytest.approx([1.0, 0.0, 0.5])


def test_rrf_scores_by_rank_not_value() -> None:
    preset = RecallPreset("r", fusion="rrf", rrf_k=60)
    out = fuse([(1, 0.99), (2, 0.1)], [(2, 50.0)], preset)
    assert out[1].score == pytest.approx(0.5 / 61)
    assert out[2].score == pytest.approx(0.5 / 62 + 0.5 / 61)
    assert out[2].score > out[1].score


# --- presets, query cleaning ---------------------------------------------------------------------


def test_get_preset_by_name_or_object() -> None:
    assert get_preset("default") is PRESETS["default"]
    custom = RecallPreset("mine", w_vector=1.0)
    assert get_preset(custom) is custom


def test_get_preset_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown recall preset 'nope'.*default"):
        get_preset("nope")


@pytest.mark.parametrize(
    "changes",
    [{"fusion": "max"}, {"vector_norm": "zscore"}, {"context_span": -1},
     {"recency_half_life_days": 0.0}],
)
def test_preset_rejects_bad_knobs(changes: dict) -> None:
    with pytest.raises(ConfigError):
        RecallPreset("bad", **changes)


def test_clean_query_drops_stop_words() -> None:
    assert clean_query("What did Caroline research?", PLAIN) == "Caroline research"


def test_clean_query_keeps_everything_when_only_stop_words() -> None:
    assert clean_query("what is it", PLAIN) == "what is it"


def test_clean_query_without_stop_words_keeps_all_words() -> None:
    preset = RecallPreset("raw", stop_words=frozenset())
    assert clean_query("What did you do?", preset) == "What did you do"


# --- rescore -----------------------------------------------------------------------------------


def test_rescore_importance_raises_a_memory() -> None:
    preset = RecallPreset("i", w_importance=0.5, w_recency=0.0)
    scored = {1: Scored(1, 1.0), 2: Scored(2, 1.0)}
    rows = {1: mem(importance=0.2), 2: mem(importance=0.9)}
    ranked = rescore(scored, rows, NOW, preset)
    assert [s.rowid for s, _ in ranked] == [2, 1]
    assert ranked[0][0].score == pytest.approx(1.0 * (1 + 0.5 * 0.4))


def test_rescore_recency_favours_newer_but_only_by_a_factor() -> None:
    preset = RecallPreset("r", w_importance=0.0, w_recency=0.1, recency_half_life_days=30)
    scored = {1: Scored(1, 1.0), 2: Scored(2, 1.0), 3: Scored(3, 2.0)}
    rows = {1: mem(days_ago=300), 2: mem(days_ago=0), 3: mem(days_ago=3000)}
    ranked = rescore(scored, rows, NOW, preset)
    # The old but much more relevant memory stays first: recency scales by at most 1.1.
    assert [s.rowid for s, _ in ranked] == [3, 2, 1]
    assert ranked[1][0].score == pytest.approx(1.1)


def test_rescore_breaks_ties_newer_first_and_skips_missing_rows() -> None:
    scored = {1: Scored(1, 0.5), 2: Scored(2, 0.5), 3: Scored(3, 0.9)}
    rows = {1: mem(days_ago=10), 2: mem(days_ago=1)}
    ranked = rescore(scored, rows, NOW, PLAIN)
    assert [s.rowid for s, _ in ranked] == [2, 1]


def test_rescore_boosts_memories_inside_the_query_window() -> None:
    preset = RecallPreset("t", w_importance=0.0, w_recency=0.0, w_time=0.5, time_slack_days=2)
    window = TimeWindow(NOW - timedelta(days=10), NOW - timedelta(days=9), (0, 0))
    scored = {1: Scored(1, 1.0), 2: Scored(2, 0.8), 3: Scored(3, 0.7)}
    rows = {1: mem(days_ago=30), 2: mem(days_ago=9.5), 3: mem(days_ago=7.5)}  # 3: within slack
    ranked = rescore(scored, rows, NOW, preset, [window])
    assert [s.rowid for s, _ in ranked] == [2, 3, 1]
    assert ranked[0][0].score == pytest.approx(1.2)


# --- conversation context ----------------------------------------------------------------------


CTX = RecallPreset("c", w_importance=0.0, w_recency=0.0, context_weight=0.5, context_span=2,
                   context_seeds=2, context_gap_minutes=60)


def test_context_rowids_are_the_seeds_neighbours_not_yet_scored() -> None:
    scored = {10: Scored(10, 0.9), 11: Scored(11, 0.8), 30: Scored(30, 0.1)}
    assert context_rowids(scored, CTX) == [8, 9, 12, 13]  # 30 is not among the 2 seeds


def test_context_is_off_without_weight() -> None:
    scored = {10: Scored(10, 0.9)}
    off = RecallPreset("off", context_weight=0.0)
    assert context_rowids(scored, off) == []
    rows = {10: mem(), 11: mem()}
    assert add_context(scored, rows, Scope("u"), None, off) is scored


def test_add_context_lifts_the_turn_after_a_matching_one() -> None:
    scored = {10: Scored(10, 0.8, similarity=0.7), 20: Scored(20, 0.3)}
    rows = {10: mem("what did you do?"), 11: mem("I went to a pottery class"), 12: mem("nice"),
            20: mem("unrelated", days_ago=40)}
    out = add_context(scored, rows, Scope("u"), None, CTX)
    assert out[11].score == pytest.approx(0.5 * 0.8)
    assert out[12].score == pytest.approx(0.5 * 0.8 / 2)  # two rows away weighs half
    assert out[10].score == pytest.approx(0.8)  # its neighbours had no score of their own
    assert out[10].similarity == 0.7
    assert out[20].score == pytest.approx(0.3)


def test_add_context_ignores_rows_that_are_not_neighbours_or_not_visible() -> None:
    scored = {10: Scored(10, 1.0)}
    rows = {
        9: mem(days_ago=1),  # written a day apart: another sitting
        11: mem(user="other"),  # another user's row
        12: mem(session_id="s2"),  # a session the user-level request cannot see
    }
    rows[10] = mem()
    out = add_context(scored, rows, Scope("u"), None, CTX)
    assert set(out) == {10}


def test_add_context_respects_forgotten_and_category_filters() -> None:
    scored = {10: Scored(10, 1.0)}
    rows = {10: mem(), 11: mem(forgotten_at=NOW, valid_until=NOW),
            9: mem(category=MemoryCategory.PREFERENCE)}
    out = add_context(scored, rows, Scope("u"), [MemoryCategory.FACT], CTX)
    assert set(out) == {10}
    out = add_context(scored, {10: mem(), 9: mem(category=MemoryCategory.PREFERENCE)},
                      Scope("u"), None, CTX)
    assert set(out) == {9, 10}


def test_adjacent_needs_same_user_same_session_and_a_small_gap() -> None:
    a = mem(session_id="s1")
    assert adjacent(a, mem(session_id="s1", days_ago=0.01), 60)
    assert adjacent(a, mem(), 60)  # no session on one side: no conflict
    assert not adjacent(a, mem(session_id="s2"), 60)
    assert not adjacent(a, mem(user="v", session_id="s1"), 60)
    assert not adjacent(a, mem(session_id="s1", days_ago=1), 60)


# --- dates in the query ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "start", "end", "named"),
    [
        ("What did she share on 16 June, 2023?", "2023-06-16", "2023-06-17", "16 June, 2023"),
        ("plans on 1st September 2023", "2023-09-01", "2023-09-02", "1st September 2023"),
        ("How was it on October 25, 2022 then", "2022-10-25", "2022-10-26", "October 25, 2022"),
        ("the note from 2023-05-04", "2023-05-04", "2023-05-05", "2023-05-04"),
        ("What was he doing in June 2023?", "2023-06-01", "2023-07-01", "June 2023"),
        ("news from Dec 2023", "2023-12-01", "2024-01-01", "Dec 2023"),
        ("the trip we took in July", "2023-07-01", "2023-08-01", "in July"),  # past: last July
        ("a trip in March", "2024-03-01", "2024-04-01", "in March"),
        ("what happened in 2022", "2022-01-01", "2023-01-01", "in 2022"),
        ("what did I say yesterday", "2024-03-14", "2024-03-15", "yesterday"),
        ("anything from last month", "2024-02-01", "2024-03-01", "last month"),
    ],
)
def test_query_windows(query: str, start: str, end: str, named: str) -> None:
    (window,) = query_windows(query, NOW)
    assert window.start.date().isoformat() == start
    assert window.end.date().isoformat() == end
    assert query[window.span[0] : window.span[1]] == named


@pytest.mark.parametrize(
    "query", ["it may rain", "We may go in may", "a march for peace", "page 2023 of the log",
              "What is Caroline's identity?"],
)
def test_query_windows_ignores_words_that_are_not_dates(query: str) -> None:
    assert query_windows(query, NOW) == []


def test_impossible_day_falls_back_to_its_month() -> None:
    (window,) = query_windows("on 31 February, 2023", NOW)
    assert (window.start.month, window.end.month) == (2, 3)


def test_strip_spans_removes_the_date_words() -> None:
    query = "What did Maria share on 16 June, 2023 and in July?"
    windows = query_windows(query, NOW)
    assert len(windows) == 2
    stripped = strip_spans(query, windows).split()
    assert stripped == ["What", "did", "Maria", "share", "on", "and", "?"]


def test_window_contains_with_slack() -> None:
    w = TimeWindow(NOW, NOW + timedelta(days=1), (0, 0))
    assert w.contains(NOW) and not w.contains(NOW + timedelta(days=1))
    assert w.contains(NOW + timedelta(days=2), timedelta(days=3))
    assert not w.contains(NOW - timedelta(seconds=1), timedelta(days=3))


# --- budget ------------------------------------------------------------------------------------


def test_apply_budget_none_keeps_everything() -> None:
    memories = [mem("a" * 400), mem("b")]
    assert apply_budget(memories, None) == memories


def test_apply_budget_stops_at_the_first_memory_that_does_not_fit() -> None:
    small, big, tiny = mem("a" * 40), mem("b" * 400), mem("c")
    # costs: 10 + 12, 100 + 12, 1 + 12
    assert apply_budget([small, big, tiny], 50) == [small]
    assert apply_budget([small, big, tiny], 22) == [small]
    assert apply_budget([small, big, tiny], 21) == []
    assert apply_budget([small, big, tiny], 200) == [small, big, tiny]


def test_estimate_tokens_is_about_four_characters() -> None:
    assert estimate_tokens("") == 1
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2


# --- words common in the user's memories -------------------------------------------------------

COMMON = replace(PLAIN, common_share=0.3, common_min_memories=20)


def test_query_terms_are_distinct_casefolded_non_stop_words() -> None:
    assert query_terms("What did Nate tell nate about the Turtles?", COMMON) == [
        "nate", "tell", "turtles",
    ]


def test_drop_words_keeps_the_sentence_and_never_empties_it() -> None:
    assert drop_words("What did Nate tell Joanna about Nate's turtles?", {"nate"}) == (
        "What did tell Joanna about turtles?"
    )
    assert drop_words("Nate?", {"nate"}) == "Nate?"
    assert drop_words("as is", frozenset()) == "as is"


def test_clean_query_drops_common_words_too() -> None:
    assert clean_query("What did Nate adopt?", COMMON, {"nate"}) == "adopt"
    assert clean_query("Nate?", COMMON, {"nate"}) == "Nate"


# --- through the engine (real SQLite, fake embedder) -------------------------------------------


async def _chat_log(memory: HierarchicalMemory, lines: list[str]) -> None:
    """One memory a day, so conversation context joins none of them."""
    await memory.add_many([
        MemoryDraft(text, "nate", created_at=NOW - timedelta(days=len(lines) - i), dedup=False)
        for i, text in enumerate(lines)
    ])


async def test_recall_leaves_out_words_common_in_the_users_memories(
    memory: HierarchicalMemory, fake_embedder: FakeEmbedder,
) -> None:
    lines = [f"Nate: ok {i}" for i in range(24)] + ["Nate: I adopted a turtle named Shelly"]
    await _chat_log(memory, lines)
    question = "What did Nate say about Shelly?"
    got = await memory.hybrid_search(question, "nate", top_k=25, now=NOW)
    assert fake_embedder.calls[-1] == ["What did say about Shelly?"]
    assert got[0].memory.content == lines[-1]
    assert all(r.bm25 is None for r in got[1:])  # "Nate" no longer matches the filler

    keep_all = replace(PRESETS["default"], name="keep-all", common_share=0.0)
    plain = await memory.hybrid_search(question, "nate", top_k=25, now=NOW, preset=keep_all)
    assert fake_embedder.calls[-1] == [question]
    assert sum(r.bm25 is not None for r in plain) == 25


async def test_a_new_users_query_is_kept_whole(
    memory: HierarchicalMemory, fake_embedder: FakeEmbedder,
) -> None:
    await _chat_log(memory, [f"Nate: ok {i}" for i in range(5)])
    await memory.recall("What did Nate say?", "nate", now=NOW)
    assert fake_embedder.calls[-1] == ["What did Nate say?"]




async def test_recall_brings_the_answer_after_a_matching_question(
    memory: HierarchicalMemory,
) -> None:
    sitting = NOW - timedelta(days=3)
    turns = ["Any plans for the long weekend?", "Hiking the ridge trail with my sister.",
             "Sounds lovely."]
    filler = [f"note {i}: groceries {i}, laundry {i}, bills {i}" for i in range(40)]
    drafts = [MemoryDraft(t, "alice", created_at=sitting, valid_from=sitting, dedup=False)
              for t in turns]
    drafts += [MemoryDraft(t, "alice", created_at=NOW - timedelta(days=30 + i), dedup=False)
               for i, t in enumerate(filler)]
    await memory.add_many(drafts)
    plain = await memory.hybrid_search(
        "long weekend plans", "alice", top_k=3, now=NOW, preset=replace_ctx(0.0)
    )
    assert "Hiking the ridge trail with my sister." not in [r.memory.content for r in plain]
    got = await memory.recall("long weekend plans", "alice", top_k=3, now=NOW)
    assert {m.content for m in got[:2]} == set(turns[:2])  # the question and its answer
    results = await memory.hybrid_search("long weekend plans", "alice", top_k=3, now=NOW)
    assert results[0].score > results[-1].score
    assert all(math.isfinite(r.score) for r in results)


async def test_recall_finds_what_was_said_on_the_date_the_question_names(
    memory: HierarchicalMemory,
) -> None:
    said = {
        "Joined a gym last week.": datetime(2023, 6, 16, 13, 0, tzinfo=UTC),
        "Bought a second-hand bike.": datetime(2023, 3, 2, 9, 0, tzinfo=UTC),
        "Started a pottery class.": datetime(2023, 9, 9, 18, 0, tzinfo=UTC),
    }
    await memory.add_many(
        [MemoryDraft(text, "bob", created_at=when, valid_from=when, dedup=False)
         for text, when in said.items()]
    )
    question = "What news did I share on 16 June, 2023?"  # no word in common with any of them
    got = await memory.recall(question, "bob", now=NOW)
    assert got[0].content == "Joined a gym last week."
    undated = await memory.hybrid_search(
        question, "bob", now=NOW, preset=replace(PRESETS["common"], name="undated", w_time=0.0)
    )
    assert undated[0].memory.content == "Started a pottery class."  # ties: newest first


async def test_context_never_crosses_users_or_sessions(memory: HierarchicalMemory) -> None:
    await memory.add_many([
        MemoryDraft("carol secret one", "carol", created_at=NOW, dedup=False),
        MemoryDraft("dave likes sailing boats", "dave", created_at=NOW, dedup=False),
        MemoryDraft("dave private session note", "dave", session_id="s2", created_at=NOW,
                    dedup=False),
        MemoryDraft("carol secret two", "carol", created_at=NOW, dedup=False),
    ])
    got = await memory.recall("sailing boats", "dave", top_k=10, now=NOW)
    assert [m.content for m in got] == ["dave likes sailing boats"]
    # A word only other users' rows hold still finds nothing of theirs.
    got = await memory.recall("sailing boats secret", "dave", top_k=10, now=NOW)
    assert [m.content for m in got] == ["dave likes sailing boats"]
    in_session = await memory.recall("sailing boats", "dave", "s2", top_k=10, now=NOW)
    assert [m.content for m in in_session] == [
        "dave likes sailing boats", "dave private session note",
    ]


def replace_ctx(weight: float) -> RecallPreset:
    """The fused ranker (no learned features) with this much conversation context."""
    return replace(PRESETS["common"], name="no-context", context_weight=weight)


# --- the read path: what is read, when ---------------------------------------------------------


async def test_the_query_is_embedded_while_bm25_searches(
    memory: HierarchicalMemory, fake_embedder: FakeEmbedder,
) -> None:
    """The embedding waits here until the text search has begun: run one after the other, the
    recall would time out."""
    await _chat_log(memory, ["Nate: adopted a turtle named Shelly", "Nate: bought a kayak"])
    loop = asyncio.get_running_loop()
    searching = asyncio.Event()
    parts = memory._retrieval.parts
    search, embed = parts.text.search, memory._retrieval.executors.embed_query

    def text_search(*args: Any, **kwargs: Any) -> list[tuple[int, float]]:
        loop.call_soon_threadsafe(searching.set)
        return search(*args, **kwargs)

    async def embed_query(text: str) -> Any:
        await asyncio.wait_for(searching.wait(), timeout=5)
        return await embed(text)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parts.text, "search", text_search)
        patch.setattr(memory._retrieval.executors, "embed_query", embed_query)
        got = await memory.recall("the turtle Shelly", "nate", now=NOW)
    assert got[0].content == "Nate: adopted a turtle named Shelly"


@pytest.mark.parametrize("preset", ["default", "common", "bm25"])
async def test_searching_beside_the_embedding_ranks_as_with_the_vector_given(
    memory: HierarchicalMemory, fake_embedder: FakeEmbedder, preset: str,
) -> None:
    await _chat_log(memory, [f"Nate: ok {i} with notes on boats {i % 3}" for i in range(30)])
    question = "What did Nate say about boats?"
    got = await memory.hybrid_search(question, "nate", top_k=8, now=NOW, preset=preset)
    if preset != "bm25":  # what was embedded: the question without its user-common words
        assert fake_embedder.calls[-1] == ["What did say about?"]
    vector = fake_embedder.embed(["What did say about?"])[0]
    given = await memory.hybrid_search(
        question, "nate", top_k=8, now=NOW, preset=preset, query_vector=vector
    )
    assert len(got) == 8
    assert [(r.memory.id, r.score) for r in got] == [
        (r.memory.id, pytest.approx(r.score)) for r in given
    ]
    explained = await memory.explain_ranking(question, "nate", top_k=8, now=NOW, preset=preset)
    assert [e["memory"].id for e in explained[:8]] == [r.memory.id for r in got]


@pytest.mark.sqlite_only(
    "PostgreSQL builds the returned memories from the candidates read: no later read to differ"
)
async def test_a_memory_purged_after_ranking_gives_way_to_the_next(
    memory: HierarchicalMemory,
) -> None:
    """SQLite builds the returned memories after ranking (`Ranking.top`): one purged in
    between is skipped, not returned, and the next takes its place."""
    await memory.add_many([
        MemoryDraft("sailing boats on the lake", "dave", session_id="s1", dedup=False),
        MemoryDraft("sailing boats at sea", "dave", dedup=False),
        MemoryDraft("boats in the harbour", "dave", dedup=False),
    ])
    retrieval = memory._retrieval
    scope = Scope("dave", "s1")
    vector = await memory.embed_query("sailing boats")
    ranking = await retrieval.executors.read(lambda: retrieval._ranked(
        "sailing boats", scope, 2, None, NOW, retrieval.preset, vector))
    assert len(ranking.scored) == 3
    await memory.purge("dave", session_id="s1")
    top = await retrieval.executors.read(lambda: ranking.top(2))
    assert [m.content for _, m in top] == [
        m.content for _, m in await retrieval.executors.read(lambda: ranking.top())
    ]
    assert len(top) == 2 and "sailing boats on the lake" not in [m.content for _, m in top]


async def test_a_capped_count_stops_at_the_cap_and_keeps_the_scope(
    memory: HierarchicalMemory,
) -> None:
    """The date windows ask only whether a window holds more than `time_candidates`: the
    count stops at the cap, and what it counts is still the scope's current rows."""
    await memory.add_many(
        [MemoryDraft(f"day {i} at the lake", "eve", created_at=NOW - timedelta(days=i),
                     dedup=False) for i in range(5)]
        + [MemoryDraft("a session note", "eve", session_id="s9", dedup=False),
           MemoryDraft("someone else's day", "frank", created_at=NOW, dedup=False)]
    )
    store = memory._retrieval.parts.store
    window = MemoryFilter(user_id="eve", created_after=NOW - timedelta(days=10),
                          created_before=NOW + timedelta(days=1), limit=None)

    def counts() -> list[int]:
        return [store.count(window, cap=c) for c in (None, 0, 3, 5, 6, 100)]

    assert await memory._retrieval.executors.read(counts) == [5, 0, 3, 5, 5, 5]


async def test_the_core_read_is_the_newest_important_rows_the_scope_sees(
    memory: HierarchicalMemory,
) -> None:
    """The core tier's read (`min_importance` with a limit, chosen inside the index) returns
    what the unlimited read returns, cut to the limit and offset: same rows, same order
    (importances below `bubble_importance_threshold`, so the sessions' rows stay theirs)."""
    drafts = [
        MemoryDraft(f"fact {i}", "gil", importance=(0.3, 0.6, 0.7)[i % 3],
                    session_id=("s1", "s2", None, None)[i % 4],
                    created_at=NOW - timedelta(hours=i // 2), dedup=False)
        for i in range(24)
    ] + [MemoryDraft("hal's fact", "hal", importance=1.0, created_at=NOW, dedup=False)]
    await memory.add_many(drafts)
    store = memory._retrieval.parts.store
    everything = await memory.query(MemoryFilter(user_id="gil", all_scopes=True, limit=None))
    await memory.forget(next(m.id for m in everything if m.content == "fact 2"))

    def reads() -> list[tuple[list[str], list[str]]]:
        out = []
        for session in (None, "s1"):
            for limit, offset in ((3, 0), (4, 2), (50, 0)):
                flt = MemoryFilter(user_id="gil", session_id=session, min_importance=0.6,
                                   limit=limit, offset=offset)
                every = store.query(replace(flt, limit=None, offset=0))
                out.append(([m.id for m in store.query(flt)],
                            [m.id for m in every[offset : offset + limit]]))
        return out

    got = await memory._retrieval.executors.read(reads)
    assert all(a == b for a, b in got)
    def seen(sessions: set[str | None]) -> int:  # important, visible, not forgotten
        return sum(d.importance >= 0.6 and d.session_id in sessions and d.content != "fact 2"
                   for d in drafts if d.user_id == "gil")

    assert len(got[2][0]) == seen({None}) and len(got[5][0]) == seen({None, "s1"}) > 3

"""The learned ranker (memory.ranker): its features, its ordering, and the engine's default path."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from headroom.memory.errors import ConfigError
from headroom.memory.hierarchical import HierarchicalMemory, MemoryDraft
from headroom.memory.models import Memory
from headroom.memory.ranker import (
    FEATURES,
    WEIGHTS,
    Candidates,
    candidate_features,
    learned_scores,
    rank,
)
from headroom.memory.recall import PRESETS, RecallPreset, TimeWindow, fuse

NOW = datetime(2024, 3, 15, 12, 0, tzinfo=UTC)
LEARNED = PRESETS["default"]


def mem(content: str, *, user: str = "u", when: datetime = NOW, **kw: object) -> Memory:
    return Memory(content=content, user_id=user, created_at=when, valid_from=when, **kw)  # type: ignore[arg-type]


def col(name: str) -> int:
    return FEATURES.index(name)


def test_the_default_preset_is_the_learned_ranker() -> None:
    assert LEARNED.ranker == "learned"
    assert LEARNED.reads_dates and LEARNED.w_time == 0.0
    assert PRESETS["common"].ranker == "fused"
    assert len(WEIGHTS) == len(FEATURES)


def test_an_unknown_ranker_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown ranker 'nope'"):
        RecallPreset("x", ranker="nope")


def _features(rows: dict[int, Memory], vector_hits, text_hits, **kw):  # type: ignore[no-untyped-def]
    fused = fuse(vector_hits, text_hits, LEARNED)
    pool = kw.pop("pool", list(fused))
    cosines = kw.pop("cosines", dict(vector_hits))
    found = Candidates(
        vector_hits, text_hits, fused, rows, cosines, kw.pop("windows", []),
        kw.pop("common", frozenset()),
    )
    return pool, fused, candidate_features(pool, found, LEARNED)


def test_question_features_read_the_fused_score_of_the_same_sitting_only() -> None:
    earlier = NOW - timedelta(days=2)
    rows = {
        1: mem("any plans for hiking?"),
        2: mem("the answer"),
        3: mem("someone else's row?", user="v"),
        4: mem("a row from another day", when=earlier),
        5: mem("a plain fact"),
        6: mem("another plain fact"),
    }
    vector_hits = [(1, 0.9), (3, 0.8), (4, 0.7), (5, 0.6), (6, 0.5), (2, 0.1)]
    pool, fused, f = _features(rows, vector_hits, [])
    answer = f[pool.index(2)]
    assert answer[col("after_question")] == pytest.approx(fused[1].score)
    assert f[pool.index(1)][col("question_answered")] == pytest.approx(fused[2].score)
    assert answer[col("question_answered")] == 0.0  # "the answer" asks nothing
    assert f[pool.index(4)][col("after_question")] == 0.0  # 3 asks, but is another user's
    assert f[pool.index(3)][col("question_answered")] == 0.0  # 4: another user
    assert f[pool.index(6)][col("after_question")] == 0.0  # facts in one block: order is moot
    assert answer[col("sitting_best")] == pytest.approx(fused[1].score)
    assert f[pool.index(4)][col("sitting_best")] == pytest.approx(fused[4].score)  # itself


def test_sessions_split_sittings() -> None:
    rows = {1: mem("a?", session_id="s1"), 2: mem("b", session_id="s2"), 3: mem("c")}
    pool, fused, f = _features(rows, [(1, 0.9), (2, 0.5), (3, 0.4)], [])
    assert f[pool.index(2)][col("after_question")] == 0.0
    assert f[pool.index(2)][col("sitting_best")] == pytest.approx(fused[2].score)
    assert f[pool.index(3)][col("sitting_best")] == pytest.approx(fused[1].score)  # no session


def test_no_weight_lowers_a_score_for_more_evidence() -> None:
    """Only the answered-question penalty may be negative: a higher cosine, BM25 rank, ...
    never ranks a memory lower (see bench/locomo_fit_ranker.py)."""
    for name, weight in zip(FEATURES, WEIGHTS, strict=True):
        if name != "question_answered":
            assert weight >= 0, name


def test_score_features_are_scaled_per_query() -> None:
    rows = {1: mem("alpha"), 2: mem("beta"), 3: mem("gamma")}
    _, _, f = _features(
        rows, [(1, 0.8), (2, 0.4)], [(3, 12.0), (1, 3.0)], pool=[1, 2, 3],
        cosines={1: 0.8, 2: 0.4, 3: 0.2},
    )
    assert f[:, col("cos_scaled")].tolist() == [1.0, 0.0, 0.0]  # 3 is below the hits: clipped
    assert f[:, col("cosine")].tolist() == pytest.approx([0.8, 0.4, 0.2])
    assert f[:, col("bm25_share")].tolist() == pytest.approx([0.25, 0.0, 1.0])
    assert f[:, col("vector_rank")].tolist() == pytest.approx([1.0, 1 / 1.2, 0.0])
    assert f[:, col("bm25_rank")].tolist() == pytest.approx([1 / 1.2, 0.0, 1.0])
    assert f[:, col("length")].tolist() == pytest.approx(
        [math.log1p(5) / 6, math.log1p(4) / 6, math.log1p(5) / 6]
    )


def test_window_and_common_word_features() -> None:
    june = datetime(2023, 6, 16, 9, 0, tzinfo=UTC)
    rows = {
        1: mem("Nate adopted a turtle", when=june),
        2: mem("nate's friend Joanna called", when=june + timedelta(days=30)),
        3: mem("Nathaniel wrote", when=june + timedelta(days=2)),  # inside the 3-day slack
    }
    window = TimeWindow(june.replace(hour=0), june.replace(hour=0) + timedelta(days=1), (0, 1))
    _, _, f = _features(
        rows, [(1, 0.5), (2, 0.4), (3, 0.3)], [], windows=[window],
        common=frozenset({"nate", "joanna"}),
    )
    assert f[:, col("in_window")].tolist() == [1.0, 0.0, 1.0]
    assert f[:, col("common_share")].tolist() == [0.5, 1.0, 0.0]  # whole words only


def test_rank_orders_by_the_linear_score_and_importance_scales_the_odds() -> None:
    rows = {1: mem("same words here"), 2: mem("same words here", importance=0.9)}
    hits = [(1, 0.5), (2, 0.5)]
    fused = fuse(hits, [], LEARNED)
    found = Candidates(hits, [], fused, rows, dict(hits))
    ranked = rank([1, 2], found, LEARNED, NOW)
    features = candidate_features([1, 2], found, LEARNED)
    linear = learned_scores(features)
    assert linear.tolist() == pytest.approx((features @ WEIGHTS).tolist())
    boost = math.log((1 + 0.05 * 0.4 + 0.05) / (1 + 0.05))
    by_row = {s.rowid: s.score for s, _ in ranked}
    assert by_row[2] - by_row[1] == pytest.approx(linear[1] - linear[0] + boost)
    assert [s.rowid for s, _ in ranked] == sorted(by_row, key=by_row.__getitem__, reverse=True)
    assert ranked[0][0].similarity == 0.5


# --- through the engine (real SQLite, fake embedder) -------------------------------------------


async def test_the_learned_ranker_without_a_query_vector_falls_back_to_fusion(
    memory: HierarchicalMemory,
) -> None:
    await memory.add_many([MemoryDraft("tea with lemon", "erin", dedup=False)])
    bm25_only = replace(LEARNED, name="bm25-learned", w_vector=0.0, w_text=1.0)
    got = await memory.hybrid_search("lemon", "erin", now=NOW, preset=bm25_only)
    assert [r.memory.content for r in got] == ["tea with lemon"]
    explained = await memory.explain_ranking("lemon", "erin", now=NOW, preset=bm25_only)
    assert [e["memory"].content for e in explained] == ["tea with lemon"]
    assert explained[0]["features"] == {}  # recall ranked it by fusion: explain says the same


async def test_explain_ranking_lists_every_candidate_with_its_features(
    memory: HierarchicalMemory,
) -> None:
    await memory.add_many([
        MemoryDraft("Any plans for the long weekend?", "fay", created_at=NOW, dedup=False),
        MemoryDraft("Hiking the ridge trail.", "fay", created_at=NOW, dedup=False),
        MemoryDraft("Bought new boots for the weekend", "fay",
                    created_at=NOW - timedelta(days=9), dedup=False),
    ])
    explained = await memory.explain_ranking("long weekend plans", "fay", top_k=2, now=NOW)
    recalled = await memory.recall("long weekend plans", "fay", top_k=2, now=NOW, touch=False)
    assert [e["memory"].id for e in explained[:2]] == [m.id for m in recalled]
    assert len(explained) == 3  # every candidate, not only the top 2
    assert [e["score"] for e in explained] == sorted((e["score"] for e in explained), reverse=True)
    assert set(explained[0]["features"]) == set(FEATURES)
    hiking = next(e for e in explained if e["memory"].content.startswith("Hiking"))
    assert hiking["features"]["after_question"] > 0
    fused = await memory.explain_ranking(
        "long weekend plans", "fay", now=NOW, preset=PRESETS["common"]
    )
    assert all(e["features"] == {} for e in fused)

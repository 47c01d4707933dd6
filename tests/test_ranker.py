"""The learned ranker (memory.ranker): its features, its ordering, and the engine's default path."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from headroom.memory.errors import ConfigError
from headroom.memory.hierarchical import HierarchicalMemory, MemoryDraft
from headroom.memory.models import Memory, MemoryConfig
from headroom.memory.ranker import (
    FEATURES,
    WEIGHT_SETS,
    WEIGHTS,
    Candidates,
    candidate_features,
    diversify,
    learned_scores,
    rank,
    weights_of,
)
from headroom.memory.recall import PRESETS, RecallPreset, Scored, TimeWindow, fuse, recency
from tests.fakes import FakeEmbedder

NOW = datetime(2024, 3, 15, 12, 0, tzinfo=UTC)
LEARNED = PRESETS["default"]
# The first learned ranker: neighbours by position, uncapped length (its features are kept).
TURNS = PRESETS["learned-turns"]


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
    preset = kw.pop("preset", TURNS)
    fused = fuse(vector_hits, text_hits, preset)
    pool = kw.pop("pool", list(fused))
    cosines = kw.pop("cosines", dict(vector_hits))
    found = Candidates(
        vector_hits, text_hits, fused, rows, cosines, kw.pop("windows", []),
        kw.pop("common", frozenset()),
    )
    return pool, fused, candidate_features(pool, found, preset)


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
    for set_name, weights in WEIGHT_SETS.items():
        assert len(weights) == len(FEATURES), set_name
        for name, weight in zip(FEATURES, weights, strict=True):
            if name != "question_answered":
                assert weight >= 0, (set_name, name)


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


def test_rank_orders_by_the_linear_score_plus_the_importance_prior() -> None:
    rows = {1: mem("same words here"), 2: mem("same words here", importance=0.9)}
    hits = [(1, 0.5), (2, 0.5)]
    fused = fuse(hits, [], LEARNED)
    found = Candidates(hits, [], fused, rows, dict(hits))
    ranked = rank([1, 2], found, LEARNED, NOW)
    features = candidate_features([1, 2], found, LEARNED)
    linear = learned_scores(features, weights_of(LEARNED))
    assert linear.tolist() == pytest.approx((features @ WEIGHT_SETS[LEARNED.weights]).tolist())
    by_row = {s.rowid: s.score for s, _ in ranked}
    assert by_row[2] - by_row[1] == pytest.approx(
        linear[1] - linear[0] + LEARNED.w_importance * 0.4
    )
    assert [s.rowid for s, _ in ranked] == sorted(by_row, key=by_row.__getitem__, reverse=True)
    assert ranked[0][0].similarity == 0.5


def _ranked_contents(rows: dict[int, Memory], hits, preset: RecallPreset = LEARNED,  # type: ignore[no-untyped-def]
                     text_hits=(), when: datetime = NOW) -> list[str]:
    fused = fuse(hits, list(text_hits), preset)
    found = Candidates(hits, list(text_hits), fused, rows, dict(hits))
    return [m.content for _, m in rank(list(rows), found, preset, when)]


# Two memories among others that match less (a query always has more hits than the answer).
OTHERS = {3: mem("walks the dog"), 4: mem("paints on Sundays"), 5: mem("rides a bike")}
OTHER_HITS = [(3, 0.2), (4, 0.1), (5, 0.0)]


def test_importance_09_outranks_03_among_equally_relevant_memories() -> None:
    rows = {1: mem("likes jazz", importance=0.3), 2: mem("likes soul", importance=0.9), **OTHERS}
    assert _ranked_contents(rows, [(1, 0.4), (2, 0.4), *OTHER_HITS])[:2] == [
        "likes soul", "likes jazz"
    ]
    # ... and also against a slightly better match: importance moves a ranking.
    assert _ranked_contents(rows, [(1, 0.42), (2, 0.4), *OTHER_HITS])[:2] == [
        "likes soul", "likes jazz"
    ]


def test_the_importance_weight_scales_how_much_importance_counts() -> None:
    rows = {1: mem("likes jazz", importance=0.3), 2: mem("likes soul", importance=0.9), **OTHERS}
    hits = [(1, 0.5), (2, 0.4), *OTHER_HITS]  # jazz is the better match by 0.1 cosine
    assert _ranked_contents(rows, hits, replace(LEARNED, w_importance=0.0))[0] == "likes jazz"
    assert _ranked_contents(rows, hits, replace(LEARNED, w_importance=8.0))[0] == "likes soul"


async def test_recall_importance_weight_reaches_the_ranker(tmp_path: Path) -> None:
    config = MemoryConfig(db_path=tmp_path / "w.db", recall_importance_weight=0.0)
    async with await HierarchicalMemory.create(config, embedder=FakeEmbedder()) as memory:
        assert memory.preset.w_importance == 0.0
        assert memory.preset.weights == LEARNED.weights  # the rest is the default's
    with pytest.raises(ConfigError, match="recall_importance_weight"):
        MemoryConfig(db_path=tmp_path / "x.db", recall_importance_weight=-1.0)


def test_diversify_demotes_a_restatement_below_a_new_fact() -> None:
    rows = {1: mem("has turtles"), 2: mem("owns turtles"), 3: mem("adopted a dog")}
    ranked = [(Scored(1, 3.0), rows[1]), (Scored(2, 2.9), rows[2]), (Scored(3, 2.5), rows[3])]
    a = np.array([1.0, 0.0], dtype=np.float32)
    embeddings = {1: a, 2: np.array([0.96, 0.28], dtype=np.float32),
                  3: np.array([0.0, 1.0], dtype=np.float32)}
    preset = replace(LEARNED, diversity=2.0, diversity_floor=0.6)
    assert [s.rowid for s, _ in diversify(ranked, embeddings, preset)] == [1, 3, 2]
    assert [s.rowid for s, _ in diversify(ranked, embeddings, replace(preset, diversity=0.0))] == [
        1, 2, 3
    ]
    # Scores are not rewritten, and a row without an embedding is never penalised.
    assert [s.score for s, _ in diversify(ranked, {1: a}, preset)] == [3.0, 2.9, 2.5]


def test_an_old_but_relevant_fact_is_not_buried_by_new_ones() -> None:
    rows = {
        1: mem("Is allergic to shellfish", when=NOW - timedelta(days=3 * 365)),
        2: mem("Bought a new lamp", when=NOW - timedelta(hours=1)),
        3: mem("Watched a film last night", when=NOW - timedelta(hours=2)),
    }
    hits = [(1, 0.45), (2, 0.2), (3, 0.15)]
    assert _ranked_contents(rows, hits)[0] == "Is allergic to shellfish"


def test_recency_decides_between_equally_relevant_memories() -> None:
    rows = {1: mem("Lives in Manchester", when=NOW - timedelta(days=500)),
            2: mem("Lives in Berlin", when=NOW - timedelta(days=7))}
    got = _ranked_contents(rows, [(1, 0.4), (2, 0.4)])
    assert got == ["Lives in Berlin", "Lives in Manchester"]


def test_recency_counts_for_facts_not_for_chat_turns() -> None:
    """A newer fact replaces an older one; a chat log is history, asked about at any point."""
    old_when, new_when = NOW - timedelta(days=500), NOW - timedelta(days=7)
    facts = {1: mem("Lives in Manchester", when=old_when), 2: mem("Lives in Berlin", when=new_when)}
    chat = {1: mem("Where do you live? B: Manchester", when=old_when),
            2: mem("Where do you live? B: Berlin", when=new_when)}
    hits = [(1, 0.4), (2, 0.4)]
    for rows, gap in ((facts, True), (chat, False)):
        found = Candidates(hits, [], fuse(hits, [], LEARNED), rows, dict(hits))
        scores = {s.rowid: s.score for s, _ in rank([1, 2], found, LEARNED, NOW)}
        assert (scores[2] - scores[1] > 0.5) is gap
    found = Candidates(hits, [], fuse(hits, [], LEARNED), chat, dict(hits))
    scores = {s.rowid: s.score
              for s, _ in rank([1, 2], found, replace(LEARNED, chat_recency=True), NOW)}
    assert scores[2] - scores[1] > 0.5


def test_facts_written_in_one_block_do_not_lift_each_other() -> None:
    """A memory's score never rises because another one written beside it matched, unless it
    shares the query's content itself: the same fact scores the same alone and in a block."""
    alone_when = NOW - timedelta(days=40)
    block = {
        1: mem("Is training for a marathon"),
        2: mem("Has a cat named Miso"),  # written in the same block, shares nothing
        3: mem("Goes swimming on Tuesdays", when=alone_when),
    }
    hits = [(1, 0.6), (3, 0.3), (2, 0.05)]
    text = [(1, 8.0)]
    fused = fuse(hits, text, LEARNED)
    found = Candidates(hits, text, fused, block, dict(hits))
    scores = {s.rowid: s.score for s, _ in rank([1, 2, 3], found, LEARNED, NOW)}
    apart = dict(block)
    apart[2] = mem("Has a cat named Miso", when=alone_when - timedelta(days=30))
    found_apart = Candidates(hits, text, fused, apart, dict(hits))
    scores_apart = {s.rowid: s.score for s, _ in rank([1, 2, 3], found_apart, LEARNED, NOW)}
    lowest = min(h for _, h in hits)
    assert hits[-1][1] == lowest  # the cat's cosine is the lowest hit: no own content share
    assert scores[2] == pytest.approx(scores_apart[2] + LEARNED.w_recency * (
        recency(block[2], NOW, LEARNED.recency_half_life_days)
        - recency(apart[2], NOW, LEARNED.recency_half_life_days)
    ))
    assert scores[3] > scores[2]
    # Under the first learned ranker, the block lifted it (what this gate fixes).
    turns = {s.rowid: s.score for s, _ in rank([1, 2, 3], found, TURNS, NOW)}
    turns_apart = {s.rowid: s.score for s, _ in rank([1, 2, 3], found_apart, TURNS, NOW)}
    assert turns[2] - turns_apart[2] > 1.0


def test_a_sitting_counts_in_proportion_to_the_memory_s_own_match() -> None:
    rows = {1: mem("marathon training"), 2: mem("a half match"), 3: mem("no match")}
    hits = [(1, 0.8), (2, 0.5), (3, 0.2)]
    _, fused, f = _features(rows, hits, [], preset=LEARNED)
    own = f[:, col("cos_scaled")]
    assert own.tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert f[:, col("sitting_best")].tolist() == pytest.approx(
        (own * fused[1].score).tolist()
    )


def test_in_a_dialogue_the_sitting_counts_whole() -> None:
    """Chat turns answer the question asked before them without repeating its words: where
    something was asked in the sitting, a turn gains from its sitting as before."""
    rows = {1: mem("Where are you going this weekend?"), 2: mem("The coast, with Ana"),
            3: mem("unrelated")}
    hits = [(1, 0.8), (3, 0.3), (2, 0.1)]
    _, fused, f = _features(rows, hits, [], preset=LEARNED)
    assert f[2, col("cos_scaled")] == 0.0  # the answer shares nothing with the query itself
    assert f[2, col("sitting_best")] == pytest.approx(fused[1].score)


def test_length_saturates_so_short_facts_are_not_outweighed() -> None:
    rows = {1: mem("Is vegetarian"), 2: mem("x" * 200), 3: mem("Thanks!")}
    _, _, f = _features(rows, [(1, 0.5), (2, 0.4), (3, 0.3)], [], preset=LEARNED)
    lengths = f[:, col("length")]
    cap = LEARNED.length_cap_chars
    assert lengths.tolist() == pytest.approx(
        [math.log1p(13) / math.log1p(cap), 1.0, math.log1p(7) / math.log1p(cap)]
    )
    weights = weights_of(LEARNED, dialogue=False)
    # 200 characters against a 13-character fact: worth less than a 0.05 cosine difference.
    gain = (lengths[1] - lengths[0]) * weights[col("length")]
    assert gain < 0.05 * weights[col("cosine")]


def test_in_a_dialogue_a_turn_s_length_keeps_counting() -> None:
    """A short chat turn is mostly chit-chat ("Thanks!"); a short fact is complete. Where
    something in the sitting asks, length is not capped."""
    rows = {1: mem("Any plans for the weekend?"), 2: mem("B: Thanks!"), 3: mem("B: " + "x" * 80)}
    _, _, f = _features(rows, [(1, 0.5), (2, 0.4), (3, 0.3)], [], preset=LEARNED)
    lengths = f[:, col("length")]
    assert lengths.tolist() == pytest.approx([math.log1p(n) / 6.0 for n in (26, 10, 83)])
    assert lengths[2] - lengths[1] > 0.3  # capped at 20 characters both would be 1.0


def test_facts_and_chat_turns_are_scored_by_their_own_weight_sets() -> None:
    facts = {1: mem("Is vegetarian"), 2: mem("Has a dog")}
    chat = {1: mem("What do you eat?"), 2: mem("B: No meat, ever")}
    hits = [(1, 0.5), (2, 0.4)]
    for rows, dialogue in ((facts, False), (chat, True)):
        fused = fuse(hits, [], LEARNED)
        found = Candidates(hits, [], fused, rows, dict(hits))
        ranked = rank([1, 2], found, LEARNED, NOW)
        features = candidate_features([1, 2], found, LEARNED)
        expected = learned_scores(features, weights_of(LEARNED, dialogue=dialogue))
        prior_ = {s.rowid: s.score - float(expected[s.rowid - 1]) for s, _ in ranked}
        assert all(s.dialogue is dialogue for s, _ in ranked)
        # What is left after the weight set's score is the importance/recency prior alone.
        assert prior_[1] == pytest.approx(prior_[2])
    assert LEARNED.fact_weights and LEARNED.fact_weights != LEARNED.weights
    assert weights_of(replace(LEARNED, fact_weights=""), dialogue=False) is weights_of(LEARNED)


def test_diversify_leaves_chat_turns_alone() -> None:
    """A question and its answer read alike, and both are worth showing."""
    rows = {1: mem("Did you adopt a dog?"), 2: mem("B: yes, we adopted a dog"), 3: mem("B: ok")}
    ranked = [(Scored(i, s, dialogue=True), rows[i]) for i, s in ((1, 3.0), (2, 2.9), (3, 2.5))]
    a = np.array([1.0, 0.0], dtype=np.float32)
    embeddings = {1: a, 2: np.array([0.96, 0.28], dtype=np.float32),
                  3: np.array([0.0, 1.0], dtype=np.float32)}
    preset = replace(LEARNED, diversity=2.0, diversity_floor=0.6)
    assert [s.rowid for s, _ in diversify(ranked, embeddings, preset)] == [1, 2, 3]


def test_unknown_weights_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown ranker weights"):
        weights_of(replace(LEARNED, weights="nope"))


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

"""The learned ranker: a linear score over features of each recall candidate.

Fusion (`recall.fuse`) looks at one memory at a time. Which memory answers a question also
depends on its surroundings: the question written just before it matched (it answers that
question), the sitting it was written in matched (the topic was discussed then), it names the
person the question names, it was written on the date the question names. The weights below
combine such signals; they were fitted once, offline, by `bench/locomo_fit_ranker.py`
(pairwise logistic regression on the benchmark's dev conversations only, checked on held-out
ones; every weight but the answered-question penalty is kept ≥ 0, so more evidence of relevance
never lowers a score), and are plain data, so recall stays a few dot products, with no model
call at query time.

Every feature is computed from the candidate lists the engine already has (the vector hits, the
BM25 hits, their rows and embeddings, the query's time windows, the words common in this
user's memories), and is scaled per query, so no weight depends on a corpus's score range.
Importance and recency are not features: `prior` adds them with the preset's weights, so a
setting, not a fit, decides how much they count; `diversify` then makes room among the best
for memories that are not restatements of a better one.

The proxy stores two shapes of memory, and one ranker serves both by telling them apart from
their content alone: a memory is part of a *dialogue* when something written in its sitting
asks (a chat log's turn); otherwise it is a fact a model wrote down (a block of facts asks
nothing). Chat turns are scored by `RecallPreset.weights` with their length uncapped, facts by
`RecallPreset.fact_weights` with the capped length and the content-gated sitting; recency
(`chat_recency`) and diversity apply to facts only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

import numpy as np

from .candidates import CandidateRows, as_candidate_rows, micros
from .errors import ConfigError
from .models import Memory
from .recall import RecallPreset, Scored, TimeWindow, recency

__all__ = [
    "FEATURES",
    "WEIGHTS",
    "WEIGHT_SETS",
    "Candidates",
    "candidate_features",
    "diversify",
    "diversify_scored",
    "learned_scores",
    "prior",
    "priors",
    "rank",
    "rank_scored",
    "weights_of",
]

# name: what it measures (per candidate), and its weight in the turn-fitted set (`turns-v1`,
# the first default). Question and sitting features read the fused score (`recall.fuse`) of
# other candidates: 0 for a memory that was no hit.
_TABLE: tuple[tuple[str, str, float], ...] = (
    ("cos_scaled", "cosine, min-max scaled over the vector hits, clipped to [0, 1]", 0.00),
    ("bm25_share", "BM25 / the best BM25 of the query (0 when not a text hit)", 0.00),
    ("fused", "the fused score (0.35 scaled cosine + 0.65 scaled BM25)", 0.00),
    ("after_question", "fused score of the memory just before, same sitting, if it asks", 3.22),
    ("question_answered", "for a memory that asks: fused score of the one just after", -0.76),
    ("sitting_best", "best fused score among hits written within the context gap (with "
     "`sitting_by_content`, in a sitting where nothing asks: times the memory's own content "
     "share, its best of scaled cosine and BM25 share, so only a fact that matches the query "
     "itself gains from its block)", 2.78),
    ("in_window", "written in a time window the query names (or just after)", 3.14),
    ("common_share", "share of the query's user-common words (e.g. a name) it contains", 1.64),
    ("length", "log(1 + characters) / 6 (with `length_cap_chars` = L, outside dialogues: "
     "log(1 + min(chars, L)) / log(1 + L)): a bare 'Thanks!' rarely answers anything", 4.78),
    ("vector_rank", "1 / (1 + rank / 5) in the vector hits (0 when not a hit)", 0.25),
    ("bm25_rank", "1 / (1 + rank / 5) in the BM25 hits (0 when not a hit)", 1.86),
    ("cosine", "raw cosine with the query", 5.90),
)
FEATURES: tuple[str, ...] = tuple(name for name, _, _ in _TABLE)
# Weight sets by name (`RecallPreset.weights`), each fitted by `bench/locomo_fit_ranker.py` on
# dev questions only. `turns-v1`: chat turns, uncapped length, neighbours by position (the
# first default). `turns-v2`: chat turns again, with the features of the default preset
# (length capped at 20 characters, the sitting gated by content outside dialogues); fitted
# with the facts shape's dev questions too, the cosine fell to 3.0 and turns lost ~2 R@10
# while facts gained nothing (bench/RESULTS.md), so the facts shape is not in the fit.
WEIGHT_SETS: dict[str, np.ndarray] = {
    "turns-v1": np.array([w for _, _, w in _TABLE], dtype=np.float64),
    "turns-v2": np.array(
        [0.00, 0.00, 0.00, 3.46, -1.03, 2.51, 3.25, 1.75, 0.77, 0.25, 2.00, 6.66],
        dtype=np.float64,
    ),
}
WEIGHTS = WEIGHT_SETS["turns-v1"]

T = TypeVar("T")


def _rank_feature(hits: Sequence[tuple[int, float]]) -> dict[int, float]:
    return {rid: 1.0 / (1.0 + rank / 5.0) for rank, (rid, _) in enumerate(hits)}


@dataclass(frozen=True)
class Candidates:
    """What the engine fetched for one query; every feature reads only this.

    `vector_hits` (best first, with cosines) and `text_hits` (best first, with BM25) are the
    index answers; `fused` their `recall.fuse` scores, before context is added; `rows` (the
    store's `CandidateRows`, or memories by row key) and `cosines` cover every candidate;
    `common` is the query's user-common words."""

    vector_hits: Sequence[tuple[int, float]]
    text_hits: Sequence[tuple[int, float]]
    fused: Mapping[int, Scored]
    rows: CandidateRows | Mapping[int, Memory]
    cosines: Mapping[int, float]
    windows: Sequence[TimeWindow] = ()
    common: Collection[str] | None = None


def candidate_features(
    pool: Sequence[int], found: Candidates, preset: RecallPreset
) -> np.ndarray:
    """One row of `FEATURES` per rowid of `pool` (each must be in `found.rows` and
    `found.cosines`)."""
    return _features(pool, found, as_candidate_rows(found.rows), preset)[0]


def _features(
    pool: Sequence[int], found: Candidates, rows: CandidateRows, preset: RecallPreset
) -> tuple[np.ndarray, np.ndarray]:
    """`candidate_features`, and whether each memory is part of a dialogue."""
    vector_hits, text_hits, fused = found.vector_hits, found.text_hits, found.fused
    cosines, windows, common = found.cosines, found.windows, found.common
    n = len(pool)
    out = np.zeros((n, len(FEATURES)), dtype=np.float64)
    if n == 0:
        return out, np.zeros(0, dtype=bool)
    sims = [s for _, s in vector_hits]
    lo, hi = (min(sims), max(sims)) if sims else (0.0, 1.0)
    best_bm = max((b for _, b in text_hits), default=0.0)
    bm25 = dict(text_hits)
    v_rank, t_rank = _rank_feature(vector_hits), _rank_feature(text_hits)
    gap = preset.context_gap_minutes * 60.0

    # Every row involved: the pool and the hits (whose fused scores neighbours read).
    ids = list(dict.fromkeys([*pool, *(r for r in fused if r in rows)]))
    at = {rid: i for i, rid in enumerate(ids)}
    where = rows.positions(ids)
    ts = rows.created_at[where] / 1e6  # as `datetime.timestamp()` reads them
    user = rows.user_code[where]
    session = rows.session_code[where]  # 0: no session
    score = np.array([fused[r].score if r in fused else 0.0 for r in ids])
    p = np.array([at[r] for r in pool])
    in_pool = where[p]

    def together(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Pairs written in one sitting: same user, no conflicting session, within the gap."""
        return (
            (user[a] == user[b])
            & ((session[a] == 0) | (session[b] == 0) | (session[a] == session[b]))
            & (np.abs(ts[a] - ts[b]) <= gap)
        )

    def neighbour(offset: int, asks: np.ndarray) -> np.ndarray:
        """The fused score of the row `offset` away, written in the same sitting, where `asks`
        (one flag per pool row, for that pair) holds; else 0."""
        other = np.array([at.get(r + offset, -1) for r in pool])
        ok = (other >= 0) & asks
        vals = np.zeros(n)
        if ok.any():
            o = other[ok]
            vals[ok] = np.where(together(p[ok], o), score[o], 0.0)
        return vals

    # A question and its answer are written one after the other: the memory after a matching
    # question is likely its answer, and the question itself is not. Facts written together
    # in one block ask nothing, so their order in it never matters.
    def asks(rowids: Sequence[int]) -> np.ndarray:
        """Whether each of `rowids` is a fetched row that asks."""
        return np.array([(i := rows.at.get(r)) is not None and rows.asks[i] for r in rowids],
                        dtype=bool)

    cos = np.array([cosines[r] for r in pool])
    out[:, 0] = np.clip((cos - lo) / (hi - lo), 0.0, 1.0) if hi - lo > 1e-12 else 1.0
    if best_bm > 0:
        out[:, 1] = [bm25.get(r, 0.0) / best_bm for r in pool]
    out[:, 2] = score[p]
    out[:, 3] = neighbour(-1, asks([r - 1 for r in pool]))
    out[:, 4] = neighbour(1, rows.asks[in_pool])
    # A memory is part of a dialogue when something written in its sitting asks: a chat log's
    # turn, not a fact a model wrote down (a block of facts asks nothing).
    asking = rows.asks[where]
    dialogue = (together(p[:, None], np.arange(len(ids))[None, :]) & asking[None, :]).any(axis=1)
    hits = np.array([at[r] for r in fused if r in rows])
    if len(hits):
        same = together(p[:, None], hits[None, :])
        out[:, 5] = np.where(same, score[hits][None, :], 0.0).max(axis=1)
        if preset.sitting_by_content:
            # Written beside a match is no evidence by itself: facts of one block share a
            # sitting whatever they say. Outside a dialogue, the sitting counts in proportion
            # to the memory's own match with the query, so a fact that shares nothing with it
            # gains nothing from its block.
            own = np.maximum(out[:, 0], out[:, 1]) if best_bm > 0 else out[:, 0]
            out[:, 5] *= np.where(dialogue, 1.0, own)
    if windows:
        slack = timedelta(days=preset.time_slack_days)
        created = rows.created_at[in_pool]
        inside = np.zeros(n, dtype=bool)
        for w in windows:  # TimeWindow.contains, on exact microseconds
            inside |= (created >= micros(w.start)) & (created < micros(w.end + slack))
        out[:, 6] = inside
    if common:
        patterns = [re.compile(rf"(?<!\w){re.escape(w)}(?!\w)") for w in common]
        for i, at_row in enumerate(in_pool):
            text = rows.content[at_row].casefold()
            out[i, 7] = sum(1 for pat in patterns if pat.search(text)) / len(patterns)
    cap = preset.length_cap_chars
    lengths = rows.length[in_pool]
    out[:, 8] = np.log1p(lengths) / 6.0
    if cap > 0:
        # Saturates outside dialogues: a short fact ("Is vegetarian") is as complete as a long
        # one. In a chat log a short turn is mostly chit-chat ("Thanks!"), so there a turn's
        # length keeps counting.
        capped = np.log1p(np.minimum(lengths, cap)) / math.log1p(cap)
        out[:, 8] = np.where(dialogue, out[:, 8], capped)
    out[:, 9] = [v_rank.get(r, 0.0) for r in pool]
    out[:, 10] = [t_rank.get(r, 0.0) for r in pool]
    out[:, 11] = cos
    return out, dialogue


def weights_of(preset: RecallPreset, *, dialogue: bool = True) -> np.ndarray:
    """The weight set `preset` names (`WEIGHT_SETS`) for memories of a dialogue, or for the
    others (`fact_weights`, when it names one)."""
    name = preset.weights if dialogue or not preset.fact_weights else preset.fact_weights
    try:
        return WEIGHT_SETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown ranker weights {name!r}; choose one of: {', '.join(WEIGHT_SETS)}"
        ) from None


def learned_scores(features: np.ndarray, weights: np.ndarray = WEIGHTS) -> np.ndarray:
    """The linear score of each row (higher is better; a log-odds scale, not a probability)."""
    return features @ weights


def prior(
    memory: Memory, now: datetime, preset: RecallPreset, *, dialogue: bool = False
) -> float:
    """What importance and recency add to a learned score, in its log-odds units:
    w_importance·(importance − 0.5) + w_recency·recency (for a chat turn, `dialogue`, only
    with `preset.chat_recency`). Bounded by the weights, so an old memory loses at most
    w_recency against a new one, whatever its relevance."""
    value = preset.w_importance * (memory.importance - 0.5)
    if preset.w_recency and (preset.chat_recency or not dialogue):
        value += preset.w_recency * recency(memory, now, preset.recency_half_life_days)
    return value


def priors(
    rows: CandidateRows, rowids: Sequence[int], dialogue: np.ndarray, now: datetime,
    preset: RecallPreset,
) -> np.ndarray:
    """`prior` of each of `rowids` (each in `rows`; `dialogue`: one flag per row), at once."""
    at = rows.positions(rowids)
    value = preset.w_importance * (rows.importance[at] - 0.5)
    if preset.w_recency:
        # recall.recency, on exact microseconds: the same age in days as the timedelta gives.
        age_days = np.maximum((micros(now) - rows.valid_from[at]) / 1e6 / 86400.0, 0.0)
        decay = np.exp(-math.log(2) * age_days / preset.recency_half_life_days)
        counts = np.ones(len(at), dtype=bool) if preset.chat_recency else ~dialogue
        value = value + np.where(counts, preset.w_recency * decay, 0.0)
    return value


def diversify(
    ranked: list[tuple[Scored, T]], embeddings: Mapping[int, np.ndarray],
    preset: RecallPreset,
) -> list[tuple[Scored, T]]:
    """The best `preset.diversity_depth` of `ranked` re-picked greedily (maximal marginal
    relevance): each next pick is the best score minus `preset.diversity` times how far its
    cosine with an already picked memory rises above `preset.diversity_floor` (scaled to 0..1).
    Scores are left as they were; memories without an embedding are never penalised, nor are
    chat turns (`Scored.dialogue`) or by them: a question and its answer read alike, and both
    are worth showing."""
    order = _mmr_order([s for s, _ in ranked], embeddings, preset)
    return ranked if order is None else [ranked[i] for i in order] + ranked[len(order):]


def diversify_scored(
    ranked: list[Scored], embeddings: Mapping[int, np.ndarray], preset: RecallPreset
) -> list[Scored]:
    """`diversify` over scores alone."""
    order = _mmr_order(ranked, embeddings, preset)
    return ranked if order is None else [ranked[i] for i in order] + ranked[len(order):]


def _mmr_order(
    ranked: Sequence[Scored], embeddings: Mapping[int, np.ndarray], preset: RecallPreset
) -> list[int] | None:
    """The new order of `ranked`'s head (see `diversify`); None when it stays as it is."""
    depth = min(preset.diversity_depth, len(ranked))
    if preset.diversity <= 0 or depth < 2:
        return None
    head = ranked[:depth]
    vecs = [None if s.dialogue else embeddings.get(s.rowid) for s in head]
    has = np.array([v is not None for v in vecs])
    if has.sum() < 2:
        return None
    dim = next(len(v) for v in vecs if v is not None)
    matrix = np.stack([v if v is not None else np.zeros(dim, dtype=np.float32) for v in vecs])
    # What each memory would lose if the other were picked first (0 where either is exempt).
    over = np.clip((matrix @ matrix.T - preset.diversity_floor) / (1.0 - preset.diversity_floor),
                   0.0, 1.0)
    lose = preset.diversity * np.where(has[:, None] & has[None, :], over, 0.0)
    # Plain floats and loops: at this size they are several times cheaper than numpy calls.
    columns = lose.T.tolist()  # columns[j][i]: what i loses once j is picked
    scores = [s.score for s in head]
    penalty = [0.0] * depth
    left = list(range(depth))
    picked: list[int] = []
    while left:
        # Ties go to the earlier (better ranked) memory, as `max` over the list did.
        best, value = left[0], scores[left[0]] - penalty[left[0]]
        for i in left:
            if scores[i] - penalty[i] > value:
                best, value = i, scores[i] - penalty[i]
        left.remove(best)
        picked.append(best)
        lost = columns[best]
        for i in left:
            if lost[i] > penalty[i]:
                penalty[i] = lost[i]
    return picked


def rank(
    pool: Sequence[int], found: Candidates, preset: RecallPreset, now: datetime
) -> list[tuple[Scored, Memory]]:
    """`pool` best first by the learned score plus the importance and recency prior (`prior`),
    each with its memory."""
    rows = as_candidate_rows(found.rows)
    scored = rank_scored(pool, found, preset, now)
    memories = rows.memories([s.rowid for s in scored])
    return [(s, memories[s.rowid]) for s in scored]


def rank_scored(
    pool: Sequence[int], found: Candidates, preset: RecallPreset, now: datetime
) -> list[Scored]:
    """`rank` without building the memories: best first, ties to the newer (`best_first`)."""
    rows = as_candidate_rows(found.rows)
    features, dialogue = _features(pool, found, rows, preset)
    scores = np.where(
        dialogue,
        learned_scores(features, weights_of(preset)),
        learned_scores(features, weights_of(preset, dialogue=False)),
    )
    totals = (scores + priors(rows, pool, dialogue, now, preset)).tolist()
    newer = rows.valid_from[rows.positions(pool)].tolist()
    bm25 = dict(found.text_hits)
    cosines = found.cosines
    # A stable sort on (score, valid_from), highest first, as `recall.best_first` sorts.
    order = sorted(range(len(pool)), key=lambda i: (totals[i], newer[i]), reverse=True)
    return [
        Scored(pool[i], totals[i], cosines[pool[i]], bm25.get(pool[i]), features[i],
               bool(dialogue[i]))
        for i in order
    ]

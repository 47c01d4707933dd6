"""Ranking for recall: fusion of vector and BM25 hits, conversation context, importance and
recency, the token budget.

Pure functions over ranked id lists and rows; the knobs are data (`RecallPreset`) with named
presets, so `bench/` can sweep them without touching code. `memory.retrieval` does the I/O:
it asks the indexes, calls `fuse`, fetches the rows `context_rowids` names, then `add_context`
and `rescore` (or the learned ranker).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, tzinfo

import numpy as np

from .candidates import CandidateRows, as_candidate_rows, micros
from .errors import ConfigError
from .models import Memory, MemoryCategory, Scope

__all__ = [
    "PRESETS",
    "REQUEST_WORDS",
    "RecallPreset",
    "Scored",
    "TimeWindow",
    "add_context",
    "adjacent",
    "apply_budget",
    "best_first",
    "boost",
    "clean_query",
    "context_rowids",
    "drop_words",
    "estimate_tokens",
    "fuse",
    "get_preset",
    "minmax",
    "month_year",
    "query_tense",
    "query_terms",
    "query_windows",
    "recency",
    "rescore",
    "rescore_scored",
    "strip_spans",
]

# Words that carry no topic: question words, auxiliaries, pronouns. Dropping them keeps BM25 from
# rewarding memories that merely share "what did you" with the question.
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers herself him himself his how i if in into is it its itself
    just me more most my myself no nor not now of off on once only or other our ours ourselves out
    over own same she should so some such than that the their theirs them themselves then there
    these they this those through to too under until up very was we were what when where which
    while who whom why will with would you your yours yourself yourselves s t don ll ve re d m
    o y ain aren couldn didn doesn hadn hasn haven isn mightn mustn needn shan shouldn wasn weren
    won wouldn""".split()
)

# Words of asking, not of topic: "Any ideas for…", "I need a…", "Can you suggest…". Every request
# to an assistant is full of them, and a memory that happens to hold one ("needs a walk every
# evening") is no answer. Only the default preset leaves them out (see `_LEARNED`).
REQUEST_WORDS = frozenset(
    """need needs want wants help idea ideas suggest suggestion suggestions recommend
    recommendation recommendations tips advice please tell give show let know think good best
    any anything something thing things get make could would like""".split()
)

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class RecallPreset:
    """How recall ranks. Scores are fused first (`fuse`), then conversation context is added
    (`add_context`), then importance and recency scale the result (`rescore`)."""

    name: str
    # "fused": the fused score plus context, scaled by `rescore`. "learned": `memory.ranker`
    # scores every candidate (hits and their context rows) from its features; importance and
    # recency then scale its odds, and the time windows are one of its features (w_time unused).
    ranker: str = "fused"
    # Learned ranker only: its weight set (`ranker.WEIGHT_SETS`), whether the sitting feature
    # counts only in proportion to the memory's own match outside dialogues
    # (`sitting_by_content`), and where the length feature of a memory outside a dialogue
    # saturates (`length_cap_chars`, 0: it never does).
    weights: str = "turns-v1"
    # The weight set for memories outside a dialogue (no memory of their sitting asks: the
    # facts a model writes in blocks); "" uses `weights` for every memory.
    fact_weights: str = ""
    sitting_by_content: bool = False
    length_cap_chars: int = 0
    # Learned ranker only: the best `diversity_depth` are re-ordered so that a memory saying
    # nearly what a better one already says (embedding cosine above `diversity_floor`) loses
    # up to `diversity` log-odds; the proxy shows five, and five restatements of one fact
    # answer less than five facts. 0 turns it off.
    diversity: float = 0.0
    diversity_floor: float = 0.6
    diversity_depth: int = 20
    fusion: str = "weighted"  # "weighted" | "rrf"
    vector_depth: int = 50
    text_depth: int = 50
    w_vector: float = 0.5
    w_text: float = 0.5
    # Weighted fusion: cosine as it is ("raw") or min-max scaled over the hits ("minmax").
    vector_norm: str = "raw"
    rrf_k: int = 60
    # Conversation context: the neighbours of the `context_seeds` best hits (the memories
    # written just before and after one: same user, no conflicting session, at most
    # `context_gap_minutes` apart, `context_span` rows either side) gain this share of the
    # hit's score (1/distance for farther rows), and join the candidates if they were not.
    context_weight: float = 0.0
    context_span: int = 1
    context_seeds: int = 20
    context_gap_minutes: float = 120.0
    # Time: a query naming a date ("on 16 June, 2023", "in August 2023", "yesterday") adds
    # w_time to the rescore factor of memories written in that window (or up to
    # `time_slack_days` after it, when it was talked about); the date's words leave the BM25
    # query; and a window holding at most `time_candidates` memories has them all scored by
    # exact cosine as extra candidates.
    w_time: float = 0.0
    time_slack_days: float = 7.0
    time_candidates: int = 0
    # Importance and recency. Fused ranker: multipliers, score × (1 + w_importance·(importance
    # − 0.5) + w_recency·recency), so they act at any score scale and an old, relevant memory
    # loses at most w_recency of its score. Learned ranker: added to its log-odds score
    # (`ranker.prior`), so w_importance = 2 puts 0.9 a full 1.2 above 0.3 (about a 0.2 cosine
    # difference under the fitted weights) and an old memory loses at most w_recency.
    # Words the user's memories are full of (their own name, in a log of their chats) match
    # everything and so point at nothing; a common one pulls the query's embedding towards them
    # and lets BM25 rank any short memory that holds it first. A query word found in at least
    # `common_share` of the user's current memories (once they have `common_min_memories`)
    # leaves both the BM25 query and the text embedded for the vector search. 0 turns it off.
    common_share: float = 0.0
    common_min_memories: int = 20
    w_importance: float = 0.05
    w_recency: float = 0.05
    recency_half_life_days: float = 90.0
    # Learned ranker: whether recency also counts for chat turns (memories of a dialogue, see
    # `fact_weights`). A newer fact replaces an older one; a chat log is history, and a
    # question about it may ask about any point of it.
    chat_recency: bool = True
    stop_words: frozenset[str] = field(default=STOP_WORDS, repr=False)

    @property
    def reads_dates(self) -> bool:
        """Whether ranking looks at the time windows the query names."""
        return self.w_time > 0 or self.ranker == "learned"

    def __post_init__(self) -> None:
        if self.ranker not in ("fused", "learned"):
            raise ConfigError(f"unknown ranker {self.ranker!r}; expected fused or learned")
        if self.fusion not in ("weighted", "rrf"):
            raise ConfigError(f"unknown fusion {self.fusion!r}; expected weighted or rrf")
        if self.vector_norm not in ("raw", "minmax"):
            raise ConfigError(f"unknown vector_norm {self.vector_norm!r}; expected raw or minmax")
        if min(self.vector_depth, self.text_depth, self.context_span, self.context_seeds) < 0:
            raise ConfigError("depths, context_span and context_seeds must not be negative")
        if self.recency_half_life_days <= 0:
            raise ConfigError("recency_half_life_days must be positive")
        if not 0.0 <= self.common_share <= 1.0:
            raise ConfigError("common_share must be between 0 and 1")
        if self.length_cap_chars < 0:
            raise ConfigError("length_cap_chars must not be negative")
        if self.diversity < 0 or not 0.0 <= self.diversity_floor < 1.0:
            raise ConfigError("diversity must not be negative, diversity_floor in [0, 1)")


_NO_BOOSTS = {"w_importance": 0.0, "w_recency": 0.0}
# The first engine's default: equal weights, raw cosine + min-max BM25, no context, no dates.
_V0 = RecallPreset("hybrid-v0")
# Each step of bench/RESULTS.md "Recall quality (LoCoMo)" stays reproducible by name.
_CONTEXT = replace(_V0, name="context", context_weight=0.5)
_TUNED = replace(
    _V0, name="context-tuned", vector_depth=30, text_depth=40, w_vector=0.35, w_text=0.65,
    vector_norm="minmax", context_weight=0.6, context_span=2, context_seeds=10,
)
_DATED = replace(_TUNED, name="dated", w_time=0.5, time_slack_days=3.0, time_candidates=200)
_COMMON = replace(_DATED, name="common", common_share=0.3)
# The learned ranker fitted on chat turns alone: the default until issue 15.
_LEARNED_TURNS = replace(_COMMON, name="learned-turns", ranker="learned", w_time=0.0)
# One ranker for both shapes the proxy sees, told apart by content (`memory.ranker`): chat
# turns keep the turn-fitted ranker (turns-v1, length uncapped, no recency, no diversity);
# facts get turns-v2 weights, gain from their block only by their own content, their length
# saturates at 20 characters, restatements of a better fact make room (diversity), and
# recency counts. Request words ("any ideas", "I need") are no topic, and importance moves a
# ranking (see `RecallPreset`).
_LEARNED = replace(
    _LEARNED_TURNS, name="default", weights="turns-v1", fact_weights="turns-v2",
    sitting_by_content=True,
    length_cap_chars=20, w_importance=2.0, w_recency=1.0, recency_half_life_days=180.0,
    diversity=2.0, diversity_floor=0.6, stop_words=STOP_WORDS | REQUEST_WORDS,
    chat_recency=False,
)

PRESETS: dict[str, RecallPreset] = {
    "default": _LEARNED,
    "learned-turns": _LEARNED_TURNS,
    "common": _COMMON,
    "dated": _DATED,
    "context-tuned": _TUNED,
    "context": _CONTEXT,
    "hybrid-v0": _V0,
    "rrf": RecallPreset("rrf", fusion="rrf"),
    "bm25": RecallPreset("bm25", w_vector=0.0, w_text=1.0, **_NO_BOOSTS),
    "vector": RecallPreset("vector", w_vector=1.0, w_text=0.0, **_NO_BOOSTS),
    "baseline": RecallPreset("baseline", stop_words=frozenset(), **_NO_BOOSTS),
}


def get_preset(name: str | RecallPreset) -> RecallPreset:
    if isinstance(name, RecallPreset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown recall preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None


def clean_query(query: str, preset: RecallPreset, common: Collection[str] = ()) -> str:
    """The query's words minus stop words and `common` ones (all of them if nothing else is
    left)."""
    words = _WORD.findall(query)
    kept = [w for w in words if (f := w.casefold()) not in preset.stop_words and f not in common]
    return " ".join(kept or words)


def query_terms(query: str, preset: RecallPreset) -> list[str]:
    """The distinct casefolded words of `query` that are not stop words: the ones that may be
    common in the user's memories."""
    return list(dict.fromkeys(
        f for w in _WORD.findall(query) if (f := w.casefold()) not in preset.stop_words
    ))


def drop_words(query: str, words: Collection[str]) -> str:
    """`query` without the occurrences of `words` (casefolded; with a possessive "'s"), the rest
    as written, so the embedder still reads a sentence. The query itself when nothing is left."""
    if not words:
        return query
    pattern = re.compile(r"\b\w+(?:['’]s)?\b", re.UNICODE)

    def keep(m: re.Match[str]) -> str:
        word = re.sub(r"['’]s$", "", m.group(0))
        return "" if word.casefold() in words else m.group(0)

    left = re.sub(r"\s+([,.;:!?])", r"\1", " ".join(pattern.sub(keep, query).split()))
    return left if _WORD.search(left) else query


@dataclass
class Scored:
    rowid: int
    score: float
    similarity: float = 0.0
    bm25: float | None = None
    # The learned ranker's feature values for this candidate (see `memory.ranker`).
    features: np.ndarray | None = field(default=None, repr=False)
    # The learned ranker: whether the memory is part of a dialogue (something in its sitting
    # asks), so a chat turn rather than a fact a model wrote.
    dialogue: bool = False


def minmax(values: Sequence[float]) -> list[float]:
    """Scale to [0, 1]; all-equal values (or one value) all become 1."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        return [1.0 for _ in values]
    return [(v - lo) / (hi - lo) for v in values]


def fuse(
    vector_hits: Sequence[tuple[int, float]], text_hits: Sequence[tuple[int, float]],
    preset: RecallPreset,
) -> dict[int, Scored]:
    """Combine (rowid, cosine) and (rowid, bm25) lists, each best first, into one score per row."""
    out: dict[int, Scored] = {}
    if preset.fusion == "rrf":
        for rank, (rid, sim) in enumerate(vector_hits):
            s = out.setdefault(rid, Scored(rid, 0.0))
            s.similarity = sim
            s.score += preset.w_vector / (preset.rrf_k + rank + 1)
        for rank, (rid, bm) in enumerate(text_hits):
            s = out.setdefault(rid, Scored(rid, 0.0))
            s.bm25 = bm
            s.score += preset.w_text / (preset.rrf_k + rank + 1)
        return out
    sims = [sim for _, sim in vector_hits]
    scaled = minmax(sims) if preset.vector_norm == "minmax" else [max(s, 0.0) for s in sims]
    for (rid, sim), value in zip(vector_hits, scaled, strict=True):
        out[rid] = Scored(rid, preset.w_vector * value, similarity=sim)
    for (rid, bm), norm in zip(text_hits, minmax([b for _, b in text_hits]), strict=True):
        s = out.setdefault(rid, Scored(rid, 0.0))
        s.bm25 = bm
        s.score += preset.w_text * norm
    return out


# --- conversation context ----------------------------------------------------------------------


def _seeds(scored: dict[int, Scored], preset: RecallPreset) -> list[Scored]:
    return sorted(scored.values(), key=lambda s: s.score, reverse=True)[: preset.context_seeds]


def context_rowids(scored: dict[int, Scored], preset: RecallPreset) -> list[int]:
    """Rows to fetch as possible neighbours of the best `context_seeds` hits (rowid ± span)."""
    if preset.context_weight <= 0 or preset.context_span <= 0:
        return []
    wanted: set[int] = set()
    for s in _seeds(scored, preset):
        for d in range(1, preset.context_span + 1):
            wanted.update((s.rowid - d, s.rowid + d))
    return sorted(wanted.difference(scored))


def adjacent(a: Memory, b: Memory, gap_minutes: float) -> bool:
    """Written in the same sitting: same user, no conflicting session, close in time."""
    if a.user_id != b.user_id:
        return False
    if a.session_id and b.session_id and a.session_id != b.session_id:
        return False
    return abs((a.created_at - b.created_at).total_seconds()) <= gap_minutes * 60.0


def add_context(
    scored: dict[int, Scored], rows: CandidateRows | Mapping[int, Memory], scope: Scope,
    categories: Collection[MemoryCategory] | None, preset: RecallPreset,
) -> dict[int, Scored]:
    """The neighbours of the best `context_seeds` hits gain `context_weight` × the best
    (1/distance-discounted) seed score next to them. A neighbour fetched only for this joins
    the candidates when current, visible from `scope` and of one of `categories` (if given).
    So the turn that answers a matching question, or the question before a matching answer,
    rises with it. `rows`: the store's `CandidateRows` (or memories by row key)."""
    if preset.context_weight <= 0 or preset.context_span <= 0:
        return scored
    table = as_candidate_rows(rows)
    at = table.at
    visible = set(scope.visible_keys())
    gains: dict[int, float] = {}
    for seed in _seeds(scored, preset):
        origin = at.get(seed.rowid)
        if origin is None:
            continue
        for d in range(1, preset.context_span + 1):
            for rid in (seed.rowid - d, seed.rowid + d):
                i = at.get(rid)
                gain = preset.context_weight * seed.score / d
                if i is None or gain <= gains.get(rid, 0.0):
                    continue
                if rid not in scored and not (
                    table.user_id[i] == scope.user_id
                    and table.current[i]
                    and table.scope_key[i] in visible
                    and (not categories or table.category[i] in categories)
                ):
                    continue
                if _adjacent_rows(table, origin, i, preset.context_gap_minutes):
                    gains[rid] = gain
    out = dict(scored)
    for rid, gain in gains.items():
        old = scored.get(rid)
        out[rid] = (
            Scored(rid, old.score + gain, old.similarity, old.bm25) if old else Scored(rid, gain)
        )
    return out


def _adjacent_rows(rows: CandidateRows, a: int, b: int, gap_minutes: float) -> bool:
    """`adjacent` for the rows at positions `a` and `b`."""
    if rows.user_id[a] != rows.user_id[b]:
        return False
    sa, sb = rows.session_id[a], rows.session_id[b]
    if sa and sb and sa != sb:
        return False
    # Exact microseconds over 10**6, as timedelta.total_seconds() divides them.
    apart = abs(int(rows.created_at[a]) - int(rows.created_at[b])) / 1_000_000
    return apart <= gap_minutes * 60.0


# --- dates named in the query ------------------------------------------------------------------

_MONTHS = {
    name: i + 1
    for i, names in enumerate(
        ("january jan", "february feb", "march mar", "april apr", "may", "june jun",
         "july jul", "august aug", "september sep sept", "october oct", "november nov",
         "december dec")
    )
    for name in names.split()
}
_MONTH = "(" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_ORD = r"(\d{1,2})(?:st|nd|rd|th)?"
_YEAR = r"((?:19|20)\d{2})"
_DATE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ymd", re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")),
    ("dmy", re.compile(rf"\b{_ORD}\s+(?:of\s+)?{_MONTH},?\s+{_YEAR}\b", re.IGNORECASE)),
    ("mdy", re.compile(rf"\b{_MONTH}\s+{_ORD},?\s+{_YEAR}\b", re.IGNORECASE)),
    ("my", re.compile(rf"\b{_MONTH},?\s+(?:of\s+)?{_YEAR}\b", re.IGNORECASE)),
    # A month alone only after a preposition and capitalised ("in July", not "may have").
    ("m", re.compile(r"\b(in|during|since|from|of|last|this|early|late|mid|by)\s+("
                     + "|".join(n.capitalize() for n in _MONTHS if len(n) > 3 and n != "may")
                     + r")\b")),
    ("y", re.compile(rf"\b(?:in|during|since|of)\s+{_YEAR}\b", re.IGNORECASE)),
    ("rel", re.compile(r"\b(yesterday|today|last\s+(?:week|month|year))\b", re.IGNORECASE)),
)


@dataclass(frozen=True)
class TimeWindow:
    """A span of time a query names, [start, end), and where it was named in the query."""

    start: datetime
    end: datetime
    span: tuple[int, int]

    def contains(self, when: datetime, slack: timedelta = timedelta(0)) -> bool:
        return self.start <= when < self.end + slack


def _month_start(year: int, month: int, tz: tzinfo | None) -> datetime:
    return datetime(year + (month - 1) // 12, (month - 1) % 12 + 1, 1, tzinfo=tz)


class _NotInThePast(Exception):
    """The query names a time that has not begun: no memory was written then."""


# Words that put a question after now ("will", "going to", "planning", "next") or before it.
_FUTURE = re.compile(
    r"(?:\b(?:will|shall|gonna|going\s+to|plan|plans|planning|planned\s+(?:to|for)|upcoming|"
    r"coming|next|intend|intends|hoping|hope\s+to|about\s+to|ahead)\b|\w'll\b)",
    re.IGNORECASE,
)
_PAST = re.compile(
    r"\b(?:did|was|were|went|had|ago|used\s+to|last|happened|visited|took|got)\b", re.IGNORECASE
)


def query_tense(query: str) -> str:
    """"future" when the query speaks of what is ahead, "past" when only of what was, else
    "unknown"."""
    if _FUTURE.search(query):
        return "future"
    return "past" if _PAST.search(query) else "unknown"


def month_year(prefix: str, month: int, now: datetime, tense: str) -> int | None:
    """The year a month named alone ("in August") means, asked at `now`; None when it is one
    still ahead, which no memory was written in. "last August" is the latest August before
    this month; "this August" is this year's; otherwise the current month is this one, a month
    already past this year is this year's unless the query speaks of the future, and a month
    later in the year is last year's only when the query speaks of the past: "…hiking trip in
    August?" asked in July means the August ahead."""
    word = prefix.casefold()
    if word == "last":
        return now.year if month < now.month else now.year - 1
    if word == "this" or month == now.month:
        return now.year if month <= now.month else None
    if month < now.month:
        return None if tense == "future" else now.year
    return now.year - 1 if tense == "past" else None


def _window(
    kind: str, groups: tuple[str, ...], now: datetime, tense: str = "unknown"
) -> tuple[datetime, datetime]:
    tz = now.tzinfo
    if kind == "ymd":
        day = datetime(int(groups[0]), int(groups[1]), int(groups[2]), tzinfo=tz)
        return day, day + timedelta(days=1)
    if kind in ("dmy", "mdy"):
        d, m, y = groups if kind == "dmy" else (groups[1], groups[0], groups[2])
        day = datetime(int(y), _MONTHS[m.casefold()], int(d), tzinfo=tz)
        return day, day + timedelta(days=1)
    if kind == "my":
        year, month = int(groups[1]), _MONTHS[groups[0].casefold()]
        return _month_start(year, month, tz), _month_start(year, month + 1, tz)
    if kind == "m":
        month = _MONTHS[groups[1].casefold()]
        year = month_year(groups[0], month, now, tense)
        if year is None:
            raise _NotInThePast
        return _month_start(year, month, tz), _month_start(year, month + 1, tz)
    if kind == "y":
        return _month_start(int(groups[0]), 1, tz), _month_start(int(groups[0]) + 1, 1, tz)
    word = " ".join(groups[0].casefold().split())
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if word == "today":
        return today, now
    if word == "yesterday":
        return today - timedelta(days=1), today
    if word == "last week":
        return today - timedelta(days=7), now
    if word == "last month":
        this = _month_start(now.year, now.month, tz)
        return _month_start(now.year, now.month - 1, tz), this
    return _month_start(now.year - 1, 1, tz), _month_start(now.year, 1, tz)


def query_windows(query: str, now: datetime) -> list[TimeWindow]:
    """The spans of time `query` names that have begun by `now`, most specific forms first,
    without overlaps; `now` anchors relative ones ("yesterday"; "in July": see `month_year`).
    A time still ahead gives no window, so its words stay in the text search."""
    found: list[TimeWindow] = []
    taken: list[tuple[int, int]] = []
    tense = query_tense(query)
    for kind, pattern in _DATE_PATTERNS:
        for m in pattern.finditer(query):
            if any(m.start() < b and a < m.end() for a, b in taken):
                continue
            try:
                start, end = _window(kind, m.groups(), now, tense)
            except (ValueError, OverflowError):  # "31 February"
                continue
            except _NotInThePast:
                taken.append(m.span())  # "in August 2026" must not match inside it either
                continue
            if start > now:  # "in August 2027", "on 3 March, 2030": nothing was written then
                taken.append(m.span())
                continue
            found.append(TimeWindow(start, end, m.span()))
            taken.append(m.span())
    return found


def strip_spans(query: str, windows: Sequence[TimeWindow]) -> str:
    """The query without the words that named its time windows."""
    for w in sorted(windows, key=lambda w: w.span, reverse=True):
        query = query[: w.span[0]] + " " + query[w.span[1] :]
    return query


# --- importance, recency, budget ---------------------------------------------------------------


def recency(memory: Memory, now: datetime, half_life_days: float) -> float:
    age_days = max((now - memory.valid_from).total_seconds() / 86400.0, 0.0)
    return math.exp(-math.log(2) * age_days / half_life_days)


def rescore(
    scored: dict[int, Scored], memories: CandidateRows | Mapping[int, Memory], now: datetime,
    preset: RecallPreset, windows: Sequence[TimeWindow] = (),
) -> list[tuple[Scored, Memory]]:
    """Scale by importance, recency and the query's time windows; best first, ties broken by
    newer first; each with its memory."""
    rows = as_candidate_rows(memories)
    ranked = rescore_scored(scored, rows, now, preset, windows)
    found = rows.memories([s.rowid for s in ranked])
    return [(s, found[s.rowid]) for s in ranked if s.rowid in found]


def rescore_scored(
    scored: dict[int, Scored], rows: CandidateRows, now: datetime, preset: RecallPreset,
    windows: Sequence[TimeWindow] = (),
) -> list[Scored]:
    """`rescore` without building the memories (rows not in `rows` are left out)."""
    kept = [s for rid, s in scored.items() if rid in rows]
    at = rows.positions([s.rowid for s in kept])
    # `boost` for every row at once, on exact microseconds.
    factor = 1.0 + preset.w_importance * (rows.importance[at] - 0.5)
    if preset.w_recency:
        age_days = np.maximum((micros(now) - rows.valid_from[at]) / 1e6 / 86400.0, 0.0)
        decay = np.exp(-math.log(2) * age_days / preset.recency_half_life_days)
        factor = factor + preset.w_recency * decay
    if preset.w_time and windows:
        slack = timedelta(days=preset.time_slack_days)
        created = rows.created_at[at]
        inside = np.zeros(len(at), dtype=bool)
        for w in windows:
            inside |= (created >= micros(w.start)) & (created < micros(w.end + slack))
        factor = factor + np.where(inside, preset.w_time, 0.0)
    for s, f in zip(kept, factor.tolist(), strict=True):
        s.score *= f
    newer = rows.valid_from[at].tolist()
    # A stable sort on (score, valid_from), highest first, as `best_first` sorts.
    order = sorted(range(len(kept)), key=lambda i: (kept[i].score, newer[i]), reverse=True)
    return [kept[i] for i in order]


def boost(
    memory: Memory, now: datetime, preset: RecallPreset, windows: Sequence[TimeWindow] = ()
) -> float:
    """The rescore factor: 1 + w_importance·(importance − 0.5) + w_recency·recency, plus w_time
    when the memory was written in one of `windows`."""
    factor = 1.0 + preset.w_importance * (memory.importance - 0.5)
    if preset.w_recency:
        factor += preset.w_recency * recency(memory, now, preset.recency_half_life_days)
    if preset.w_time and windows:
        slack = timedelta(days=preset.time_slack_days)
        if any(w.contains(memory.created_at, slack) for w in windows):
            factor += preset.w_time
    return factor


def best_first(ranked: list[tuple[Scored, Memory]]) -> list[tuple[Scored, Memory]]:
    """Highest score first; ties go to the newer memory."""
    ranked.sort(key=lambda pair: (pair[0].score, pair[1].valid_from), reverse=True)
    return ranked


def estimate_tokens(text: str) -> int:
    """~4 characters a token for English; cheap and good enough for a budget."""
    return max(1, (len(text) + 3) // 4)


def apply_budget(memories: Iterable[Memory], budget_tokens: int | None) -> list[Memory]:
    """Keep memories (best first) while they fit; a line's overhead (alias, date) is ~12 tokens."""
    if budget_tokens is None:
        return list(memories)
    kept: list[Memory] = []
    used = 0
    for memory in memories:
        cost = estimate_tokens(memory.content) + 12
        if used + cost > budget_tokens:
            break
        kept.append(memory)
        used += cost
    return kept

"""Ranking for recall: fusion of vector and BM25 hits, importance and recency, the token budget.

Pure functions over ranked id lists; the knobs are data (`RecallPreset`) with named presets, so
`bench/` can sweep them without touching code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from memory.errors import ConfigError
from memory.models import Memory

__all__ = [
    "PRESETS",
    "RecallPreset",
    "Scored",
    "apply_budget",
    "clean_query",
    "estimate_tokens",
    "fuse",
    "get_preset",
    "rescore",
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

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class RecallPreset:
    name: str
    fusion: str = "weighted"  # "weighted" | "rrf"
    vector_depth: int = 50
    text_depth: int = 50
    w_vector: float = 0.5
    w_text: float = 0.5
    rrf_k: int = 60
    w_importance: float = 0.05
    w_recency: float = 0.05
    recency_half_life_days: float = 90.0
    stop_words: frozenset[str] = field(default=STOP_WORDS, repr=False)


PRESETS: dict[str, RecallPreset] = {
    "default": RecallPreset("default"),
    "rrf": RecallPreset("rrf", fusion="rrf"),
    "bm25": RecallPreset("bm25", w_vector=0.0, w_text=1.0, w_importance=0.0, w_recency=0.0),
    "vector": RecallPreset("vector", w_vector=1.0, w_text=0.0, w_importance=0.0, w_recency=0.0),
    "baseline": RecallPreset(
        "baseline", w_importance=0.0, w_recency=0.0, stop_words=frozenset()
    ),
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


def clean_query(query: str, preset: RecallPreset) -> str:
    words = _WORD.findall(query)
    kept = [w for w in words if w.casefold() not in preset.stop_words]
    return " ".join(kept or words)


@dataclass
class Scored:
    rowid: int
    score: float
    similarity: float = 0.0
    bm25: float | None = None


def _minmax(values: Sequence[float]) -> list[float]:
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
    if preset.fusion != "weighted":
        raise ConfigError(f"unknown fusion {preset.fusion!r}")
    for rid, sim in vector_hits:
        out[rid] = Scored(rid, preset.w_vector * max(sim, 0.0), similarity=sim)
    for (rid, bm), norm in zip(text_hits, _minmax([b for _, b in text_hits]), strict=True):
        s = out.setdefault(rid, Scored(rid, 0.0))
        s.bm25 = bm
        s.score += preset.w_text * norm
    return out


def recency(memory: Memory, now: datetime, half_life_days: float) -> float:
    age_days = max((now - memory.valid_from).total_seconds() / 86400.0, 0.0)
    return math.exp(-math.log(2) * age_days / half_life_days)


def rescore(
    scored: dict[int, Scored], memories: dict[int, Memory], now: datetime, preset: RecallPreset
) -> list[tuple[Scored, Memory]]:
    """Add the importance and recency terms; best first, ties broken by newer first."""
    ranked: list[tuple[Scored, Memory]] = []
    for rid, s in scored.items():
        memory = memories.get(rid)
        if memory is None:
            continue
        s.score += preset.w_importance * memory.importance
        if preset.w_recency:
            s.score += preset.w_recency * recency(memory, now, preset.recency_half_life_days)
        ranked.append((s, memory))
    ranked.sort(key=lambda pair: (pair[0].score, pair[1].valid_from), reverse=True)
    return ranked


def estimate_tokens(text: str) -> int:
    """~4 characters a token for English; cheap and good enough for a budget."""
    return max(1, (len(text) + 3) // 4)


def apply_budget(memories: Sequence[Memory], budget_tokens: int | None) -> list[Memory]:
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

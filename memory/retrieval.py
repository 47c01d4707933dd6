"""Retrieval: every read that ranks memories, from the query to the list the caller gets.

`recall` is the proxy's path and reads top to bottom here: the query's user-common words are
found (`common_words`) and left out of the text that is embedded; vector KNN and BM25 run,
both pre-filtered to the request's scope; a query naming dates adds the memories written then;
the hits are fused (`recall.fuse`), conversation context joins them (`recall.add_context`), and
either the learned ranker (`ranker.rank`) or the fused rescoring (`recall.rescore`) orders them;
the token budget cuts the list and the accesses are recorded in the background. `recall` and
`ranker` hold the pure scoring functions; this module does the I/O between them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from . import ranker
from .access_log import AccessLog
from .candidates import CandidateRows
from .common_words import CommonWords
from .errors import EmbedderError
from .executors import Executors
from .models import (
    Memory,
    MemoryCategory,
    MemoryFilter,
    Scope,
    SearchResult,
    as_utc,
    utcnow,
)
from .parts import EngineParts
from .recall import (
    RecallPreset,
    Scored,
    TimeWindow,
    add_context,
    apply_budget,
    clean_query,
    context_rowids,
    drop_words,
    fuse,
    get_preset,
    query_terms,
    query_windows,
    rescore_scored,
    strip_spans,
)

log = logging.getLogger("headroom.memory")

# The core tier reads at most this many of a user's important memories (the newest); its token
# budget keeps far fewer.
_CORE_CANDIDATES = 50

__all__ = ["Ranking", "Retrieval", "exact_knn"]


def exact_knn(
    vector: np.ndarray, rows: list[tuple[int, np.ndarray]], k: int
) -> list[tuple[int, float]]:
    """Brute-force cosine over stored embeddings, for reads of history the index does not hold."""
    if not rows or k <= 0:
        return []
    matrix = np.stack([v for _, v in rows])
    sims = matrix @ np.asarray(vector, dtype=np.float32)
    order = np.argsort(-sims)[:k]
    return [(rows[i][0], float(sims[i])) for i in order]


def _cosines(
    rowids: list[int], vector_hits: list[tuple[int, float]], vector: np.ndarray,
    rows: CandidateRows,
) -> dict[int, float]:
    """The query's cosine with each of `rowids`: from the vector hits, else exact from the
    stored embeddings (rows without one are left out)."""
    cosines = dict(vector_hits)
    query = np.asarray(vector, dtype=np.float32)
    for rid in rowids:
        if rid not in cosines and (emb := rows.embedding(rid)) is not None:
            cosines[rid] = float(emb @ query)
    return cosines


# How long a reader job waits for its query's vector before handing the wait back to the
# event loop (a local model answers in a few ms; see `Retrieval.hybrid_search`).
_READER_WAIT_S = 0.05


@dataclass(frozen=True)
class _SearchedFirst:
    """A recall's BM25 search (and the rows of its hits), done before its vector was ready."""

    searched: tuple[list[TimeWindow], list[tuple[int, float]]]
    prefetched: CandidateRows | None


@dataclass(frozen=True)
class Ranking:
    """Recall's candidates best first, and the rows they were weighed on."""

    scored: list[Scored]
    rows: CandidateRows

    def top(self, k: int | None = None) -> list[tuple[Scored, Memory]]:
        """The best `k` (all when None) with their memories, built now; a row changed since
        it was weighed is skipped and the next one takes its place: removed (a purge), closed
        (forgotten, superseded), or its key now another memory's (`memories.rid` is reused
        after a purge of the newest row, by any user's next insert)."""
        wanted = len(self.scored) if k is None else k
        out: list[tuple[Scored, Memory]] = []
        start = 0
        while len(out) < wanted and start < len(self.scored):
            batch = self.scored[start : start + wanted - len(out)]
            start += len(batch)
            memories = self.rows.memories([s.rowid for s in batch])
            out += [(s, memories[s.rowid]) for s in batch
                    if s.rowid in memories and self._still_weighed(s.rowid, memories[s.rowid])]
        return out

    def _still_weighed(self, rowid: int, memory: Memory) -> bool:
        """`memory`, read now, is the row that was weighed, and current. Every candidate was
        current when found (the indexes and the date windows hold current rows only, and
        context neighbours must be), but BM25 runs before the rows are read for the ranking,
        and the memories are read after it: a forget in between shows only here."""
        rows = self.rows
        i = rows.at.get(rowid)
        if i is None:
            return False
        if memory.user_id != rows.user_id[i] or memory.scope.key != rows.scope_key[i]:
            return False
        if memory.content != rows.content[i]:
            return False
        return memory.is_current and memory.forgotten_at is None


def _categories(categories: Sequence[MemoryCategory | str] | None) -> list[MemoryCategory] | None:
    return [MemoryCategory.parse(c) for c in categories] if categories else None


class Retrieval:
    def __init__(
        self, parts: EngineParts, executors: Executors, common_words: CommonWords
    ) -> None:
        self.parts = parts
        self.executors = executors
        self.common_words = common_words
        config = parts.config
        preset = get_preset(config.recall_preset)
        if config.recall_importance_weight is not None:
            preset = replace(preset, w_importance=config.recall_importance_weight)
        self.preset: RecallPreset = preset
        self.access = AccessLog(parts, executors.write_later)

    # --- recall: the proxy's path ------------------------------------------------------------

    async def recall(
        self, query: str, scope: Scope, top_k: int, *, token_budget: int | None,
        categories: Sequence[MemoryCategory | str] | None, now: datetime | None, touch: bool,
        preset: str | RecallPreset | None = None,
    ) -> list[Memory]:
        """The memories most worth showing for `query`, best first, within `token_budget`;
        then the user's core memories (`core_memories`) that are not among them."""
        # The core tier needs nothing of the ranking but what to leave out: it is read while
        # the query is embedded and searched.
        async def core_rows() -> list[Memory]:
            await asyncio.sleep(0)  # after the query leaves for the model (`hybrid_search`)
            return await self._core_rows(scope, categories)

        results, core = await asyncio.gather(
            self.hybrid_search(query, scope, top_k, categories, now=now, preset=preset),
            core_rows(),
        )
        memories = apply_budget([r.memory for r in results], token_budget)
        memories += self._core_tier(core, exclude={m.id for m in memories})
        if touch and memories:
            # Access counts are bookkeeping: never make the caller wait for the write.
            self.access.record([m.id for m in memories], utcnow())
        return memories

    async def core_memories(
        self, scope: Scope, categories: Sequence[MemoryCategory | str] | None = None,
        *, exclude: Collection[str] = (),
    ) -> list[Memory]:
        """The core tier: what matters to every request whether or not it shares a word with
        it (a diet or an allergy for a dinner question, a health condition for a plan), taken
        as the model rated it: current memories this scope sees of importance at least
        `recall_core_min_importance`, most important (then newest) first, within
        `recall_core_tokens` (0: none). Letta keeps such core memory always in context."""
        return self._core_tier(await self._core_rows(scope, categories), exclude=exclude)

    async def _core_rows(
        self, scope: Scope, categories: Sequence[MemoryCategory | str] | None
    ) -> list[Memory]:
        """The core tier's candidates, newest first (none when the tier is off)."""
        config = self.parts.config
        if config.recall_core_tokens <= 0:
            return []
        flt = MemoryFilter(
            user_id=scope.user_id, session_id=scope.session_id, agent_id=scope.agent_id,
            turn_id=scope.turn_id, categories=_categories(categories),
            min_importance=config.recall_core_min_importance, limit=_CORE_CANDIDATES,
        )
        return await self.executors.read(lambda: self.parts.store.query(flt))

    def _core_tier(self, rows: list[Memory], *, exclude: Collection[str]) -> list[Memory]:
        """The core tier from its candidates: most important, then newest, within budget."""
        kept = sorted(
            (m for m in rows if m.id not in exclude),
            key=lambda m: (m.importance, m.valid_from), reverse=True,
        )
        return apply_budget(kept, self.parts.config.recall_core_tokens)

    async def hybrid_search(
        self, query: str, scope: Scope, top_k: int,
        categories: Sequence[MemoryCategory | str] | None, *, now: datetime | None = None,
        preset: str | RecallPreset | None = None, query_vector: np.ndarray | None = None,
    ) -> list[SearchResult]:
        """Vector KNN and BM25 fused and ranked. Without `query_vector`, the query is embedded
        without the words that are common in this user's memories, while BM25 runs."""
        chosen = get_preset(preset) if preset is not None else self.preset
        when = as_utc(now) if now else utcnow()
        cats = _categories(categories)
        overlap = getattr(self.parts.vectors, "answers_from_server", False)

        def ranked(
            vector: np.ndarray | None, common: frozenset[str] | None,
            searched: tuple[list[TimeWindow], list[tuple[int, float]]] | None,
            vector_hits: list[tuple[int, float]] | None = None,
            prefetched: CandidateRows | None = None,
        ) -> list[SearchResult]:
            ranking = self._ranked(query, scope, top_k, cats, when, chosen, vector, common,
                                   searched=searched, vector_hits=vector_hits,
                                   prefetched=prefetched)
            return [SearchResult(m, s.similarity, s.score, s.bm25)
                    for s, m in ranking.top(top_k)]

        if chosen.w_vector <= 0 or (query_vector is not None and not overlap):
            return await self.executors.read(lambda: ranked(query_vector, None, None))
        common = self._recent_common_terms(query, scope.user_id, chosen)
        if common is None:
            common = await self.executors.read(
                lambda: self._common_terms(query, scope.user_id, chosen)
            )

        def text_search() -> tuple[list[TimeWindow], list[tuple[int, float]]]:
            windows = query_windows(query, when) if chosen.reads_dates else []
            return windows, self._text_hits(query, scope, top_k, cats, windows, chosen, common)

        if query_vector is not None:
            # Both index searches at once, on two readers and two server backends: each mostly
            # waits for the server. In-process searches are CPU in this process (measured on
            # SQLite at 100k for one user: 11 ms one after the other, 13.3 ms at once).
            vector_hits, searched = await asyncio.gather(
                self.executors.read(
                    lambda: self._vector_hits(query_vector, scope, top_k, cats, chosen)
                ),
                self.executors.read(text_search),
            )
            return await self.executors.read(
                lambda: ranked(query_vector, common, searched, vector_hits)
            )
        # BM25 needs no vector: at concurrency 1 the wait is the longer of the two, not both.
        # The query leaves for the model first: the model call runs without the GIL, beside
        # the search's Python. Handed over after the search, it waited for that Python to let
        # go of the GIL before it could start (fresh queries at c=1 through the proxy: 8.6 ->
        # 8.3 ms added, A/B over four rounds). One reader job searches, reads the BM25 hits'
        # rows (which the ranking weighs anyway: at c=1 that read is off the path to the
        # answer), and waits for the vector on its own thread, then ranks: no hop back to the
        # loop in between. It waits at most `_READER_WAIT_S`: a slow model (a remote one, a
        # queue under load) hands the wait back to the loop, so no reader is held for it,
        # neither other reads nor a shutdown wait behind the model.
        pending_vector = self.executors.query_vector_for_thread(drop_words(query, common))

        def search_then_rank() -> list[SearchResult] | _SearchedFirst:
            searched = text_search()
            prefetched = (self.parts.store.candidates([rid for rid, _ in searched[1]])
                          if searched[1] and not pending_vector.done() else None)
            try:
                vector = pending_vector.result(timeout=_READER_WAIT_S)
            except TimeoutError:
                return _SearchedFirst(searched, prefetched)
            return ranked(vector, common, searched, prefetched=prefetched)

        try:
            done = await self.executors.read(search_then_rank)
            if not isinstance(done, _SearchedFirst):
                return done
            vector = await asyncio.wrap_future(pending_vector)
        except asyncio.CancelledError:
            pending_vector.cancel()  # only if the model has not started on it
            task = asyncio.current_task()
            if pending_vector.cancelled() and task is not None and not task.cancelling():
                # The engine closed its model's queue under this recall: a failed recall (the
                # proxy then sends the request on without memories), not the request's own
                # cancellation, which would drop the client's answer.
                raise EmbedderError("the query embedding was cancelled: the engine is closing") \
                    from None
            raise
        return await self.executors.read(
            lambda: ranked(vector, common, done.searched, prefetched=done.prefetched)
        )

    async def explain_ranking(
        self, query: str, scope: Scope, top_k: int, *, now: datetime | None = None,
        preset: str | RecallPreset | None = None,
    ) -> list[dict[str, Any]]:
        """Every candidate `recall(top_k=top_k)` weighs, best first, with its score and, under
        the learned ranker, each of its features (`ranker.FEATURES`)."""
        chosen = get_preset(preset) if preset is not None else self.preset
        common, vector = await self._query_vector(query, scope.user_id, chosen)
        when = as_utc(now) if now else utcnow()
        ranked = await self.executors.read(
            lambda: self._ranked(query, scope, top_k, None, when, chosen, vector, common).top()
        )
        return [
            {"memory": m, "score": s.score, "similarity": s.similarity, "bm25": s.bm25,
             "features": dict(zip(ranker.FEATURES, map(float, s.features), strict=True))
             if s.features is not None else {}}
            for s, m in ranked
        ]

    async def _query_vector(
        self, query: str, user_id: str, preset: RecallPreset
    ) -> tuple[frozenset[str] | None, np.ndarray | None]:
        """The query's user-common words and its embedding without them; neither when the
        preset does not search vectors."""
        if preset.w_vector <= 0:
            return None, None
        common = await self.executors.read(lambda: self._common_terms(query, user_id, preset))
        return common, await self.executors.embed_query(drop_words(query, common))

    def _text_hits(
        self, query: str, scope: Scope, top_k: int, categories: list[MemoryCategory] | None,
        windows: list[TimeWindow], preset: RecallPreset, common: frozenset[str],
    ) -> list[tuple[int, float]]:
        """BM25 over what the scope sees, without the query's user-common words and the words
        that name its time `windows`."""
        if preset.w_text <= 0:
            return []
        return self.parts.text.search(
            clean_query(strip_spans(query, windows), preset, common), scope.user_id,
            scope_keys=scope.visible_keys(), categories=categories,
            k=max(preset.text_depth, top_k),
        )

    def _ranked(
        self, query: str, scope: Scope, top_k: int, categories: list[MemoryCategory] | None,
        now: datetime, preset: RecallPreset, vector: np.ndarray | None,
        common: frozenset[str] | None = None, *,
        searched: tuple[list[TimeWindow], list[tuple[int, float]]] | None = None,
        vector_hits: list[tuple[int, float]] | None = None,
        prefetched: CandidateRows | None = None,
    ) -> Ranking:
        """Every candidate, best first: index hits, date-window rows, conversation context.
        `searched`: the query's time windows and BM25 hits when already found (`_text_hits`);
        `vector_hits`: the vector index's, when already found (`_vector_hits`); `prefetched`:
        candidate rows already read (`MemoryStore.candidates`), the rest are read here."""
        p = self.parts
        if searched is None:
            windows = query_windows(query, now) if preset.reads_dates else []
        else:
            windows, text_hits = searched
        if common is None:
            common = self._common_terms(query, scope.user_id, preset)
        if vector_hits is None:
            vector_hits = self._vector_hits(vector, scope, top_k, categories, preset)
        if vector_hits and windows and preset.time_candidates > 0:
            vector_hits = self._window_hits(vector_hits, vector, scope, categories, windows, preset)
        if searched is None:
            text_hits = self._text_hits(query, scope, top_k, categories, windows, preset, common)
        fused = fuse(vector_hits, text_hits, preset)
        # One read of what ranking weighs of every candidate; whole memories only for the
        # ones returned (`Ranking.top`).
        wanted = [*fused, *context_rowids(fused, preset)]
        if prefetched is None:
            rows = p.store.candidates(wanted)
        else:
            rows = prefetched.joined(
                p.store.candidates([rid for rid in wanted if rid not in prefetched]), wanted
            )
        with_context = add_context(fused, rows, scope, categories, preset)
        if preset.ranker == "learned" and vector is not None:
            # add_context decides which neighbours join (visible, same sitting); the ranker
            # then scores every candidate from its features, not from the context gains.
            pool = [rid for rid in with_context if rid in rows]
            cosines = _cosines(pool, vector_hits, vector, rows)
            found = ranker.Candidates(vector_hits, text_hits, fused, rows, cosines, windows, common)
            ranked = ranker.rank_scored([rid for rid in pool if rid in cosines], found, preset, now)
            if preset.diversity > 0 and len(ranked) > 1:
                head = [s.rowid for s in ranked[: preset.diversity_depth]]
                vectors = {r: v for r in head if (v := rows.embedding(r)) is not None}
                ranked = ranker.diversify_scored(ranked, vectors, preset)
            return Ranking(ranked, rows)
        return Ranking(rescore_scored(with_context, rows, now, preset, windows), rows)

    def _vector_hits(
        self, vector: np.ndarray | None, scope: Scope, top_k: int,
        categories: list[MemoryCategory] | None, preset: RecallPreset,
    ) -> list[tuple[int, float]]:
        if vector is None or preset.w_vector <= 0:
            return []
        return self.parts.vectors.search(
            vector, scope.user_id, scope_keys=scope.visible_keys(), categories=categories,
            k=max(preset.vector_depth, top_k),
        )

    def _window_hits(
        self, hits: list[tuple[int, float]], vector: Any, scope: Scope,
        categories: list[MemoryCategory] | None, windows: list[TimeWindow], preset: RecallPreset,
    ) -> list[tuple[int, float]]:
        """Add every memory written in the query's time windows to the vector hits, by exact
        cosine, when a window holds at most `preset.time_candidates` of them."""
        store = self.parts.store
        slack = timedelta(days=preset.time_slack_days)
        extra: list[tuple[int, np.ndarray]] = []
        for w in windows:
            flt = MemoryFilter(
                user_id=scope.user_id, session_id=scope.session_id, agent_id=scope.agent_id,
                turn_id=scope.turn_id, categories=categories, created_after=w.start,
                created_before=w.end + slack, limit=None,
            )
            if store.count(flt, cap=preset.time_candidates + 1) <= preset.time_candidates:
                extra += store.embeddings_as_of(flt)
        if not extra:
            return hits
        known = {rid for rid, _ in hits}
        query = np.asarray(vector, dtype=np.float32)
        merged = hits + [(rid, float(v @ query)) for rid, v in extra if rid not in known]
        return sorted({rid: sim for rid, sim in merged}.items(), key=lambda h: -h[1])

    # --- common words --------------------------------------------------------------------------

    def _recent_common_terms(
        self, query: str, user_id: str, preset: RecallPreset
    ) -> frozenset[str] | None:
        """`_common_terms` when it needs no read (the user's words were counted recently): a
        dict lookup, fit for the event loop. None when a read is due."""
        terms = query_terms(query, preset) if preset.common_share > 0 else []
        if not terms:
            return frozenset()
        words = self.common_words.recent(user_id, preset.common_share)
        if words is None:
            return None
        return frozenset(t for t in terms if t in words)

    def _common_terms(self, query: str, user_id: str, preset: RecallPreset) -> frozenset[str]:
        """The query's words that are common in this user's memories (see `common_words`)."""
        terms = query_terms(query, preset) if preset.common_share > 0 else []
        if not terms:
            return frozenset()
        words = self._user_common_words(user_id, preset)  # a recent count when there is one
        return frozenset(t for t in terms if t in words)

    def _user_common_words(
        self, user_id: str, preset: RecallPreset, *, recount: bool = False
    ) -> frozenset[str]:
        """`recount`: check the count even if it was checked recently (after a write)."""
        p = self.parts
        if not recount:
            words = self.common_words.recent(user_id, preset.common_share)
            if words is not None:
                return words
        total = p.text.count(user_id)
        if total < max(preset.common_min_memories, 1):
            # Also replaces an entry from when they had more. Most users start here: their next
            # recalls look this up on the loop instead of counting on a reader.
            self.common_words.too_few(user_id, preset.common_share)
            return frozenset()
        return self.common_words.get(
            user_id, total, preset.common_share, lambda n: p.store.recent_contents(user_id, n)
        )

    def refresh_common_words(self, user_ids: Iterable[str]) -> None:
        """Bring the common-words entries of users just written to up to date, on the writer
        thread after the write, so the next recall finds them counted (when closing, the next
        process counts them when asked)."""
        users = sorted(set(user_ids))
        # At once, before the caller's next recall can run: whatever share it asks with.
        self.common_words.expire(users)
        if self.preset.common_share > 0:
            self.executors.write_later(self._refresh_common_words, users)

    def _refresh_common_words(self, user_ids: list[str]) -> None:
        for user_id in user_ids:
            if not self.common_words.worth_counting(user_id, self.preset.common_share):
                continue  # counted when a recall asks, like a user evicted from the cache
            try:
                self._user_common_words(user_id, self.preset, recount=True)
            except Exception:
                log.debug("could not count the common words of a user", exc_info=True)

    # --- plain searches ------------------------------------------------------------------------

    async def search(
        self, query: str, flt: MemoryFilter, top_k: int, min_similarity: float
    ) -> list[SearchResult]:
        """Semantic search over what `flt`'s scope may see (history when `flt` asks for it)."""
        p = self.parts
        vector = await self.executors.embed_query(query)

        def run() -> list[SearchResult]:
            if flt.include_superseded or flt.as_of is not None:
                hits = exact_knn(vector, p.store.embeddings_as_of(flt), top_k)
            else:
                hits = p.vectors.search(
                    vector, flt.scope.user_id, scope_keys=flt.scope.visible_keys(),
                    categories=flt.categories, k=top_k,
                )
            hits = [(rid, sim) for rid, sim in hits if sim >= min_similarity]
            rows = p.store.get_by_rowids([rid for rid, _ in hits])
            return [SearchResult(rows[rid], sim, sim) for rid, sim in hits if rid in rows]

        return await self.executors.read(run)

    async def text_search(
        self, query: str, scope: Scope, top_k: int,
        categories: Sequence[MemoryCategory | str] | None,
    ) -> list[SearchResult]:
        """Full-text (BM25) search over current memories this scope may see."""
        p = self.parts
        cats = _categories(categories)

        def run() -> list[SearchResult]:
            hits = p.text.search(
                clean_query(query, self.preset), scope.user_id, scope_keys=scope.visible_keys(),
                categories=cats, k=top_k,
            )
            rows = p.store.get_by_rowids([rid for rid, _ in hits])
            return [
                SearchResult(rows[rid], 0.0, score, bm25=score)
                for rid, score in hits
                if rid in rows
            ]

        return await self.executors.read(run)

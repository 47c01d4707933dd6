"""`HierarchicalMemory`, the facade the spec names.

Each public method validates, embeds on the embedding thread, then runs one whole operation on
the single writer thread (store + vector index + text index in one transaction) or on a reader
thread. Nothing here blocks the event loop. This module is long because it is the whole public
API; the rules live in `temporal`, `recall` and the adapters, and each method stays short.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from . import ranker, temporal
from .common_words import CommonWords
from .embedders.cached import CachedEmbedder
from .errors import (
    ConfigError,
    MemoryNotFoundError,
    ValidationError,
)
from .models import (
    Memory,
    MemoryCategory,
    MemoryConfig,
    MemoryFilter,
    MemoryOps,
    Scope,
    SearchResult,
    as_utc,
    utcnow,
)
from .ports import Embedder, MemoryCache, MemoryStore, TextIndex, VectorIndex
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
    rescore,
    strip_spans,
)

log = logging.getLogger("headroom.memory")

__all__ = ["HierarchicalMemory", "MemoryDraft"]

T = TypeVar("T")


@dataclass
class MemoryDraft:
    """One memory to add in a batch (`add_many`)."""

    content: str
    user_id: str
    session_id: str | None = None
    agent_id: str | None = None
    turn_id: str | None = None
    category: MemoryCategory | str = MemoryCategory.FACT
    importance: float = 0.5
    entity_refs: list[str] | None = None
    metadata: dict[str, Any] | None = None
    created_at: datetime | None = None
    valid_from: datetime | None = None
    dedup: bool = True

    def build(self, model_id: str) -> Memory:
        content = (self.content or "").strip()
        if not content:
            raise ValidationError("memory content must not be empty")
        importance = float(self.importance)
        if not 0.0 <= importance <= 1.0 or importance != importance:
            raise ValidationError(f"importance must be between 0 and 1, got {self.importance!r}")
        scope = Scope(self.user_id, self.session_id, self.agent_id, self.turn_id)
        now = utcnow()
        created = as_utc(self.created_at) if self.created_at else now
        return Memory(
            content=content,
            user_id=scope.user_id,
            session_id=scope.session_id,
            agent_id=scope.agent_id,
            turn_id=scope.turn_id,
            category=MemoryCategory.parse(self.category),
            importance=importance,
            entity_refs=list(self.entity_refs or []),
            metadata=dict(self.metadata or {}),
            created_at=created,
            valid_from=as_utc(self.valid_from) if self.valid_from else created,
            embedding_model=model_id,
        )


class HierarchicalMemory:
    def __init__(
        self,
        store: MemoryStore,
        vector_index: VectorIndex,
        text_index: TextIndex,
        embedder: Embedder,
        cache: MemoryCache | None = None,
        *,
        config: MemoryConfig | None = None,
        writer: ThreadPoolExecutor | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.config = config or MemoryConfig(db_path=":memory:")
        self.store = store
        self.vectors = vector_index
        self.text = text_index
        self.embedder = embedder
        # Only queries go through the cache: memory contents would push repeat queries out.
        self._query_embedder = CachedEmbedder(embedder, self.config.query_embedding_cache_size)
        self.cache = cache
        self.preset: RecallPreset = get_preset(self.config.recall_preset)
        self._common_words = CommonWords()
        # One writer thread: SQLite allows one writer, and ordering writes avoids lock waits.
        self._writer = writer or ThreadPoolExecutor(1, thread_name_prefix="headroom-writer")
        self._readers = ThreadPoolExecutor(
            self.config.reader_threads, thread_name_prefix="headroom-reader"
        )
        # Model calls are serialised: the local model is pinned to few threads on purpose.
        self._embedding = ThreadPoolExecutor(1, thread_name_prefix="headroom-embed")
        self._on_close = on_close
        self._closed = False
        self._worker: Any = None  # memory.writer.OutboxWorker, attached by start()

    # --- construction -------------------------------------------------------------------------

    @classmethod
    async def create(
        cls, config: MemoryConfig | None = None, *, embedder: Embedder | None = None,
        **options: Any,
    ) -> HierarchicalMemory:
        """Wire the defaults: SQLite store, sqlite-vec vectors, FTS5, the configured embedder.
        Pass `embedder` to share one loaded model between instances (the caller then owns it)."""
        if config is None:
            config = MemoryConfig(**options)
        elif options:
            config = config.with_changes(**options)
        get_preset(config.recall_preset)  # an unknown preset fails before the file is opened
        writer = ThreadPoolExecutor(1, thread_name_prefix="headroom-writer")
        loop = asyncio.get_running_loop()
        try:
            parts = await loop.run_in_executor(writer, _build_defaults, config, embedder)
        except BaseException:
            writer.shutdown(wait=False)
            raise
        db, store, vectors, text, wired, cache = parts
        owned = embedder is None

        def on_close() -> None:
            db.close()
            closer = getattr(wired, "close", None)
            if owned and callable(closer):
                closer()

        return cls(
            store, vectors, text, wired, cache, config=config, writer=writer, on_close=on_close
        )

    # --- thread helpers -----------------------------------------------------------------------

    async def _write(self, fn: Callable[[], T]) -> T:
        def in_transaction() -> T:
            with self.store.transaction():
                return fn()

        return await asyncio.get_running_loop().run_in_executor(self._writer, in_transaction)

    async def _read(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn)

    async def _embed(self, texts: Sequence[str]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(
            self._embedding, self.embedder.embed, list(texts)
        )

    async def embed_query(self, text: str) -> np.ndarray:
        """One query's vector, from the LRU of recent queries when it repeats."""
        vectors = await asyncio.get_running_loop().run_in_executor(
            self._embedding, self._query_embedder.embed, [text]
        )
        return vectors[0]

    async def warm_up(self) -> None:
        """Load the embedding model now (the server does this in the background at start)."""
        await self._embed(["warm up"])

    # --- adding -------------------------------------------------------------------------------

    async def add(
        self,
        content: str,
        user_id: str,
        session_id: str | None = None,
        agent_id: str | None = None,
        turn_id: str | None = None,
        category: MemoryCategory | str = MemoryCategory.FACT,
        importance: float = 0.5,
        entity_refs: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        created_at: datetime | None = None,
        valid_from: datetime | None = None,
        dedup: bool = True,
    ) -> Memory:
        """Add a memory. The same fact again (exact, or near-identical by embedding) reinforces
        the existing memory instead of creating a second row, and returns it."""
        draft = MemoryDraft(
            content, user_id, session_id, agent_id, turn_id, category, importance,
            entity_refs, metadata, created_at, valid_from, dedup,
        )
        return (await self.add_many([draft]))[0]

    async def add_many(
        self, drafts: Sequence[MemoryDraft], *, request_id: str | None = None
    ) -> list[Memory]:
        """Add a batch: one embedding call and one transaction for all of them."""
        memories = [d.build(self.embedder.model_id) for d in drafts]
        if not memories:
            return []
        vectors = await self._embed([m.content for m in memories])
        added = await self._write(
            lambda: [
                self._insert_or_reinforce(m, v, dedup=d.dedup, request_id=request_id)
                for m, v, d in zip(memories, vectors, drafts, strict=True)
            ]
        )
        self._refresh_common_words(m.user_id for m in added)
        return added

    async def remember(
        self, content: str, user_id: str, importance: float = 0.5, **kwargs: Any
    ) -> Memory:
        """`add` with the defaults a quick note wants."""
        return await self.add(content, user_id, importance=importance, **kwargs)

    def _insert_or_reinforce(
        self, memory: Memory, vector: np.ndarray, *, dedup: bool, request_id: str | None
    ) -> Memory:
        if dedup:
            existing = self.store.find_current_by_content(memory.user_id, memory.content)
            if existing is None:
                hits = self.vectors.search(
                    vector, memory.user_id, scope_keys=None, categories=None, k=1
                )
                if hits and hits[0][1] >= self.config.dedup_threshold:
                    existing = self.store.get_by_rowids([hits[0][0]]).get(hits[0][0])
            if existing is not None:
                return self._reinforce(existing, memory, request_id)
        if temporal.should_bubble(memory, self.config.bubble_importance_threshold):
            origin = memory.scope
            memory = temporal.promote(memory, Scope(memory.user_id))
            self._index_new(memory, vector, request_id)
            self.store.record_event(
                memory.id, memory.user_id, "promote", old=_scope_dict(origin),
                new=_scope_dict(memory.scope), request_id=request_id,
            )
            return memory
        self._index_new(memory, vector, request_id)
        return memory

    def _index_new(self, memory: Memory, vector: np.ndarray, request_id: str | None) -> int:
        memory.embedding = vector.tolist()
        rid = self.store.insert(memory)
        memory.embedding = None
        if memory.is_current:
            self.vectors.add(rid, memory.user_id, memory.scope.key, memory.category, vector)
            self.text.add(rid, memory.user_id, memory.scope.key, memory.category, memory.content)
        self.store.record_event(
            memory.id, memory.user_id, "add", new={"content": memory.content},
            request_id=request_id, at=memory.created_at,
        )
        return rid

    def _reinforce(self, existing: Memory, incoming: Memory, request_id: str | None) -> Memory:
        now = utcnow()
        old_scope = existing.scope
        target = temporal.common_scope(old_scope, incoming.scope)
        existing.importance = max(existing.importance, incoming.importance)
        if temporal.should_bubble(existing, self.config.bubble_importance_threshold):
            target = Scope(existing.user_id)  # reinforced up to the bubbling threshold
        existing.access_count += 1
        existing.last_accessed = now
        if target != old_scope:
            existing = temporal.promote(existing, target)
            self._reindex(existing)
            self.store.record_event(
                existing.id, existing.user_id, "promote", old=_scope_dict(old_scope),
                new=_scope_dict(target), request_id=request_id,
            )
        self.store.save(existing)
        self.store.record_event(
            existing.id, existing.user_id, "reinforce",
            new={"content": incoming.content, "importance": existing.importance},
            request_id=request_id,
        )
        self._invalidate(existing.id)
        return existing

    def _reindex(self, memory: Memory) -> None:
        """Re-add a current memory's index entries after its scope or category changed."""
        rid = self.store.rowid_of(memory.id)
        vector = self.store.get_embedding(memory.id)
        assert rid is not None and vector is not None
        self.vectors.remove([rid])
        self.text.remove([rid])
        self.vectors.add(rid, memory.user_id, memory.scope.key, memory.category, vector)
        self.text.add(rid, memory.user_id, memory.scope.key, memory.category, memory.content)

    # --- reading one ----------------------------------------------------------------------------

    async def get(self, memory_id: str, user_id: str | None = None) -> Memory:
        """The memory with this id (current or not). With `user_id`, another user's is not found."""
        memory = self.cache.get(memory_id) if self.cache is not None else None
        if memory is None:
            memory = await self._read(lambda: self.store.get(memory_id))
            if memory is None:
                raise MemoryNotFoundError(memory_id)
            if self.cache is not None and memory.is_current:
                self.cache.put(memory)
        if user_id is not None and memory.user_id != user_id:
            raise MemoryNotFoundError(memory_id)
        return memory

    async def get_history(self, memory_id: str, user_id: str | None = None) -> list[Memory]:
        """The whole supersession chain through this memory, oldest first."""
        await self.get(memory_id, user_id)
        return await self._read(lambda: self.store.chain(memory_id))

    async def get_events(self, memory_id: str, user_id: str | None = None) -> list[dict[str, Any]]:
        """The audit trail of one memory: add, reinforce, promote, supersede, forget, update."""
        await self.get(memory_id, user_id)
        return await self._read(lambda: self.store.events(memory_id))

    # --- changing -------------------------------------------------------------------------------

    async def update(
        self,
        memory_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        importance: float | None = None,
        entity_refs: list[str] | None = None,
        user_id: str | None = None,
        request_id: str | None = None,
    ) -> Memory:
        """Change a memory's annotations in place (metadata is merged). Content never changes in
        place: a changed fact is a `supersede`."""
        if importance is not None and not 0.0 <= importance <= 1.0:
            raise ValidationError(f"importance must be between 0 and 1, got {importance!r}")

        def run() -> Memory:
            memory = self._load(memory_id, user_id)
            old = {"metadata": memory.metadata, "importance": memory.importance,
                   "entity_refs": memory.entity_refs}
            if metadata:
                memory.metadata = {**memory.metadata, **metadata}
            if importance is not None:
                memory.importance = float(importance)
            if entity_refs is not None:
                memory.entity_refs = list(entity_refs)
            self.store.save(memory)
            self.store.record_event(
                memory.id, memory.user_id, "update", old=old,
                new={"metadata": memory.metadata, "importance": memory.importance,
                     "entity_refs": memory.entity_refs},
                request_id=request_id,
            )
            self._invalidate(memory.id)
            return memory

        return await self._write(run)

    async def supersede(
        self,
        old_memory_id: str,
        new_content: str,
        *,
        category: MemoryCategory | str | None = None,
        importance: float | None = None,
        metadata: dict[str, Any] | None = None,
        entity_refs: list[str] | None = None,
        user_id: str | None = None,
        at: datetime | None = None,
        request_id: str | None = None,
    ) -> Memory:
        """Close `old_memory_id` (valid_until, superseded_by) and add its successor, atomically."""
        content = (new_content or "").strip()
        if not content:
            raise ValidationError("memory content must not be empty")
        if importance is not None and not 0.0 <= importance <= 1.0:
            raise ValidationError(f"importance must be between 0 and 1, got {importance!r}")
        cat = MemoryCategory.parse(category) if category is not None else None
        vector = (await self._embed([content]))[0]
        when = as_utc(at) if at else utcnow()
        return await self._write(
            lambda: self._supersede_sync(
                old_memory_id, content, vector, when, cat, importance, metadata, entity_refs,
                user_id, request_id,
            )
        )

    def _supersede_sync(
        self, old_id: str, content: str, vector: np.ndarray, at: datetime,
        category: MemoryCategory | None, importance: float | None, metadata: dict | None,
        entity_refs: list[str] | None, user_id: str | None, request_id: str | None,
    ) -> Memory:
        if not content.strip():  # supersede() checks too; the outbox worker comes here directly
            raise ValidationError("memory content must not be empty")
        if importance is not None and not 0.0 <= importance <= 1.0:
            raise ValidationError(f"importance must be between 0 and 1, got {importance!r}")
        old = self._load(old_id, user_id)
        closed, new = temporal.supersede(
            old, content, at, category=category, importance=importance, metadata=metadata,
            entity_refs=entity_refs, embedding_model=self.embedder.model_id,
        )
        old_rid = self.store.rowid_of(closed.id)
        assert old_rid is not None
        self.store.save(closed)
        self.vectors.remove([old_rid])
        self.text.remove([old_rid])
        self._index_new(new, vector, request_id)
        self.store.record_event(
            closed.id, closed.user_id, "supersede", old={"content": closed.content},
            new={"id": new.id, "content": new.content}, request_id=request_id, at=at,
        )
        self._invalidate(closed.id)
        return new

    async def forget(
        self, memory_id: str, *, user_id: str | None = None, reason: str | None = None,
        request_id: str | None = None,
    ) -> Memory:
        """Soft delete: the memory leaves every current read path; its row and history stay."""

        return await self._write(
            lambda: self._forget_sync(memory_id, user_id, reason, request_id)
        )

    def _forget_sync(
        self, memory_id: str, user_id: str | None, reason: str | None, request_id: str | None
    ) -> Memory:
        memory = temporal.forget(self._load(memory_id, user_id), utcnow())
        rid = self.store.rowid_of(memory.id)
        assert rid is not None
        self.store.save(memory)
        self.vectors.remove([rid])
        self.text.remove([rid])
        self.store.record_event(
            memory.id, memory.user_id, "forget", old={"content": memory.content},
            new={"reason": reason}, request_id=request_id,
        )
        self._invalidate(memory.id)
        return memory

    def _load(self, memory_id: str, user_id: str | None) -> Memory:
        memory = self.store.get(memory_id)
        if memory is None or (user_id is not None and memory.user_id != user_id):
            raise MemoryNotFoundError(memory_id)
        return memory

    def _invalidate(self, memory_id: str) -> None:
        if self.cache is not None:
            self.cache.invalidate(memory_id)

    # --- queries and search ---------------------------------------------------------------------

    async def query(self, flt: MemoryFilter) -> list[Memory]:
        return await self._read(lambda: self.store.query(flt))

    async def count(self, flt: MemoryFilter) -> int:
        return await self._read(lambda: self.store.count(flt))

    async def search(
        self,
        query: str,
        user_id: str,
        session_id: str | None = None,
        agent_id: str | None = None,
        turn_id: str | None = None,
        top_k: int = 10,
        min_similarity: float = 0.0,
        categories: Sequence[MemoryCategory | str] | None = None,
        *,
        include_superseded: bool = False,
        as_of: datetime | None = None,
    ) -> list[SearchResult]:
        """Semantic search over what this scope may see (current memories unless asked)."""
        flt = MemoryFilter(
            user_id=user_id, session_id=session_id, agent_id=agent_id, turn_id=turn_id,
            categories=list(categories) if categories else None,
            include_superseded=include_superseded, as_of=as_of, limit=None,
        )
        vector = await self.embed_query(query)

        def run() -> list[SearchResult]:
            if include_superseded or as_of is not None:
                hits = _exact_knn(vector, self.store.embeddings_as_of(flt), top_k)
            else:
                hits = self.vectors.search(
                    vector, user_id, scope_keys=flt.scope.visible_keys(),
                    categories=flt.categories, k=top_k,
                )
            hits = [(rid, sim) for rid, sim in hits if sim >= min_similarity]
            rows = self.store.get_by_rowids([rid for rid, _ in hits])
            return [SearchResult(rows[rid], sim, sim) for rid, sim in hits if rid in rows]

        return await self._read(run)

    async def text_search(
        self,
        query: str,
        user_id: str,
        session_id: str | None = None,
        agent_id: str | None = None,
        turn_id: str | None = None,
        top_k: int = 10,
        categories: Sequence[MemoryCategory | str] | None = None,
    ) -> list[SearchResult]:
        """Full-text (BM25) search over current memories this scope may see."""
        scope = Scope(user_id, session_id, agent_id, turn_id)
        cats = [MemoryCategory.parse(c) for c in categories] if categories else None

        def run() -> list[SearchResult]:
            hits = self.text.search(
                clean_query(query, self.preset), user_id, scope_keys=scope.visible_keys(),
                categories=cats, k=top_k,
            )
            rows = self.store.get_by_rowids([rid for rid, _ in hits])
            return [
                SearchResult(rows[rid], 0.0, score, bm25=score)
                for rid, score in hits
                if rid in rows
            ]

        return await self._read(run)

    async def hybrid_search(
        self,
        query: str,
        user_id: str,
        session_id: str | None = None,
        agent_id: str | None = None,
        turn_id: str | None = None,
        top_k: int = 10,
        categories: Sequence[MemoryCategory | str] | None = None,
        *,
        now: datetime | None = None,
        preset: str | RecallPreset | None = None,
        query_vector: np.ndarray | None = None,
    ) -> list[SearchResult]:
        """Vector KNN and BM25, both pre-filtered to this scope, fused, then importance and
        recency. This is the recall path the proxy uses. Without `query_vector`, the query is
        embedded without the words that are common in this user's memories."""
        chosen = get_preset(preset) if preset is not None else self.preset
        common: frozenset[str] | None = None
        if query_vector is None:
            common, query_vector = await self._query_vector(query, user_id, chosen)
        return await self._read(
            lambda: self._hybrid_sync(
                query, Scope(user_id, session_id, agent_id, turn_id), top_k,
                [MemoryCategory.parse(c) for c in categories] if categories else None,
                as_utc(now) if now else utcnow(), chosen, query_vector, common,
            )
        )

    async def _query_vector(
        self, query: str, user_id: str, preset: RecallPreset
    ) -> tuple[frozenset[str] | None, np.ndarray | None]:
        """The query's user-common words and its embedding without them; neither when the
        preset does not search vectors."""
        if preset.w_vector <= 0:
            return None, None
        common = await self._read(lambda: self._common_terms(query, user_id, preset))
        return common, await self.embed_query(drop_words(query, common))

    def _common_terms(self, query: str, user_id: str, preset: RecallPreset) -> frozenset[str]:
        """The query's words that are common in this user's memories (see `common_words`)."""
        terms = query_terms(query, preset) if preset.common_share > 0 else []
        if not terms:
            return frozenset()
        words = self._user_common_words(user_id, preset)
        return frozenset(t for t in terms if t in words)

    def _user_common_words(self, user_id: str, preset: RecallPreset) -> frozenset[str]:
        total = self.text.count(user_id)
        if total < max(preset.common_min_memories, 1):
            return frozenset()
        return self._common_words.get(
            user_id, total, preset.common_share, lambda n: self.store.recent_contents(user_id, n)
        )

    def _refresh_common_words(self, user_ids: Iterable[str]) -> None:
        """Bring the common-words entries of users just written to up to date, on the writer
        thread after the write, so the next recall finds them counted."""
        if self.preset.common_share <= 0:
            return
        try:
            self._writer.submit(self._refresh_common_words_sync, sorted(set(user_ids)))
        except RuntimeError:  # closing: the next process counts them when asked
            pass

    def _refresh_common_words_sync(self, user_ids: list[str]) -> None:
        for user_id in user_ids:
            try:
                self._user_common_words(user_id, self.preset)
            except Exception:
                log.debug("could not count the common words of a user", exc_info=True)

    async def explain_ranking(
        self,
        query: str,
        user_id: str,
        session_id: str | None = None,
        agent_id: str | None = None,
        turn_id: str | None = None,
        top_k: int = 10,
        *,
        now: datetime | None = None,
        preset: str | RecallPreset | None = None,
    ) -> list[dict[str, Any]]:
        """Why recall ranks as it does: every candidate `recall(top_k=top_k)` weighs, best
        first (the first `top_k` are what it returns), with its score and, under the learned
        ranker, the value of each of its features (`memory.ranker.FEATURES`)."""
        chosen = get_preset(preset) if preset is not None else self.preset
        common, vector = await self._query_vector(query, user_id, chosen)
        ranked = await self._read(
            lambda: self._ranked_sync(
                query, Scope(user_id, session_id, agent_id, turn_id), top_k, None,
                as_utc(now) if now else utcnow(), chosen, vector, common,
            )
        )
        return [
            {"memory": m, "score": s.score, "similarity": s.similarity, "bm25": s.bm25,
             "features": dict(zip(ranker.FEATURES, map(float, s.features), strict=True))
             if s.features is not None else {}}
            for s, m in ranked
        ]

    def _hybrid_sync(
        self, query: str, scope: Scope, top_k: int, categories: list[MemoryCategory] | None,
        now: datetime, preset: RecallPreset, vector: np.ndarray | None,
        common: frozenset[str] | None = None,
    ) -> list[SearchResult]:
        ranked = self._ranked_sync(query, scope, top_k, categories, now, preset, vector, common)
        return [SearchResult(m, s.similarity, s.score, s.bm25) for s, m in ranked[:top_k]]

    def _ranked_sync(
        self, query: str, scope: Scope, top_k: int, categories: list[MemoryCategory] | None,
        now: datetime, preset: RecallPreset, vector: np.ndarray | None,
        common: frozenset[str] | None = None,
    ) -> list[tuple[Scored, Memory]]:
        """Every candidate, best first: index hits, date-window rows, conversation context."""
        keys = scope.visible_keys()
        windows = query_windows(query, now) if preset.reads_dates else []
        if common is None:
            common = self._common_terms(query, scope.user_id, preset)
        vector_hits = (
            self.vectors.search(
                vector, scope.user_id, scope_keys=keys, categories=categories,
                k=max(preset.vector_depth, top_k),
            )
            if vector is not None and preset.w_vector > 0
            else []
        )
        if vector_hits and windows and preset.time_candidates > 0:
            vector_hits = self._window_hits(vector_hits, vector, scope, categories, windows, preset)
        text_hits = (
            self.text.search(
                clean_query(strip_spans(query, windows), preset, common), scope.user_id,
                scope_keys=keys, categories=categories, k=max(preset.text_depth, top_k),
            )
            if preset.w_text > 0
            else []
        )
        fused = fuse(vector_hits, text_hits, preset)
        rows = self.store.get_by_rowids([*fused, *context_rowids(fused, preset)])
        with_context = add_context(fused, rows, scope, categories, preset)
        if preset.ranker == "learned" and vector is not None:
            # add_context decides which neighbours join (visible, same sitting); the ranker
            # then scores every candidate from its features, not from the context gains.
            pool = [rid for rid in with_context if rid in rows]
            cosines = self._cosines(pool, vector_hits, vector)
            found = ranker.Candidates(vector_hits, text_hits, fused, rows, cosines, windows, common)
            return ranker.rank([rid for rid in pool if rid in cosines], found, preset, now)
        return rescore(with_context, rows, now, preset, windows)

    def _cosines(
        self, rowids: list[int], vector_hits: list[tuple[int, float]], vector: np.ndarray
    ) -> dict[int, float]:
        """The query's cosine with each of `rowids`: from the vector hits, else exact from the
        stored embeddings (rows without one are left out)."""
        cosines = dict(vector_hits)
        missing = [rid for rid in rowids if rid not in cosines]
        if missing:
            query = np.asarray(vector, dtype=np.float32)
            for rid, emb in self.store.embeddings_by_rowids(missing).items():
                cosines[rid] = float(emb @ query)
        return cosines

    def _window_hits(
        self, hits: list[tuple[int, float]], vector: Any, scope: Scope,
        categories: list[MemoryCategory] | None, windows: list[TimeWindow], preset: RecallPreset,
    ) -> list[tuple[int, float]]:
        """Add every memory written in the query's time windows to the vector hits, by exact
        cosine, when a window holds at most `preset.time_candidates` of them."""
        slack = timedelta(days=preset.time_slack_days)
        extra: list[tuple[int, np.ndarray]] = []
        for w in windows:
            flt = MemoryFilter(
                user_id=scope.user_id, session_id=scope.session_id, agent_id=scope.agent_id,
                turn_id=scope.turn_id, categories=categories, created_after=w.start,
                created_before=w.end + slack, limit=None,
            )
            if self.store.count(flt) <= preset.time_candidates:
                extra += self.store.embeddings_as_of(flt)
        if not extra:
            return hits
        known = {rid for rid, _ in hits}
        query = np.asarray(vector, dtype=np.float32)
        merged = hits + [(rid, float(v @ query)) for rid, v in extra if rid not in known]
        return sorted({rid: sim for rid, sim in merged}.items(), key=lambda h: -h[1])

    async def recall(
        self,
        query: str,
        user_id: str,
        session_id: str | None = None,
        agent_id: str | None = None,
        turn_id: str | None = None,
        top_k: int = 5,
        *,
        token_budget: int | None = None,
        categories: Sequence[MemoryCategory | str] | None = None,
        now: datetime | None = None,
        touch: bool = True,
    ) -> list[Memory]:
        """The memories most worth showing for `query`, best first, within `token_budget`."""
        results = await self.hybrid_search(
            query, user_id, session_id, agent_id, turn_id, top_k, categories, now=now
        )
        memories = apply_budget([r.memory for r in results], token_budget)
        if touch and memories:
            ids = [m.id for m in memories]
            when = utcnow()
            # Access counts are bookkeeping: never make the caller wait for the write.
            self._writer.submit(self._touch_sync, ids, when)
        return memories

    def _touch_sync(self, ids: list[str], when: datetime) -> None:
        try:
            with self.store.transaction():
                self.store.touch(ids, when)
        except Exception:
            log.warning("could not record access to %d memories", len(ids), exc_info=True)
        for memory_id in ids:  # cached copies carry the old access count
            self._invalidate(memory_id)

    # --- removal, stats -------------------------------------------------------------------------

    async def purge(
        self,
        user_id: str,
        session_id: str | None = None,
        agent_id: str | None = None,
        turn_id: str | None = None,
    ) -> dict[str, int]:
        """Hard delete for privacy requests: every row, vector, FTS entry, cached copy, audit event
        and pending outbox entry of this user (or of one of their sessions / agents / turns)."""
        flt = MemoryFilter(
            user_id=user_id, session_id=session_id, agent_id=agent_id, turn_id=turn_id,
            all_scopes=True,
        )

        def run() -> dict[str, int]:
            vectors_before = self.vectors.count(user_id)
            text_before = self.text.count(user_id)
            rids, counts = self.store.purge(flt)
            self.vectors.remove(rids)
            self.text.remove(rids)
            counts["vectors"] = vectors_before - self.vectors.count(user_id)
            counts["fts"] = text_before - self.text.count(user_id)
            return counts

        counts = await self._write(run)
        await asyncio.get_running_loop().run_in_executor(self._writer, self.store.checkpoint)
        self._common_words.forget(user_id)  # they are words of the purged memories
        if self.cache is not None:
            counts["cache"] = len(self.cache)
            self.cache.clear()
            counts["cache"] -= len(self.cache)
        return counts

    async def clear(self, user_id: str | None = None) -> dict[str, int]:
        """Purge one user, or with no user every user in the database."""
        if user_id is not None:
            return await self.purge(user_id)
        users = await self._read(lambda: list(self.store.stats()["users"]))
        total: dict[str, int] = {}
        for uid in users:
            for key, value in (await self.purge(uid)).items():
                total[key] = total.get(key, 0) + value
        return total

    async def stats(self, user_id: str | None = None) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            out = self.store.stats(user_id)
            out["vectors"] = self.vectors.count(user_id)
            out["fts_rows"] = self.text.count(user_id)
            return out

        out = await self._read(run)
        out["cache_size"] = len(self.cache) if self.cache is not None else 0
        out["embedding_model"] = self.embedder.model_id
        path = str(self.config.db_path)
        out["db_path"] = path
        out["db_bytes"] = sum(
            os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p)
        )
        return out

    async def optimize(self) -> None:
        """Maintenance after bulk writes: merge the full-text index's segments (the server runs
        it in the background at start; import runs it when done)."""
        started = time.perf_counter()
        await self._write(self.text.optimize)
        log.info("full-text index optimized in %.1fs", time.perf_counter() - started)

    # --- export / import ------------------------------------------------------------------------

    async def export_jsonl(self, dest: str | Path | IO[str], user_id: str | None = None) -> int:
        from .transfer import export_jsonl

        return await self._read(lambda: export_jsonl(self, dest, user_id))

    async def import_jsonl(
        self, source: str | Path | IO[str],
        on_progress: Callable[[int], None] | None = None,
    ) -> dict[str, int]:
        from .transfer import import_jsonl

        return await import_jsonl(self, source, on_progress)

    # --- write-behind (the proxy's path) --------------------------------------------------------

    async def start(self) -> None:
        """Start the outbox worker; it first replays whatever a previous process left."""
        from .writer import OutboxWorker

        if self._worker is None:
            self._worker = OutboxWorker(self)
            await self._worker.start()

    async def submit(
        self, ops: MemoryOps, scope: Scope, *, request_id: str | None = None
    ) -> int:
        """Durably queue a `<memory>` block's ops (one cheap insert); the worker applies them."""
        payload = {
            "ops": ops.to_dict(),
            "scope": {
                "user_id": scope.user_id, "session_id": scope.session_id,
                "agent_id": scope.agent_id, "turn_id": scope.turn_id,
            },
            "request_id": request_id,
        }
        outbox_id = await self._write(lambda: self.store.outbox_put(payload))
        if self._worker is not None:
            self._worker.wake()
        return outbox_id

    def writer_stats(self) -> dict[str, int]:
        """Outbox worker counters: ops applied, ops dropped as invalid, failed batches retried."""
        worker = self._worker
        if worker is None:
            return {"applied": 0, "dropped": 0, "retries": 0}
        return {"applied": worker.applied, "dropped": worker.failed, "retries": worker.retries}

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every queued op is applied."""
        if self._worker is not None:
            await self._worker.drain(timeout)

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Drain the outbox (up to `drain_timeout`; what is left replays on the next start), stop
        the threads, close the database."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            await self._worker.stop(drain_timeout)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._shutdown_threads)

    def _shutdown_threads(self) -> None:
        # A model still loading must not hold shutdown up (a container gets ~10 s after SIGTERM);
        # nothing durable happens on the embedding thread.
        self._embedding.shutdown(wait=False, cancel_futures=True)
        self._readers.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        if self._on_close:
            self._on_close()

    async def __aenter__(self) -> HierarchicalMemory:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _scope_dict(scope: Scope) -> dict[str, str | None]:
    return {
        "user_id": scope.user_id, "session_id": scope.session_id,
        "agent_id": scope.agent_id, "turn_id": scope.turn_id, "level": scope.level.value,
    }


def _exact_knn(
    vector: np.ndarray, rows: list[tuple[int, np.ndarray]], k: int
) -> list[tuple[int, float]]:
    """Brute-force cosine over stored embeddings, for reads of history the index does not hold."""
    if not rows or k <= 0:
        return []
    matrix = np.stack([v for _, v in rows])
    sims = matrix @ np.asarray(vector, dtype=np.float32)
    order = np.argsort(-sims)[:k]
    return [(rows[i][0], float(sims[i])) for i in order]


def _build_defaults(config: MemoryConfig, embedder: Embedder | None) -> tuple[Any, ...]:
    """Open the file and build the default adapters (runs on the writer thread)."""
    from .adapters import FTS5TextIndex, LRUMemoryCache, SQLiteMemoryStore, SqliteVecIndex
    from .db import Database

    db = Database(config.db_path)  # type: ignore[arg-type]
    try:
        store = SQLiteMemoryStore(db)
        if embedder is None:
            from .embedders import make_embedder

            embedder = make_embedder(config)
        recorded_model = store.get_setting("embedding_model")
        recorded_dim = store.get_setting("vector_dimension")
        if recorded_model is not None and recorded_model != embedder.model_id:
            raise ConfigError(
                f"{config.db_path} was built with embedder {recorded_model}, not "
                f"{embedder.model_id}: configure that embedder, or export the memories and "
                "import them into a new database (import re-embeds them)"
            )
        dimension = (
            int(recorded_dim) if recorded_dim else (config.vector_dimension or embedder.dimension)
        )
        if recorded_model is None or recorded_dim is None:
            with db.transaction():  # first open of a new file: create the vector table
                vectors = SqliteVecIndex(db, dimension, config.vector_chunk_size)
                store.set_setting("embedding_model", embedder.model_id)
                store.set_setting("vector_dimension", str(dimension))
        else:  # later opens only read, so they never wait on another process's writes
            vectors = SqliteVecIndex(db, dimension)
        text = FTS5TextIndex(db)
        cache = LRUMemoryCache(config.cache_max_size) if config.cache_enabled else None
        return db, store, vectors, text, embedder, cache
    except BaseException:
        db.close()
        raise

"""`HierarchicalMemory`, the facade the spec names. It holds the engine's parts and delegates:

    wiring         `create(config)`: the SQLite file and the default adapters
    executors      the writer thread, the reader pool, the embedding thread
    commands       add / update / supersede / forget: validate, embed, one write transaction
    unit_of_work   what one write does to the rows and both indexes (dedup, bubbling, supersede)
    reads          one memory by id (through the cache), its history and events, filters, counts
    retrieval      search, text and hybrid search, recall, explain_ranking
    maintenance    purge, clear, stats, optimize
    transfer       JSONL export and import
    write_behind   the outbox: durable submit, health, dead letters (`writer`: the worker)

Nothing here blocks the event loop, and no other module reaches into this one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import transfer, wiring
from .commands import Commands
from .common_words import CommonWords
from .executors import Executors
from .limits import WriteLimits
from .maintenance import Maintenance
from .models import (
    Memory,
    MemoryCategory,
    MemoryConfig,
    MemoryDraft,
    MemoryFilter,
    MemoryOps,
    Scope,
    SearchResult,
)
from .parts import EngineParts
from .ports import Embedder, MemoryCache, MemoryStore, Outbox, TextIndex, VectorIndex
from .reads import Reads
from .recall import RecallPreset, get_preset
from .retrieval import Retrieval
from .unit_of_work import UnitOfWork
from .write_behind import WriteBehind

__all__ = ["HierarchicalMemory", "MemoryDraft"]


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
        outbox: Outbox | None = None,
    ) -> None:
        config = config or MemoryConfig(db_path=":memory:")
        if outbox is None and isinstance(getattr(store, "outbox", None), Outbox):
            outbox = store.outbox  # type: ignore[attr-defined]  # the SQLite store's own
        self._parts = parts = EngineParts(
            config, store, vector_index, text_index, embedder, cache, outbox
        )
        self._executors = Executors(parts, writer)
        common_words = CommonWords()
        self._unit = UnitOfWork(parts, limits=WriteLimits(config))
        self._retrieval = Retrieval(parts, self._executors, common_words)
        refresh = self._retrieval.refresh_common_words
        self._commands = Commands(parts, self._executors, self._unit, refresh)
        self._reads = Reads(parts, self._executors)
        self._maintenance = Maintenance(parts, self._executors, common_words)
        self._write_behind = WriteBehind(parts, self._executors, self._unit, outbox, refresh)
        self._on_close = on_close
        self._closed = False

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
        built = await wiring.open_defaults(config, embedder)
        p = built.parts
        return cls(
            p.store, p.vectors, p.text, p.embedder, p.cache, config=config, writer=built.writer,
            on_close=built.close, outbox=p.outbox,
        )

    # --- the parts, for callers that read them directly -----------------------------------------

    @property
    def config(self) -> MemoryConfig:
        return self._parts.config

    @property
    def store(self) -> MemoryStore:
        return self._parts.store

    @property
    def vectors(self) -> VectorIndex:
        return self._parts.vectors

    @property
    def text(self) -> TextIndex:
        return self._parts.text

    @property
    def cache(self) -> MemoryCache | None:
        return self._parts.cache

    @property
    def embedder(self) -> Embedder:
        return self._parts.embedder

    @embedder.setter
    def embedder(self, embedder: Embedder) -> None:
        """Swap the model for memory contents (bench seeding); queries keep their cache's."""
        self._parts.embedder = embedder

    @property
    def preset(self) -> RecallPreset:
        return self._retrieval.preset

    # --- model --------------------------------------------------------------------------------

    async def embed_query(self, text: str) -> np.ndarray:
        """One query's vector, from the LRU of recent queries when it repeats."""
        return await self._executors.embed_query(text)

    async def warm_up(self) -> None:
        """Load the embedding model now (the server does this in the background at start)."""
        await self._executors.embed(["warm up"])

    # --- adding and changing --------------------------------------------------------------------

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
        return await self._commands.add_many(drafts, request_id=request_id)

    async def remember(
        self, content: str, user_id: str, importance: float = 0.5, **kwargs: Any
    ) -> Memory:
        """`add` with the defaults a quick note wants."""
        return await self.add(content, user_id, importance=importance, **kwargs)

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
        return await self._commands.update(
            memory_id, metadata=metadata, importance=importance, entity_refs=entity_refs,
            user_id=user_id, request_id=request_id,
        )

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
        return await self._commands.supersede(
            old_memory_id, new_content, category=category, importance=importance,
            metadata=metadata, entity_refs=entity_refs, user_id=user_id, at=at,
            request_id=request_id,
        )

    async def forget(
        self, memory_id: str, *, user_id: str | None = None, reason: str | None = None,
        request_id: str | None = None,
    ) -> Memory:
        """Soft delete: the memory leaves every current read path; its row and history stay."""
        return await self._commands.forget(
            memory_id, user_id=user_id, reason=reason, request_id=request_id
        )

    # --- reading --------------------------------------------------------------------------------

    async def get(self, memory_id: str, user_id: str | None = None) -> Memory:
        """The memory with this id (current or not). With `user_id`, another user's is not found."""
        return await self._reads.get(memory_id, user_id)

    async def get_history(self, memory_id: str, user_id: str | None = None) -> list[Memory]:
        """The whole supersession chain through this memory, oldest first."""
        return await self._reads.history(memory_id, user_id)

    async def get_events(self, memory_id: str, user_id: str | None = None) -> list[dict[str, Any]]:
        """The audit trail of one memory: add, reinforce, promote, supersede, forget, update."""
        return await self._reads.events(memory_id, user_id)

    async def query(self, flt: MemoryFilter) -> list[Memory]:
        return await self._reads.query(flt)

    async def count(self, flt: MemoryFilter) -> int:
        return await self._reads.count(flt)

    # --- search and recall ----------------------------------------------------------------------

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
        return await self._retrieval.search(query, flt, top_k, min_similarity)

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
        return await self._retrieval.text_search(query, scope, top_k, categories)

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
        scope = Scope(user_id, session_id, agent_id, turn_id)
        return await self._retrieval.hybrid_search(
            query, scope, top_k, categories, now=now, preset=preset, query_vector=query_vector
        )

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
        scope = Scope(user_id, session_id, agent_id, turn_id)
        return await self._retrieval.explain_ranking(query, scope, top_k, now=now, preset=preset)

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
        preset: str | RecallPreset | None = None,
    ) -> list[Memory]:
        """The memories most worth showing for `query`, best first, within `token_budget`;
        `preset` overrides the configured recall preset for this call."""
        scope = Scope(user_id, session_id, agent_id, turn_id)
        return await self._retrieval.recall(
            query, scope, top_k, token_budget=token_budget, categories=categories, now=now,
            touch=touch, preset=preset,
        )

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
        return await self._maintenance.purge(flt)

    async def clear(self, user_id: str | None = None) -> dict[str, int]:
        """Purge one user, or with no user every user in the database."""
        return await self._maintenance.clear(user_id)

    async def stats(self, user_id: str | None = None) -> dict[str, Any]:
        return await self._maintenance.stats(user_id)

    async def optimize(self) -> None:
        """Maintenance after bulk writes: merge the full-text index's segments (the server runs
        it in the background at start; import runs it when done)."""
        await self._maintenance.optimize()

    # --- export / import ------------------------------------------------------------------------

    async def export_jsonl(self, dest: str | Path | IO[str], user_id: str | None = None) -> int:
        return await self._executors.read(lambda: transfer.export_jsonl(self._parts, dest, user_id))

    async def import_jsonl(
        self, source: str | Path | IO[str],
        on_progress: Callable[[int], None] | None = None,
    ) -> dict[str, int]:
        return await transfer.import_jsonl(
            self._parts, self._executors, self._unit, source, on_progress=on_progress,
            optimize=self._maintenance.optimize,
        )

    # --- write-behind (the proxy's path) --------------------------------------------------------

    async def start(self) -> None:
        """Start the outbox worker; it first replays whatever a previous process (or another
        process on the same file, whose leases ran out) left."""
        await self._write_behind.start()

    async def submit(
        self, ops: MemoryOps, scope: Scope, *, request_id: str | None = None
    ) -> int | None:
        """Durably queue a `<memory>` block's ops; returns once the outbox row is committed (its
        id), and the worker applies them. If the database cannot take even that insert, the ops
        wait in a bounded in-memory queue and None is returned; past `memory_queue_max_ops`
        this raises StorageError."""
        return await self._write_behind.submit(ops, scope, request_id)

    def writer_stats(self) -> dict[str, int]:
        """Outbox worker counters: ops applied, dropped as invalid, skipped over a limit;
        passes retried (embedder or storage down); row failures, dead letters (parked by this
        worker, and in the file as last seen); ops waiting in memory."""
        return self._write_behind.stats()

    async def health(self) -> dict[str, Any]:
        """{"status": "ok" | "degraded", "reasons": [...], "outbox_pending", "dead_letters",
        "queued_in_memory"}: degraded while storage fails, ops wait in memory, or the embedder
        fails (the counts are None when the outbox cannot be read)."""
        return await self._write_behind.health()

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """Outbox rows parked after `outbox_max_attempts` failures, oldest first: id, outbox_id,
        user_id, payload, attempts, error, created_at, dead_at."""
        return await self._write_behind.dead_letters(limit)

    async def redrive_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Queue these dead letters (all when `ids` is None) again as new outbox rows; returns
        how many were moved."""
        return await self._write_behind.redrive(ids)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every queued op is applied (or parked as a dead letter)."""
        await self._write_behind.drain(timeout)

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Drain the outbox (up to `drain_timeout`; what is left replays on the next start), stop
        the threads, close the database."""
        if self._closed:
            return
        self._closed = True
        self._retrieval.access.flush()
        await self._write_behind.stop(drain_timeout)
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self._executors.shutdown()
        if self._on_close:
            self._on_close()

    async def __aenter__(self) -> HierarchicalMemory:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

"""The proxy's fail-open face of the memory engine.

Memory trouble (database locked, embedder down, model still loading) never fails a request: recall
is skipped within a time budget and writes are queued in the background; every problem is logged
and counted. Shared by the HTTP proxy and the in-process `with_memory` wrapper.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from ..memory.hierarchical import HierarchicalMemory
from ..memory.models import Memory, MemoryConfig, MemoryOps, Scope
from ..memory.ports import Embedder

log = logging.getLogger("headroom.proxy")

__all__ = ["MemoryService"]

_SUBMIT_ATTEMPTS = 5


class MemoryService:
    def __init__(
        self, config: MemoryConfig, *, top_k: int, token_budget: int, recall_timeout_s: float,
        embedder: Embedder | None = None,
    ) -> None:
        self.config = config
        self.top_k = top_k
        self.token_budget = token_budget  # applied by proxy.inject, which formats the lines
        self.recall_timeout_s = recall_timeout_s
        self._embedder = embedder
        self.engine: HierarchicalMemory | None = None
        self.open_error: str | None = None
        self.model_ready = asyncio.Event()
        self.model_error: str | None = None
        self.counters: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._warm_task: asyncio.Task[None] | None = None
        self._maintenance: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.model_ready.is_set()

    async def start(self, *, warm: bool = True) -> None:
        """Open the database and start the outbox worker now; load the model in the background
        (importing torch alone takes 10+ s), so the server can listen at once."""
        try:
            self.engine = await HierarchicalMemory.create(self.config, embedder=self._embedder)
            await self.engine.start()
        except Exception as exc:
            self.open_error = f"{type(exc).__name__}: {exc}"
            log.error("memory disabled, requests pass through untouched: %s", self.open_error)
            return
        self._maintenance = asyncio.create_task(self._optimize(), name="headroom-optimize")
        if warm:
            self._warm_task = asyncio.create_task(self._warm(), name="headroom-warm-up")
        else:
            self.model_ready.set()

    async def _optimize(self) -> None:
        assert self.engine is not None
        try:
            await self.engine.optimize()
        except Exception:
            log.warning("full-text index maintenance failed; search still works", exc_info=True)

    async def _warm(self) -> None:
        assert self.engine is not None
        started = time.perf_counter()
        try:
            await self.engine.warm_up()
        except Exception as exc:
            self.model_error = f"{type(exc).__name__}: {exc}"
            log.error("embedding model failed to load; recall stays off: %s", self.model_error)
            return
        self.model_ready.set()
        log.info("embedding model ready in %.1fs; recall is on", time.perf_counter() - started)

    async def recall(self, scope: Scope, query: str) -> list[Memory]:
        if self.engine is None or not query.strip():
            return []
        if not self.model_ready.is_set():
            self.counters["recall_skipped_not_ready"] += 1
            log.info("recall skipped: the embedding model is still loading")
            return []
        try:
            return await asyncio.wait_for(
                self.engine.recall(
                    query, scope.user_id, scope.session_id, scope.agent_id, scope.turn_id,
                    top_k=self.top_k,
                ),
                self.recall_timeout_s,
            )
        except TimeoutError:
            self.counters["recall_timeouts"] += 1
            log.warning("recall skipped: took longer than %.1fs", self.recall_timeout_s)
        except Exception:
            self.counters["recall_errors"] += 1
            log.exception("recall failed; answering without memories")
        return []

    def store(self, ops: MemoryOps, scope: Scope, request_id: str) -> None:
        """Queue ops without making the caller wait; `stop()` waits for every queued write."""
        if self.engine is None:
            self.counters["ops_dropped_no_engine"] += 1
            log.error("memory ops of %s dropped, no database: %s", request_id, ops.to_dict())
            return
        task = asyncio.get_running_loop().create_task(self._submit(ops, scope, request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _submit(self, ops: MemoryOps, scope: Scope, request_id: str) -> None:
        assert self.engine is not None
        delay = 0.2
        for attempt in range(1, _SUBMIT_ATTEMPTS + 1):
            try:
                await self.engine.submit(ops, scope, request_id=request_id)
                self.counters["ops_queued"] += 1
                return
            except Exception:
                log.warning("queueing memory ops of %s failed (attempt %d)", request_id, attempt,
                            exc_info=attempt == _SUBMIT_ATTEMPTS)
                await asyncio.sleep(delay)
                delay *= 2
        self.counters["ops_lost"] += 1
        # The one place a write can be lost: say exactly what, so an operator can re-add it.
        log.error("memory ops of %s could not be stored: %s", request_id, ops.to_dict())

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued write is applied (read-your-writes for the wrapper)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self.engine is not None:
            await self.engine.drain(timeout)

    async def stop(self, timeout: float = 25.0) -> None:
        if self._warm_task is not None and not self._warm_task.done():
            self._warm_task.cancel()
        if self._maintenance is not None:
            await asyncio.wait([self._maintenance], timeout=timeout)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self.engine is not None:
            if not self.model_ready.is_set():
                # Applying queued ops needs the model; they stay in the outbox and replay on start.
                log.info("embedding model not loaded: queued memory writes replay on next start")
            await self.engine.close(timeout if self.model_ready.is_set() else 0.0)

    def status(self) -> dict[str, Any]:
        return {
            "database": "ok" if self.engine is not None else f"error: {self.open_error}",
            "embedder": "ready" if self.model_ready.is_set()
            else (f"error: {self.model_error}" if self.model_error else "loading"),
            "counters": dict(self.counters),
            "writer": self.engine.writer_stats() if self.engine is not None else {},
        }

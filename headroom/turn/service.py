"""`MemoryService`: the fail-open face of the memory engine, shared by the HTTP proxy and the
in-process `with_memory` wrapper.

Memory trouble (database locked or full, embedder down, model still loading) never fails a
request: recall is skipped within its time budget, and a write the database does not take in time
stays queued in memory and is retried until the service stops. Every problem is logged and
counted. Recall settings are per call (`RecallSettings`), so clients with different settings can
share one engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..memory.hierarchical import HierarchicalMemory
from ..memory.models import Memory, MemoryConfig, MemoryOps, Scope
from ..memory.ports import Embedder

log = logging.getLogger(__name__)

__all__ = ["MemoryService", "RecallSettings"]

# Ops waiting for the database beyond this are refused (and logged whole): memory is bounded
# even when the database stays unwritable for a long time.
_MAX_PENDING_WRITES = 10_000
_RETRY_FIRST_S = 0.2
_RETRY_MAX_S = 5.0


@dataclass(frozen=True)
class RecallSettings:
    top_k: int = 5
    token_budget: int = 800  # applied where the memory lines are formatted (turn.inject)
    preset: str | None = None  # None: the engine's configured preset
    timeout_s: float = 2.0  # past it, recall is skipped (fail open)


class MemoryService:
    def __init__(
        self, config: MemoryConfig, *, top_k: int = 5, token_budget: int = 800,
        recall_timeout_s: float = 2.0, embedder: Embedder | None = None,
    ) -> None:
        self.config = config
        # The settings of callers that bring none of their own (the HTTP proxy's).
        self.settings = RecallSettings(top_k, token_budget, None, recall_timeout_s)
        self._embedder = embedder
        self.engine: HierarchicalMemory | None = None
        self.open_error: str | None = None
        self.model_ready = asyncio.Event()
        self.model_error: str | None = None
        self.counters: Counter[str] = Counter()
        self._writes: dict[asyncio.Task[bool], MemoryOps] = {}
        # What of a block may be stored; the proxy sets its per-key new-memory limit here.
        self.admit: Callable[[MemoryOps], MemoryOps] = lambda ops: ops
        self._warm_task: asyncio.Task[None] | None = None
        self._maintenance: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.model_ready.is_set()

    @property
    def pending_writes(self) -> int:
        """Ops not yet committed to the outbox."""
        return len(self._writes)

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

    async def recall(
        self, scope: Scope, query: str, settings: RecallSettings | None = None
    ) -> list[Memory]:
        """The memories for `query`, or [] when memory has trouble (logged and counted)."""
        settings = settings or self.settings
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
                    top_k=settings.top_k, preset=settings.preset,
                ),
                settings.timeout_s,
            )
        except TimeoutError:
            self.counters["recall_timeouts"] += 1
            log.warning("recall skipped: took longer than %.1fs", settings.timeout_s)
        except Exception:
            self.counters["recall_errors"] += 1
            log.exception("recall failed; answering without memories")
        return []

    async def store(
        self, ops: MemoryOps, scope: Scope, request_id: str, *, wait_s: float
    ) -> bool:
        """Queue ops in the outbox, waiting at most `wait_s` for the commit. True when they are
        durable on return; otherwise they stay queued here and are retried (`stop()` waits for
        them), and the caller answers anyway."""
        ops = self.admit(ops)
        if not ops:
            return True  # nothing left to store
        if self.engine is None:
            self.counters["ops_dropped_no_engine"] += 1
            log.error("memory ops of %s dropped, no database: %s", request_id, ops.to_dict())
            return False
        if len(self._writes) >= _MAX_PENDING_WRITES:
            self.counters["ops_lost"] += 1
            log.error("memory ops of %s dropped, %d writes already waiting for the database: %s",
                      request_id, len(self._writes), ops.to_dict())
            return False
        task = asyncio.get_running_loop().create_task(self._submit(ops, scope, request_id))
        self._writes[task] = ops
        task.add_done_callback(self._writes.pop)
        # asyncio.wait never cancels the write, also when this caller is cancelled (client gone).
        await asyncio.wait([task], timeout=max(wait_s, 0.0))
        if task.done() and not task.cancelled():
            return task.result()
        self.counters["ops_answered_before_durable"] += 1
        log.warning("memory ops of %s not durable within %.2fs; answered anyway, still queued",
                    request_id, wait_s)
        return False

    async def _submit(self, ops: MemoryOps, scope: Scope, request_id: str) -> bool:
        assert self.engine is not None
        delay = _RETRY_FIRST_S
        attempt = 0
        try:
            while True:
                attempt += 1
                try:
                    outbox_id = await self.engine.submit(ops, scope, request_id=request_id)
                except Exception as exc:
                    self.counters["ops_submit_retries"] += 1
                    log.warning("queueing memory ops of %s failed (attempt %d), retrying in "
                                "%.1fs: %s", request_id, attempt, delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX_S)
                    continue
                if outbox_id is None:
                    # The database took no insert; the engine holds the ops in memory and
                    # writes them once it can. Not durable yet.
                    self.counters["ops_queued_in_engine_memory"] += 1
                    return False
                self.counters["ops_queued"] += 1
                return True
        except asyncio.CancelledError:
            self.counters["ops_lost"] += 1
            # The one place a write can be lost: say exactly what, so an operator can re-add it.
            log.error("memory ops of %s could not be stored: %s", request_id, ops.to_dict())
            raise

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued write is applied (read-your-writes). Raises TimeoutError."""
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=timeout)
        if self.engine is not None:
            await self.engine.drain(timeout)

    async def stop(self, timeout: float = 25.0) -> None:
        if self._warm_task is not None and not self._warm_task.done():
            self._warm_task.cancel()
        if self._maintenance is not None:
            await asyncio.wait([self._maintenance], timeout=timeout)
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=timeout)
            left = list(self._writes)
            for task in left:
                task.cancel()  # logs the ops it loses
            await asyncio.gather(*left, return_exceptions=True)
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
            "pending_writes": len(self._writes),
            "writer": self.engine.writer_stats() if self.engine is not None else {},
        }

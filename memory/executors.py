"""The engine's threads: one writer, a pool of readers, one embedding thread.

Storage and model calls block, so nothing of theirs runs on the event loop. SQLite allows one
writer at a time, and ordering every write on one thread avoids lock waits inside the process;
WAL lets the readers run beside it. The local model is pinned to few threads on purpose: memory
contents are embedded on a thread of their own, and queries through a `BatchingEmbedder`, whose
callers wait on a small pool so that queries arriving together share one model call. Queries
asked in the same turn of the event loop (asyncio.gather, a burst of requests) leave the loop as
one call already, so they make one model call and one thread hop between them.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from .embedders.batching import BatchingEmbedder
from .embedders.cached import CachedEmbedder
from .parts import EngineParts

__all__ = ["Executors"]

T = TypeVar("T")

# Queries per model call at most. On MiniLM a batch of 8 short queries costs ~2.5x one query,
# so under load the batches pay; the cap bounds the wait of the query at the back of one.
QUERY_BATCH_MAX = 16


class Executors:
    def __init__(self, parts: EngineParts, writer: ThreadPoolExecutor | None = None) -> None:
        self.parts = parts
        self._writer = writer or ThreadPoolExecutor(1, thread_name_prefix="headroom-writer")
        self._readers = ThreadPoolExecutor(
            parts.config.reader_threads, thread_name_prefix="headroom-reader"
        )
        self._embedding = ThreadPoolExecutor(1, thread_name_prefix="headroom-embed")
        # Threads here mostly wait for a batch another one is running; one per batch slot.
        self._query_embedding = ThreadPoolExecutor(
            QUERY_BATCH_MAX, thread_name_prefix="headroom-query-embed"
        )
        # An embedder may name a cheaper twin for queries (OnnxEmbedder(int8_queries=True)).
        query_model = getattr(parts.embedder, "query_embedder", None) or parts.embedder
        self.query_batcher = BatchingEmbedder(query_model, QUERY_BATCH_MAX)
        # Only queries go through the cache: memory contents would push repeat queries out.
        self._query_embedder = CachedEmbedder(
            self.query_batcher, parts.config.query_embedding_cache_size
        )
        # Per event loop, the queries asked since it last ran `_flush_queries`. Keyed by loop
        # (weakly: a closed loop's entry goes with it) as an engine may be used from two loops.
        self._pending_queries: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, list[tuple[str, asyncio.Future[np.ndarray]]]
        ] = weakref.WeakKeyDictionary()

    async def write(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the writer thread inside one store transaction."""

        def in_transaction() -> T:
            with self.parts.store.transaction():
                return fn()

        return await self.on_writer(in_transaction)

    async def on_writer(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the writer thread, outside any transaction (e.g. a WAL checkpoint)."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn)

    def write_later(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Queue `fn(*args)` on the writer thread without waiting for it (bookkeeping whose
        failure the caller must not see). False when the engine is closing."""
        try:
            self._writer.submit(fn, *args)
        except RuntimeError:  # shut down
            return False
        return True

    async def read(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(
            self._embedding, self.parts.embedder.embed, list(texts)
        )

    async def embed_query(self, text: str) -> np.ndarray:
        """One query's vector, from the LRU of recent queries when it repeats (looked up here,
        on the loop: a repeated query costs no thread hop).

        The query waits for the loop's next turn at most (call_soon, no timer): a lone query
        goes out at once, and the ones asked beside it go with it.
        """
        cached = self._query_embedder.lookup(text)
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        pending = self._pending_queries.setdefault(loop, [])
        pending.append((text, future))
        if len(pending) == 1:
            loop.call_soon(self._flush_queries, loop)
        return await future

    def query_vector_for_thread(self, text: str) -> Future[np.ndarray]:
        """One query's vector as a thread-side future, handed to the model at once: for a job
        on another pool that does its own work while the model runs and then waits for the
        vector there, instead of a hop back to the event loop and out again to a reader
        (fresh queries at c=1 through the proxy: ~0.2 ms less). A repeated query is looked
        up here, as in `embed_query`."""
        cached = self._query_embedder.lookup(text)
        if cached is not None:
            done: Future[np.ndarray] = Future()
            done.set_result(cached)
            return done
        return self._query_embedding.submit(_one_row, self._query_embedder, text)

    def _flush_queries(self, loop: asyncio.AbstractEventLoop) -> None:
        pending = self._pending_queries.pop(loop, [])
        for start in range(0, len(pending), QUERY_BATCH_MAX):
            group = pending[start : start + QUERY_BATCH_MAX]
            try:
                done = loop.run_in_executor(
                    self._query_embedding, self._query_embedder.embed, [t for t, _ in group]
                )
            except RuntimeError as exc:  # the pool is shut down
                _settle(group, None, exc)
                continue
            done.add_done_callback(functools.partial(_settle_from, group))

    def shutdown(self) -> None:
        # A model still loading must not hold shutdown up (a container gets ~10 s after SIGTERM);
        # nothing durable happens on the embedding thread.
        self._embedding.shutdown(wait=False, cancel_futures=True)
        self._query_embedding.shutdown(wait=False, cancel_futures=True)
        self._readers.shutdown(wait=True)
        self._writer.shutdown(wait=True)


def _one_row(embedder: CachedEmbedder, text: str) -> np.ndarray:
    return embedder.embed([text])[0]


def _settle_from(
    group: list[tuple[str, asyncio.Future[np.ndarray]]], done: asyncio.Future[np.ndarray]
) -> None:
    if done.cancelled():
        _settle(group, None, asyncio.CancelledError())
    else:
        _settle(group, done.result() if done.exception() is None else None, done.exception())


def _settle(
    group: list[tuple[str, asyncio.Future[np.ndarray]]],
    vectors: np.ndarray | None,
    error: BaseException | None,
) -> None:
    """Hand each waiting query its row (or the group's error); a caller that gave up is skipped."""
    for row, (_, future) in enumerate(group):
        if future.done():
            continue
        if isinstance(error, asyncio.CancelledError):
            future.cancel()
        elif vectors is None:
            future.set_exception(error or RuntimeError("query embedding did not finish"))
        else:
            future.set_result(vectors[row])

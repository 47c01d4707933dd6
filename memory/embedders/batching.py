"""Micro-batching in front of any embedder: texts that arrive while a model call runs go
together into the next call, so concurrent requests share one forward pass instead of queueing
for one each."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

import numpy as np

from ..ports import Embedder
from ._common import empty, text_list

__all__ = ["BatchingEmbedder"]


class _Job:
    """One caller's texts and, once a batch has run, its vectors or the batch's error."""

    __slots__ = ("done", "error", "texts", "vectors")

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.vectors: np.ndarray | None = None
        self.error: BaseException | None = None
        self.done = False


class BatchingEmbedder:
    """Implements `memory.ports.Embedder`; at most one call to `inner` runs at a time.

    A caller that finds the model idle runs its own texts at once (no added wait when requests
    do not overlap). Callers that arrive while a call runs queue up; when it ends, one of them
    runs everything queued, up to `max_batch` texts (whole calls only, oldest first; a single
    call larger than that runs alone), and hands each caller its rows. Callers block in their own
    threads, so run `embed` on a pool with several threads (memory/executors.py does), never on
    the event loop. If a batch fails, every caller in it gets the error.
    """

    def __init__(self, inner: Embedder, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.inner = inner
        self.model_id = inner.model_id
        self.max_batch = max_batch
        self.model_calls = 0
        self.texts_embedded = 0
        self._queue: deque[_Job] = deque()
        self._busy = False
        self._cond = threading.Condition()

    def __repr__(self) -> str:
        return f"BatchingEmbedder({self.inner!r}, max_batch={self.max_batch})"

    @property
    def dimension(self) -> int:
        return self.inner.dimension

    def stats(self) -> dict[str, int]:
        """Model calls so far, texts they embedded, and calls waiting for the next batch."""
        with self._cond:
            return {
                "model_calls": self.model_calls,
                "texts": self.texts_embedded,
                "queued": len(self._queue),
            }

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        items = text_list(texts)
        if not items:
            return empty(self.dimension)
        job = _Job(items)
        with self._cond:
            self._queue.append(job)
        while True:
            with self._cond:
                while self._busy and not job.done:
                    self._cond.wait()
                if job.done:
                    break
                batch = self._take_batch()
                self._busy = True
            self._run(batch)
        if job.error is not None:
            raise job.error
        assert job.vectors is not None
        return job.vectors

    def _take_batch(self) -> list[_Job]:
        batch = [self._queue.popleft()]
        size = len(batch[0].texts)
        while self._queue and size + len(self._queue[0].texts) <= self.max_batch:
            job = self._queue.popleft()
            batch.append(job)
            size += len(job.texts)
        return batch

    def _run(self, batch: list[_Job]) -> None:
        vectors: np.ndarray | None = None
        error: BaseException | None = None
        try:
            vectors = self.inner.embed([text for job in batch for text in job.texts])
        except BaseException as exc:  # handed to every caller in the batch, re-raised there
            error = exc
        finally:
            with self._cond:
                start = 0
                for job in batch:
                    end = start + len(job.texts)
                    if vectors is not None:
                        # A copy, so one caller's rows do not keep the whole batch alive.
                        job.vectors = np.array(vectors[start:end], dtype=np.float32)
                    else:
                        job.error = error or RuntimeError("embedding batch did not finish")
                    job.done = True
                    start = end
                self.model_calls += 1
                self.texts_embedded += start
                self._busy = False
                self._cond.notify_all()

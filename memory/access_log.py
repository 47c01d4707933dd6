"""Access counts (`access_count`, `last_accessed`), written in batches off the request's path.

Recall hands over the ids it returned; one writer job records everything handed over within
`delay_s`, in one transaction. Written at once, each recall's update ran on the writer thread
while its request was still being answered, and its Python took the GIL from that request.
Through the proxy at c=1 (A/B, four rounds each): leaving the update out took fresh queries
from 8.2 to 7.7 ms added; batching it, from 8.8 to 8.6 ms (repeated queries 4.5 -> 4.2 ms), and
a burst of requests costs one transaction. Access counts are bookkeeping: what a crash loses is
at most the last `delay_s` of them, never a memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from .parts import EngineParts

__all__ = ["AccessLog"]

log = logging.getLogger(__name__)

# Long enough that a request's own update waits until it has been answered, short enough that
# a reader of the counts (stats, export, a test) sees them within a blink.
DEFAULT_DELAY_S = 0.05


class AccessLog:
    def __init__(
        self, parts: EngineParts, write_later: Callable[..., bool],
        delay_s: float = DEFAULT_DELAY_S,
    ) -> None:
        self.parts = parts
        self._write_later = write_later
        self.delay_s = delay_s
        self._pending: list[tuple[list[str], datetime]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def record(self, ids: list[str], when: datetime) -> None:
        """Count one access to each of `ids` at `when`, within `delay_s` (call on a loop)."""
        self._pending.append((ids, when))
        loop = asyncio.get_running_loop()
        if self._timer is not None and self._timer_loop is not loop:
            # Scheduled on another loop (an engine shared by two): that loop may never run the
            # timer again, so nothing waits for it.
            self.flush()
            return
        if self._timer is None:
            self._timer = loop.call_later(self.delay_s, self.flush)
            self._timer_loop = loop

    def flush(self) -> None:
        """Hand everything recorded so far to the writer now (on close, before its threads
        stop; the writer thread finishes what it was handed)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_loop = None
        batch, self._pending = self._pending, []
        if batch and not self._write_later(self._write, batch):
            log.info("engine closed: %d access records not written", len(batch))

    def _write(self, batch: list[tuple[list[str], datetime]]) -> None:
        store = self.parts.store
        try:
            with store.transaction():
                for ids, when in batch:
                    store.touch(ids, when)
        except Exception:
            log.warning("could not record access to %d memories",
                        sum(len(ids) for ids, _ in batch), exc_info=True)
        for ids, _ in batch:
            for memory_id in ids:  # cached copies carry the old access count
                self.parts.invalidate(memory_id)

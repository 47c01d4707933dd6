"""A `MemoryCache` that stays true across replicas: LRU locally, invalidated through NOTIFY.

Each replica caches current memories by id. When one replica changes a row, the engine
invalidates it (`EngineParts.invalidate`); here that also sends `pg_notify` on the thread's
transaction connection, so the notice goes out when the change commits (and never if it rolls
back). Every replica LISTENs on its own connection and drops the named entry.

Two windows are closed on purpose. A read that began before another replica's commit may try to
`put` the old copy after the notice arrived: ids invalidated in the last `tombstone_s` seconds are
not cached (a cache miss, never a stale hit). A listener that lost its connection may have missed
notices: on reconnecting it clears the whole cache.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg

from ...models import Memory
from ..cache import LRUMemoryCache
from .connection import PgDatabase

log = logging.getLogger(__name__)

__all__ = ["CHANNEL", "PgNotifyCache"]

CHANNEL = "headroom_cache"
_CLEAR = "*"
# No memory id: sent by close() so the listener stops now instead of at the end of its poll.
_WAKE = ""
_RECONNECT_S = 1.0


class PgNotifyCache:
    def __init__(
        self, db: PgDatabase, max_size: int = 1000, *, tombstone_s: float = 2.0
    ) -> None:
        self.db = db
        self.local = LRUMemoryCache(max_size)
        self.tombstone_s = tombstone_s
        self._tombstones: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(
            target=self._listen, name="headroom-cache-listener", daemon=True
        )
        self._thread.start()
        db.on_close(self.close)
        if not self._listening.wait(timeout=10):
            log.warning("cache listener not connected yet; entries are dropped until it is")

    # --- MemoryCache ------------------------------------------------------------------------

    def get(self, memory_id: str) -> Memory | None:
        if not self._listening.is_set():
            return None  # notices may be missed while not listening: serve nothing cached
        return self.local.get(memory_id)

    def put(self, memory: Memory) -> None:
        with self._lock:
            until = self._tombstones.get(memory.id)
            if until is not None:
                if until > time.monotonic():
                    return  # changed moments ago: this copy may predate the change
                del self._tombstones[memory.id]
        if self._listening.is_set():
            self.local.put(memory)

    def invalidate(self, memory_id: str) -> None:
        self._drop(memory_id)
        self.db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, memory_id))

    def clear(self) -> None:
        self.local.clear()
        self.db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, _CLEAR))

    def __len__(self) -> int:
        return len(self.local)

    @property
    def hits(self) -> int:
        return self.local.hits

    @property
    def misses(self) -> int:
        return self.local.misses

    # --- the listener -----------------------------------------------------------------------

    def _drop(self, memory_id: str) -> None:
        with self._lock:
            now = time.monotonic()
            self._tombstones[memory_id] = now + self.tombstone_s
            if len(self._tombstones) > 10_000:  # forget tombstones that have run out
                self._tombstones = {k: v for k, v in self._tombstones.items() if v > now}
        self.local.invalidate(memory_id)

    def _listen(self) -> None:
        lost = False  # one warning per outage, not one traceback per reconnect attempt
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.db.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.local.clear()  # whatever happened while we were not listening
                    self._listening.set()
                    if lost:
                        log.warning("cache listener reconnected")
                        lost = False
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=0.5):
                            if self._stop.is_set() or notice.payload == _WAKE:
                                break
                            if notice.payload == _CLEAR:
                                self.local.clear()
                            else:
                                self._drop(notice.payload)
            except Exception as exc:
                if self._stop.is_set():
                    return
                if not lost:
                    log.warning("cache listener lost its connection, reconnecting: %s",
                                str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                lost = True
                log.debug("cache listener reconnect failed", exc_info=True)
            self._listening.clear()
            self.local.clear()
            self._stop.wait(_RECONNECT_S)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._wake_listener()
            self._thread.join(timeout=5)

    def _wake_listener(self) -> None:
        try:  # the pool, not db.connection(): the database is already marked closed
            with self.db.pool.connection(timeout=1) as conn:
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, _WAKE))
        except Exception:  # the listener then stops at the end of its poll
            log.debug("could not wake the cache listener", exc_info=True)

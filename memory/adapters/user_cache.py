"""A per-process cache of users' in-memory indexes, bounded by bytes, least recently used out.

The vector and text indexes keep a user's search structures here (cached_vectors.py,
cached_text.py) and check them against the file's change log (index_log.py) on every search,
so the cache changes speed only, never answers. One budget serves every index of the process
(`shared_cache()`, `DEFAULT_CACHE_BYTES`), independent of `MemoryConfig`: it is a property of
the process's memory, not of a store. Each index passes its own `owner` token, so two stores in
one process never see each other's entries.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from .index_log import Change, changes, state

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CACHE_BYTES", "REFUSED_SECONDS", "Builder", "Cached", "ReadersThenScrub",
    "Replayable", "UserCache", "attach_cache", "current_entry", "shared_cache",
]

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
# A copy found larger than the whole budget is not read again for this long (or until the
# budget changes): reading it costs seconds of CPU and it would be thrown away each time.
REFUSED_SECONDS = 600.0


class Cached(Protocol):
    @property
    def nbytes(self) -> int: ...


class UserCache:
    """(owner, user) -> entry, evicting the least recently used past `max_bytes`. An entry's
    size is read when it is put; call `resize` after changing it in place."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[Hashable, str], tuple[Cached, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # (owner, user) -> (budget, monotonic time) of a copy refused as larger than the budget
        self._refused: dict[tuple[Hashable, str], tuple[int, float]] = {}

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, owner: Hashable, user: str) -> Cached | None:
        with self._lock:
            hit = self._entries.get((owner, user))
            if hit is None:
                return None
            self._entries.move_to_end((owner, user))
            return hit[0]

    def put(self, owner: Hashable, user: str, entry: Cached) -> None:
        """Keep `entry` unless it alone is larger than the whole budget."""
        size = entry.nbytes
        with self._lock:
            self._pop((owner, user))
            if size > self.max_bytes:
                self._refused[(owner, user)] = (self.max_bytes, time.monotonic())
                return
            self._refused.pop((owner, user), None)
            self._entries[(owner, user)] = (entry, size)
            self._bytes += size
            self._evict()

    def resize(self, owner: Hashable, user: str) -> None:
        with self._lock:
            hit = self._entries.get((owner, user))
            if hit is None:
                return
            size = hit[0].nbytes
            self._bytes += size - hit[1]
            self._entries[(owner, user)] = (hit[0], size)
            self._evict()

    def refused(self, owner: Hashable, user: str) -> bool:
        """The user's copy was lately found larger than the whole budget (see `put`)."""
        with self._lock:
            hit = self._refused.get((owner, user))
            if hit is None:
                return False
            if hit[0] != self.max_bytes or time.monotonic() - hit[1] > REFUSED_SECONDS:
                del self._refused[(owner, user)]
                return False
            return True

    def drop(self, owner: Hashable, user: str) -> None:
        with self._lock:
            self._pop((owner, user))
            self._refused.pop((owner, user), None)

    def drop_owner(self, owner: Hashable) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[0] == owner]:
                self._pop(key)
            for key in [k for k in self._refused if k[0] == owner]:
                del self._refused[key]

    def _pop(self, key: tuple[Hashable, str]) -> None:
        gone = self._entries.pop(key, None)
        if gone is not None:
            self._bytes -= gone[1]

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            _, (_, size) = self._entries.popitem(last=False)
            self._bytes -= size


_shared: UserCache | None = None
_shared_lock = threading.Lock()


def shared_cache() -> UserCache:
    """The process's cache, made on first use with `DEFAULT_CACHE_BYTES`."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = UserCache()
        return _shared


def attach_cache(index: object, cache: UserCache | bool) -> tuple[UserCache | None, object]:
    """The cache an index's `cache` argument names (True: the process's shared one; False: none)
    and the index's owner key in it, whose entries go when the index is collected."""
    chosen = shared_cache() if cache is True else cache if isinstance(cache, UserCache) else None
    owner = object()
    if chosen is not None:
        weakref.finalize(index, chosen.drop_owner, owner)
    return chosen, owner


class ReadersThenScrub:
    """Searches read a copy's arrays outside its lock, so a removed row is zeroed (`_scrub`)
    only once no search that began before the removal, and may still weigh it, is running."""

    lock: threading.Lock
    _readers: int

    def _scrub(self) -> None:
        raise NotImplementedError

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self.lock:
            self._readers += 1
        try:
            yield
        finally:
            with self.lock:
                self._readers -= 1
                if self._readers == 0:
                    self._scrub()


class Replayable(Cached, Protocol):
    """An in-memory copy of one user's index at `seq`, which can catch up on the change log."""

    seq: int
    lock: threading.Lock

    def replay(self, conn: Any, changes: list[Change]) -> None: ...


E = TypeVar("E", bound=Replayable)


class Builder:
    """Builds copies on background threads, one at a time per (owner, user): a heavy user's
    copy takes seconds to read (100k rows: ~7 s for vectors, ~15 s for text on the loaded 2-core
    Xeon), and recall has a 2 s budget, so until it is ready the file answers."""

    def __init__(self) -> None:
        self._running: dict[tuple[Hashable, str], threading.Thread] = {}
        self._lock = threading.Lock()

    def start(self, key: tuple[Hashable, str], job: Callable[[], None]) -> None:
        with self._lock:
            if key in self._running:
                return

            def run() -> None:
                try:
                    job()
                except Exception:  # the file keeps answering; the next search tries again
                    log.warning("could not build the in-memory copy of a user", exc_info=True)
                finally:
                    with self._lock:
                        self._running.pop(key, None)

            thread = threading.Thread(target=run, name="headroom-index-copy", daemon=True)
            self._running[key] = thread
        thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the builds under way (tests, benchmarks, warm-ups)."""
        with self._lock:
            threads = list(self._running.values())
        for thread in threads:
            thread.join(timeout)


def current_entry(
    cache: UserCache, owner: Hashable, conn: Any, index: str, user: str,
    build: Callable[[Any, int], E], *,
    background: tuple[Builder, Callable[[], Any], Callable[[], bool]] | None = None,
) -> E | None:
    """The user's copy, brought up to the file's state; None means "search the file": inside a
    write transaction (whose rows may still roll back, and whose seqs may then be reused), when
    the log holds no rows of the user, or while `background` = (builder, a factory of private
    connections, whether this user is worth it) builds the copy on another thread, or when
    the copy cannot be read or brought up to date (the search must not fail for want of a
    copy: it is dropped, and the next search reads it anew). One indexed SELECT when the copy
    is current."""
    if conn.in_transaction:
        return None
    try:
        return _current(cache, owner, conn, index, user, build, background)
    except Exception:
        log.warning("could not bring a user's in-memory index copy up to date; the file"
                    " answers", exc_info=True)
        cache.drop(owner, user)
        return None


def _current(
    cache: UserCache, owner: Hashable, conn: Any, index: str, user: str,
    build: Callable[[Any, int], E],
    background: tuple[Builder, Callable[[], Any], Callable[[], bool]] | None,
) -> E | None:
    found = state(conn, index, user)
    if found is None:
        cache.drop(owner, user)
        return None
    seq = found[0]
    entry = cache.get(owner, user)
    if entry is not None:
        with entry.lock:
            if entry.seq == seq:
                return entry  # type: ignore[return-value]
            # The state is read again inside the snapshot: between the read above and this
            # one another connection may have trimmed the log past the copy, or purged the
            # user and started a new log, and replaying then would keep rows it removed.
            with _snapshot(conn):  # the state, the log and the rows it names, as of one moment
                now = state(conn, index, user)
                replayable = now is not None and entry.seq >= now[1] - 1
                if now is not None and replayable:
                    entry.replay(conn, changes(conn, index, user, entry.seq))
                    entry.seq = max(entry.seq, now[0])
            if now is None:
                cache.drop(owner, user)
                return None
            if replayable:
                cache.resize(owner, user)
                return entry  # type: ignore[return-value]
    if cache.refused(owner, user):
        return None  # too large for the budget: the file answers, as without a cache
    if background is not None and background[2]():
        builder, connection, _ = background

        def job() -> None:
            private = connection()  # its own: closing the store's must not pull it away
            try:
                _build(cache, owner, private, index, user, build)
            finally:
                private.close()

        builder.start((owner, user), job)
        return None
    return _build(cache, owner, conn, index, user, build)


def _build(
    cache: UserCache, owner: Hashable, conn: Any, index: str, user: str,
    build: Callable[[Any, int], E],
) -> E | None:
    with _snapshot(conn):  # a copy and its seq read as of one moment, across its tables
        found = state(conn, index, user)
        if found is None:
            return None
        fresh = build(conn, found[0])
    cache.put(owner, user, fresh)
    return fresh


@contextmanager
def _snapshot(conn: Any) -> Iterator[None]:
    """One read transaction (WAL: a snapshot, taking no write lock) around several SELECTs."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")

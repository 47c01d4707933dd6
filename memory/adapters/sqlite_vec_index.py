"""The sqlite-vec `VectorIndex`: current memories only, small users exact, large users in vec0.

`user_id` is a vec0 partition key, so a KNN query reads one user's vectors (measured ~4.6 ms for
k=10 over 100k vectors vs ~97 ms unpartitioned); scope and category are vec0 metadata columns
used as pre-filters inside the same KNN query.

vec0 allocates storage a chunk at a time *per partition*: a chunk of 128 vectors is ~200 KiB at
384 dimensions, paid by every new user id, however few memories it has (issue 9: any client
could fill the disk by inventing user ids). So a user's vectors first go to a plain table,
`memory_vectors_compact` (one ~1.6 KB row each), searched exactly with `vec_distance_cosine`;
once a user holds `compact_limit` vectors there they move into the user's vec0 partition in one
go, filling a chunk. A search reads both tables and merges them, so a vector is found wherever it
is. Measured on the 2-core Xeon (384 dimensions, k=10): an exact search over 128 compact rows
~0.3 ms (512 rows 1.3 ms, 1,024 rows 6.4 ms, hence the limit of 128); the file grows by
~209 KB per new user with one memory before, ~4.7 KB after; a 10k-memory user's KNN p50 is the
same (22.9 ms before, 21.1 ms after, same top 10 for 300 of 300 queries, interleaved runs).

vec0 is brute force, though, and picks each chunk's top k with a k x n selection, so a heavy
user's search grows with their vectors (issue 14: 57 ms at 100k). Once a user's partition
reaches `heavy_limit` vectors, their vectors move out of vec0 into the heavy tier
(`heavy_vectors.HeavyVectors`: a numpy scan of sign bits, then an exact float re-rank of the
nearest few hundred); the move happens in the add that crosses the limit, in its transaction,
and migration m005 moves the users an older file already has past it.

Searches outside a write transaction are answered from a per-process copy of the user's
vectors in memory (cached_vectors.py: exact numpy cosine, or sign bits then an exact re-rank
for users of `BITS_FROM` rows and more), checked against the file's per-user change log
(index_log.py) on every search, so a row another process removed is never returned and one it
added is never missed. Every add and remove here writes that log in its transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ..db import Database, connect
from ..errors import ConfigError
from ..migrations import migrate
from ..models import MemoryCategory
from . import index_log
from .cached_vectors import BITS_FROM, UserVectors, read_rows
from .heavy_vectors import HEAVY_LIMIT, HeavyVectors, move_to_heavy
from .user_cache import Builder, UserCache, attach_cache, current_entry

log = logging.getLogger(__name__)

__all__ = ["BITS_FROM", "COMPACT_LIMIT", "HEAVY_LIMIT", "SqliteVecIndex"]

_LOG = "vector"  # this index's name in the change log
_TABLE = "memory_vectors"
_COMPACT = "memory_vectors_compact"
COMPACT_LIMIT = 128


def _filters(
    scope_keys: Sequence[str] | None, categories: Sequence[MemoryCategory] | None
) -> tuple[str, list[object]]:
    sql = ""
    params: list[object] = []
    if scope_keys is not None:
        sql += f" AND scope_key IN ({','.join('?' * len(scope_keys))})"
        params.extend(scope_keys)
    if categories:
        sql += f" AND category IN ({','.join('?' * len(categories))})"
        params.extend(c.value for c in categories)
    return sql, params


class SqliteVecIndex:
    def __init__(
        self, db: Database, dimension: int, chunk_size: int = 128, *,
        compact_limit: int = COMPACT_LIMIT, heavy_limit: int = HEAVY_LIMIT,
        oversample: int = 20, min_candidates: int = 500,
        cache: UserCache | bool = True, bits_from: int = BITS_FROM,
    ) -> None:
        """`cache`: True for the process's shared cache (user_cache.DEFAULT_CACHE_BYTES), a
        `UserCache` of one's own, or False to search the file every time."""
        if compact_limit < 1:
            raise ConfigError("compact_limit must be at least 1")
        if heavy_limit < compact_limit:
            raise ConfigError("heavy_limit must be at least compact_limit")
        self.db = db
        self.dimension = dimension
        self.compact_limit = compact_limit
        self.heavy_limit = heavy_limit
        self.heavy = HeavyVectors(
            lambda: db.conn, dimension, oversample=oversample, min_candidates=min_candidates
        )
        self.oversample = oversample
        self.min_candidates = min_candidates
        self.bits_from = bits_from
        self.cache, self._owner = attach_cache(self, cache)
        self.builder = Builder()  # heavy users' copies are read on a background thread
        conn = db.conn
        migrate(conn)  # the compact table; a read only, once the store has migrated the file
        row = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = ?", (_TABLE,)
        ).fetchone()
        if row is None:
            conn.execute(
                f"CREATE VIRTUAL TABLE IF NOT EXISTS {_TABLE} USING vec0("
                " user_id text partition key,"
                f" embedding float[{dimension}] distance_metric=cosine,"
                " scope_key text,"
                " category text,"
                f" chunk_size={int(chunk_size)})"
            )
            self._index_partitions()
        elif f"float[{dimension}]" not in row[0]:
            raise ConfigError(
                f"this database's vectors were made by a model with another dimension than "
                f"{dimension}; use the embedder it was created with, or export and re-import "
                "the memories (import re-embeds them)"
            )

    def _index_partitions(self) -> None:
        """sqlite-vec finds a user's chunks by scanning its chunk table; an index on the
        partition column makes that a lookup (measured ~1 ms less per KNN at 1k users). The
        table is sqlite-vec's own, so a version that names it differently only loses speed."""
        try:
            self.db.conn.execute(
                f"CREATE INDEX IF NOT EXISTS {_TABLE}_chunks_by_user"
                f" ON {_TABLE}_chunks(partition00, chunk_id)"
            )
        except Exception as exc:  # pragma: no cover - another sqlite-vec layout
            log.warning("could not index sqlite-vec partitions (%s); searches stay correct", exc)

    def add(
        self, rowid: int, user_id: str, scope_key: str, category: MemoryCategory,
        embedding: np.ndarray,
    ) -> None:
        vector = np.asarray(embedding, dtype=np.float32)
        if vector.shape != (self.dimension,):
            raise ConfigError(
                f"embedding has dimension {vector.shape}, the index expects {self.dimension}"
            )
        with self.db.transaction():  # joins the caller's: the moves below are all or nothing
            conn = self.db.conn
            index_log.record(conn, _LOG, user_id, index_log.ADD, (rowid,))
            heavy_user = self.heavy.user(user_id)
            if heavy_user is not None:
                self.heavy.add(rowid, heavy_user, scope_key, category, vector)
                return
            conn.execute(
                f"INSERT INTO {_COMPACT}(rowid, user_id, scope_key, category, embedding)"
                " VALUES (?, ?, ?, ?, ?)",
                (rowid, user_id, scope_key, category.value, vector.tobytes()),
            )
            held = conn.execute(
                f"SELECT count(*) FROM {_COMPACT} WHERE user_id = ?", (user_id,)
            ).fetchone()[0]
            if held >= self.compact_limit:
                self._move_to_partition(user_id)

    def _move_to_partition(self, user_id: str) -> None:
        conn = self.db.conn
        conn.execute(
            f"INSERT INTO {_TABLE}(rowid, user_id, embedding, scope_key, category)"
            f" SELECT rowid, user_id, embedding, scope_key, category FROM {_COMPACT}"
            " WHERE user_id = ? ORDER BY rowid",
            (user_id,),
        )
        conn.execute(f"DELETE FROM {_COMPACT} WHERE user_id = ?", (user_id,))
        held = conn.execute(
            f"SELECT count(*) FROM {_TABLE} WHERE user_id = ?", (user_id,)
        ).fetchone()[0]
        if held >= self.heavy_limit:
            move_to_heavy(conn, self.heavy, user_id)

    def remove(self, rowids: Sequence[int]) -> None:
        ids = [int(r) for r in rowids]
        if not ids:
            return
        params = [(r,) for r in ids]
        with self.db.transaction():  # the log and the rows commit together
            conn = self.db.conn
            owners: dict[str, list[int]] = {}
            for row in self._owners(ids):
                owners.setdefault(row[1], []).append(row[0])
            conn.executemany(f"DELETE FROM {_COMPACT} WHERE rowid = ?", params)
            conn.executemany(f"DELETE FROM {_TABLE} WHERE rowid = ?", params)
            self.heavy.remove(ids)
            for user_id, removed in owners.items():
                if self._holds_any(user_id):
                    index_log.record(conn, _LOG, user_id, index_log.REMOVE, removed)
                else:  # a purge leaves no log of the user behind
                    index_log.forget(conn, _LOG, user_id)

    def _owners(self, rowids: list[int]) -> list[tuple[int, str]]:
        """(rowid, user_id) of those rowids this index holds."""
        conn = self.db.conn
        out: list[tuple[int, str]] = []
        for start in range(0, len(rowids), 500):
            part = rowids[start : start + 500]
            marks = ",".join("?" * len(part))
            for table in (_COMPACT, "memory_vectors_heavy"):
                out += [(int(r[0]), str(r[1])) for r in conn.execute(
                    f"SELECT rowid, user_id FROM {table} WHERE rowid IN ({marks})", part
                ).fetchall()]
        found = {r for r, _ in out}
        for rid in rowids:
            if rid not in found:
                row = conn.execute(
                    f"SELECT rowid, user_id FROM {_TABLE} WHERE rowid = ?", (rid,)
                ).fetchone()
                if row is not None:
                    out.append((int(row[0]), str(row[1])))
        return out

    def _holds_any(self, user_id: str) -> bool:
        conn = self.db.conn
        return any(
            conn.execute(f"SELECT 1 FROM {t} WHERE user_id = ? LIMIT 1", (user_id,)).fetchone()
            for t in (_COMPACT, "memory_vectors_heavy", _TABLE)
        )

    def search(
        self, embedding: np.ndarray, user_id: str, *, scope_keys: Sequence[str] | None,
        categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        if self.cache is not None:
            entry = self._copy(user_id, background=True)
            if entry is not None:
                try:
                    return entry.search(
                        embedding, scope_keys=scope_keys, categories=categories, k=k
                    )
                except Exception:  # the copy changes speed only: the file answers instead
                    log.warning("searching a user's in-memory vectors failed", exc_info=True)
                    self.cache.drop(self._owner, user_id)
        heavy_user = self.heavy.user(user_id)
        if heavy_user is not None:  # a heavy user has no vectors in the other tables
            return self.heavy.search(
                np.asarray(embedding, dtype=np.float32), heavy_user,
                scope_keys=scope_keys, categories=categories, k=k,
            )
        query = np.asarray(embedding, dtype=np.float32).tobytes()
        where, params = _filters(scope_keys, categories)
        conn = self.db.conn
        compact = conn.execute(
            f"SELECT rowid, vec_distance_cosine(embedding, ?) AS distance FROM {_COMPACT}"
            f" WHERE user_id = ?{where} ORDER BY distance LIMIT ?",
            [query, user_id, *params, k],
        ).fetchall()
        partition = conn.execute(
            f"SELECT rowid, distance FROM {_TABLE}"
            f" WHERE embedding MATCH ? AND k = ? AND user_id = ?{where} ORDER BY distance",
            [query, k, user_id, *params],
        ).fetchall()
        hits = sorted(
            ((float(r[1]), int(r[0])) for r in (*compact, *partition)), key=lambda h: h[0]
        )
        return [(rowid, 1.0 - distance) for distance, rowid in hits[:k]]

    def _copy(self, user_id: str, *, background: bool) -> UserVectors | None:
        """The user's in-memory copy, current; None: search the file (see current_entry). A
        heavy-tier user's first copy is read on a background thread, others' right here."""
        assert self.cache is not None
        return current_entry(
            self.cache, self._owner, self.db.conn, _LOG, user_id,
            lambda conn, seq: UserVectors(
                self.dimension, seq, read_rows(conn, user_id, None), bits_from=self.bits_from,
                oversample=self.oversample, min_candidates=self.min_candidates,
            ),
            background=(self.builder, lambda: connect(self.db.path),
                        lambda: self.heavy.user(user_id) is not None)
            if background and self.db.path != ":memory:" else None,
        )

    def warm(self, user_id: str) -> None:
        """Read the user's copy into memory now (a no-op without a cache, or when current)."""
        if self.cache is not None:
            self._copy(user_id, background=False)

    def count(self, user_id: str | None = None) -> int:
        conn = self.db.conn
        if user_id is None:
            return self.heavy.count() + sum(
                int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
                for t in (_COMPACT, _TABLE)
            )
        if self.heavy.user(user_id) is not None:
            return self.heavy.count(user_id)
        return sum(
            int(conn.execute(f"SELECT count(*) FROM {t} WHERE user_id = ?", (user_id,))
                .fetchone()[0])
            for t in (_COMPACT, _TABLE)
        )

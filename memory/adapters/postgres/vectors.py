"""The pgvector `VectorIndex`: current memories' vectors, searched per user, an HNSW graph per
large user.

Every search filters by user (and scope and category) inside its one statement. A user with
fewer than `exact_below` vectors (the common case: 1M memories over 10k users is ~100 each) is
searched exactly over their own rows, found through the `user_id` index: at that size it is
faster than any graph walk and never misses a row (the `OFFSET 0` fence keeps the planner from
answering the ORDER BY any other way).

A user past `exact_below` gets an HNSW graph of their own: a partial index `WHERE user_id = …`
built with `hnsw_m` and `hnsw_ef_construction`, searched with `SET LOCAL hnsw.ef_search`. One
graph over every user would be walked first and filtered after (pgvector 0.6), so a user holding
a small share of the table would get fewer than `k` of their rows back, and every write would
pay for a graph insert (measured ~15 ms per row with pgserver's pgvector, against 0.15 ms for the
plain row). Per-user graphs keep one user's search off everyone else's rows and cost only the
writes of users large enough to need them.

Whether a user is large is learned without a statement of its own: the exact search counts the
user's rows as it scans them (a window count in the same statement), and a batch's dedup lookups
(`nearest_many`) count the users they have not seen for `_RECOUNT_S` seconds in one statement.
A user known large is searched through their graph; a user who grows past `exact_below` (through
any replica) is found large by their next exact search.

The first search that finds a large user without a graph starts building it in the background
(`CREATE INDEX CONCURRENTLY` on its own connection, so writes go on; a session advisory lock
makes one replica build it) and answers exactly meanwhile. `build_graph` does it synchronously.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from ...errors import ConfigError
from ...models import MemoryCategory
from .connection import PgDatabase
from .deferred import BulkInsert, deferred_writes
from .schema import ensure_vector_table

log = logging.getLogger(__name__)

_RECOUNT_S = 60.0  # how long a count that found a user small is trusted
_MAX_COUNTED = 100_000  # users whose counts are remembered (forgotten all at once past it)

__all__ = ["PgVectorIndex", "graph_name"]

_INSERT_VECTORS = BulkInsert(
    "memory_vectors", ("rid", "user_id", "scope_key", "category", "embedding"),
    ("int8", "text", "text", "text", "vector"),
)


def graph_name(user_id: str) -> str:
    """The name of a user's HNSW index (a digest: user ids are not identifiers)."""
    return "memory_vectors_g_" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:24]


class PgVectorIndex:
    # Searches wait on the server, so recall runs this one and the text search at once
    # (`Retrieval.hybrid_search`); in-process indexes would only take turns on the GIL.
    answers_from_server = True

    def __init__(
        self, db: PgDatabase, dimension: int, *, hnsw_m: int = 16,
        hnsw_ef_construction: int = 64, hnsw_ef_search: int = 40, exact_below: int = 10_000,
    ) -> None:
        if hnsw_m < 2 or hnsw_ef_construction < 2 * hnsw_m or hnsw_ef_search < 1:
            raise ConfigError(
                "hnsw_m must be at least 2, hnsw_ef_construction at least twice hnsw_m, and "
                "hnsw_ef_search at least 1"
            )
        self.db = db
        self.dimension = dimension
        self.m = hnsw_m
        self.ef_construction = hnsw_ef_construction
        self.ef_search = hnsw_ef_search
        self.exact_below = exact_below
        self._graphs: set[str] = set()  # users whose graph is known to be built
        # Users seen past `exact_below`: counting 10k index entries per search would cost more
        # than the search. A user who shrinks again stays here, which only means a graph walk.
        self._large: set[str] = set()
        # Small users: (vectors counted + added here since, when counted).
        self._counted: dict[str, tuple[int, float]] = {}
        self.deferred = deferred_writes(db)
        self._building: dict[str, threading.Thread] = {}
        self._builders: set[psycopg.Connection[Any]] = set()
        self._lock = threading.Lock()
        self._closing = False
        ensure_vector_table(db, dimension)
        db.on_close(self._stop_builds)

    def _checked(self, embedding: np.ndarray) -> np.ndarray:
        vector = np.asarray(embedding, dtype=np.float32)
        if vector.shape != (self.dimension,):
            raise ConfigError(
                f"embedding has dimension {vector.shape}, the index expects {self.dimension}"
            )
        return vector

    def add(
        self, rowid: int, user_id: str, scope_key: str, category: MemoryCategory,
        embedding: np.ndarray,
    ) -> None:
        self.deferred.defer_row(
            _INSERT_VECTORS, user_id,
            (rowid, user_id, scope_key, category.value, self._checked(embedding)),
        )
        with self._lock:
            counted = self._counted.get(user_id)
            if counted is not None:
                self._counted[user_id] = (counted[0] + 1, counted[1])

    def remove(self, rowids: Sequence[int]) -> None:
        self.deferred.flush("memory_vectors")
        if rowids:
            self.db.execute(
                "DELETE FROM memory_vectors WHERE rid = ANY(%s)", ([int(r) for r in rowids],)
            )

    # --- search -----------------------------------------------------------------------------

    def search(
        self, embedding: np.ndarray, user_id: str, *, scope_keys: Sequence[str] | None,
        categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        self.deferred.flush("memory_vectors", user_id)
        query = np.asarray(embedding, dtype=np.float32)
        extra = ""
        params: list[Any] = []
        if scope_keys is not None:
            extra += " AND scope_key = ANY(%s)"
            params.append(list(scope_keys))
        if categories:
            extra += " AND category = ANY(%s)"
            params.append([c.value for c in categories])
        if user_id in self._large or user_id in self._graphs:
            if self.has_graph(user_id):
                rows = self._graph_search(query, user_id, extra, params, k)
                if len(rows) >= k:  # scope or category may filter the walk's rows away
                    return rows
            else:
                self.build_graph_soon(user_id)
        # The exact scan reads all of the user's rows anyway, so it counts them too (before
        # scope and category filter them): no count statement to learn whether they are large.
        found = self.db.fetchall(
            "SELECT rid, distance, n FROM (SELECT rid, scope_key, category,"
            " embedding <=> %b AS distance, count(*) OVER () AS n"
            " FROM memory_vectors WHERE user_id = %s OFFSET 0) mine"
            f" WHERE true{extra} ORDER BY distance, rid LIMIT %s",
            [query, user_id, *params, k], binary=True,
        )
        if found:
            with self._lock:
                large = self._remember_count(user_id, int(found[0][2]))
            if large and user_id not in self._graphs:
                self.build_graph_soon(user_id)
        return [(int(r[0]), 1.0 - float(r[1])) for r in found]

    def nearest_many(
        self, probes: Sequence[tuple[str, np.ndarray]]
    ) -> list[tuple[int, float] | None]:
        """The top hit of `search(vector, user_id, k=1)` for each (user_id, vector): one
        statement for every small user's probes (after one count of the users whose size is
        not known), `search` itself for a large user's."""
        if not probes:
            return []
        self.deferred.flush("memory_vectors")
        self._count_users([u for u, _ in probes])
        found: list[tuple[int, float] | None] = [None] * len(probes)
        small = [i for i, (u, _) in enumerate(probes) if not self._is_large(u)]
        for i in sorted(set(range(len(probes))) - set(small)):
            user_id, vector = probes[i]
            hits = self.search(vector, user_id, scope_keys=None, categories=None, k=1)
            found[i] = hits[0] if hits else None
        if small:
            rows = self.db.fetchall(
                "SELECT q.n, v.rid, v.distance FROM unnest(%s::text[], %b::vector[])"
                " WITH ORDINALITY AS q(user_id, embedding, n) CROSS JOIN LATERAL ("
                " SELECT rid, distance FROM (SELECT rid, embedding <=> q.embedding AS distance"
                "  FROM memory_vectors WHERE user_id = q.user_id OFFSET 0) mine"
                " ORDER BY distance, rid LIMIT 1) v",
                ([probes[i][0] for i in small],
                 [np.asarray(self._checked(probes[i][1]), dtype=np.float32) for i in small]),
            )
            for n, rid, distance in rows:
                found[small[int(n) - 1]] = (int(rid), 1.0 - float(distance))
        return found

    def _count_users(self, user_ids: Sequence[str]) -> None:
        """Count, in one statement, the users `_is_large` would count one by one."""
        now = time.monotonic()
        with self._lock:
            stale = sorted({
                u for u in user_ids
                if u not in self._large and (
                    (c := self._counted.get(u)) is None or c[0] >= self.exact_below
                    or now - c[1] >= _RECOUNT_S
                )
            })
        if not stale:
            return
        rows = self.db.fetchall(
            "SELECT u, (SELECT count(*) FROM (SELECT 1 FROM memory_vectors WHERE user_id = u"
            " LIMIT %s) s) FROM unnest(%s::text[]) AS w(u)",
            (self.exact_below, stale),
        )
        with self._lock:
            for user_id, n in rows:
                self._remember_count(user_id, int(n))

    def _remember_count(self, user_id: str, n: int) -> bool:
        """Record a count (call holding `_lock`); whether the user is large."""
        if n < self.exact_below:
            if len(self._counted) >= _MAX_COUNTED:
                self._counted.clear()
            self._counted[user_id] = (n, time.monotonic())
            return False
        self._counted.pop(user_id, None)
        self._large.add(user_id)
        return True

    def _graph_search(
        self, query: np.ndarray, user_id: str, extra: str, params: list[Any], k: int
    ) -> list[tuple[int, float]]:
        with self.db.transaction(), self.db.connection() as conn:
            conn.execute(f"SET LOCAL hnsw.ef_search = {int(max(self.ef_search, k))}")
            # The user id is a literal, not a parameter: the planner matches a partial index
            # only against a predicate it can see, whatever plan it caches.
            mine = sql.Literal(user_id).as_string(conn).replace("%", "%%")
            rows = self.db.fetchall(
                f"SELECT rid, embedding <=> %b FROM memory_vectors WHERE user_id = {mine}{extra}"
                " ORDER BY embedding <=> %b LIMIT %s",
                [query, *params, query, k], binary=True,
            )
        return [(int(r[0]), 1.0 - float(r[1])) for r in rows]

    def _is_large(self, user_id: str) -> bool:
        """Whether the user has at least `exact_below` vectors (counting stops there)."""
        if user_id in self._large:
            return True
        with self._lock:
            counted = self._counted.get(user_id)
        if (counted is not None and counted[0] < self.exact_below
                and time.monotonic() - counted[1] < _RECOUNT_S):
            return False
        n = int(self.db.scalar(
            "SELECT count(*) FROM (SELECT 1 FROM memory_vectors WHERE user_id = %s LIMIT %s) s",
            (user_id, self.exact_below),
        ))
        with self._lock:
            return self._remember_count(user_id, n)

    # --- per-user graphs --------------------------------------------------------------------

    def has_graph(self, user_id: str) -> bool:
        if user_id in self._graphs:
            return True
        valid = self.db.scalar(
            "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid ="
            " to_regclass(quote_ident(current_schema()) || '.' || %s)",
            (graph_name(user_id),),
        )
        if valid:
            self._graphs.add(user_id)
        return bool(valid)

    def build_graph_soon(self, user_id: str) -> None:
        """Build the user's graph on a background thread (once per process at a time)."""
        with self._lock:
            if self._closing or user_id in self._building:
                return
            thread = threading.Thread(
                target=self._build_logged, args=(user_id,), name="headroom-hnsw-build",
                daemon=True,
            )
            self._building[user_id] = thread
        thread.start()

    def _build_logged(self, user_id: str) -> None:
        try:
            self.build_graph(user_id)
        except Exception:
            if not self._closing:
                log.warning("building a user's HNSW graph failed; searches stay exact",
                            exc_info=True)
        finally:
            with self._lock:
                self._building.pop(user_id, None)

    def build_graph(self, user_id: str) -> bool:
        """Build the user's HNSW graph now, without blocking writes; False if another replica
        is building it. A build cut short (an invalid index) is dropped and redone."""
        name = graph_name(user_id)
        conn = psycopg.connect(self.db.url, autocommit=True)
        with self._lock:
            self._builders.add(conn)
        try:
            got = conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended("
                "'headroom:graph:' || current_schema() || ':' || %s, 0))",
                (user_id,),
            ).fetchone()
            if not (got and got[0]):
                return False
            try:
                state = conn.execute(
                    "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid ="
                    " to_regclass(quote_ident(current_schema()) || '.' || %s)",
                    (name,),
                ).fetchone()
                if state is not None and not state[0]:
                    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY {}").format(sql.Identifier(name)))
                if state is None or not state[0]:
                    conn.execute(sql.SQL(
                        "CREATE INDEX CONCURRENTLY {} ON memory_vectors"
                        " USING hnsw (embedding vector_cosine_ops)"
                        " WITH (m = {}, ef_construction = {}) WHERE user_id = {}"
                    ).format(
                        sql.Identifier(name), sql.Literal(self.m),
                        sql.Literal(self.ef_construction), sql.Literal(user_id),
                    ))
                    log.info("built an HNSW graph for a user with %d+ vectors", self.exact_below)
            finally:
                conn.execute(
                    "SELECT pg_advisory_unlock(hashtextextended("
                    "'headroom:graph:' || current_schema() || ':' || %s, 0))",
                    (user_id,),
                )
            self._graphs.add(user_id)
            return True
        finally:
            with self._lock:
                self._builders.discard(conn)
            conn.close()

    def _stop_builds(self) -> None:
        """On close: cancel builds in flight (an index cut short is redone next time)."""
        with self._lock:
            self._closing = True
            builders = list(self._builders)
            threads = list(self._building.values())
        for conn in builders:
            try:
                conn.cancel_safe()
            except Exception:  # pragma: no cover - the connection is already gone
                log.debug("cancelling a graph build failed", exc_info=True)
        for thread in threads:
            thread.join(timeout=10)

    def count(self, user_id: str | None = None) -> int:
        self.deferred.flush("memory_vectors", user_id)
        if user_id is None:
            return int(self.db.scalar("SELECT count(*) FROM memory_vectors"))
        return int(
            self.db.scalar("SELECT count(*) FROM memory_vectors WHERE user_id = %s", (user_id,))
        )

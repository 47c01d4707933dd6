"""The pgvector `VectorIndex`: current memories' vectors, an HNSW index, per-user search.

Every search filters by user (and scope and category) inside its one statement. Two plans:

- A user with fewer than `exact_below` vectors (the common case: 1M memories over 10k users is
  ~100 each) is searched exactly over their own rows, found through the `user_id` index. That is
  faster than any graph walk at that size and never misses a row. The `OFFSET 0` fence keeps
  the planner from answering the ORDER BY through the HNSW index instead.
- A larger user's search walks the HNSW graph (`hnsw_m` / `hnsw_ef_construction` built it,
  `hnsw_ef_search` is set per transaction with `SET LOCAL`). pgvector 0.6 filters after the walk,
  so a walk can come back with fewer than `k` of this user's rows when they are a small share of
  the table; then the exact plan answers instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ...errors import ConfigError
from ...models import MemoryCategory
from .connection import PgDatabase
from .schema import ensure_vector_table

__all__ = ["PgVectorIndex"]


class PgVectorIndex:
    def __init__(
        self, db: PgDatabase, dimension: int, *, hnsw_m: int = 16,
        hnsw_ef_construction: int = 64, hnsw_ef_search: int = 40, exact_below: int = 10_000,
    ) -> None:
        self.db = db
        self.dimension = dimension
        self.ef_search = hnsw_ef_search
        self.exact_below = exact_below
        ensure_vector_table(db, dimension, m=hnsw_m, ef_construction=hnsw_ef_construction)

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
        self.db.execute(
            "INSERT INTO memory_vectors(rid, user_id, scope_key, category, embedding)"
            " VALUES (%s, %s, %s, %s, %s)",
            (rowid, user_id, scope_key, category.value, self._checked(embedding)),
        )

    def remove(self, rowids: Sequence[int]) -> None:
        if rowids:
            self.db.execute(
                "DELETE FROM memory_vectors WHERE rid = ANY(%s)", ([int(r) for r in rowids],)
            )

    def search(
        self, embedding: np.ndarray, user_id: str, *, scope_keys: Sequence[str] | None,
        categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        query = np.asarray(embedding, dtype=np.float32)
        where = "user_id = %s"
        params: list[Any] = [user_id]
        if scope_keys is not None:
            where += " AND scope_key = ANY(%s)"
            params.append(list(scope_keys))
        if categories:
            where += " AND category = ANY(%s)"
            params.append([c.value for c in categories])
        if self._is_large(user_id):
            with self.db.transaction():
                self.db.execute(f"SET LOCAL hnsw.ef_search = {int(max(self.ef_search, k))}")
                rows = self.db.fetchall(
                    f"SELECT rid, embedding <=> %s FROM memory_vectors WHERE {where}"
                    " ORDER BY embedding <=> %s LIMIT %s",
                    [query, *params, query, k],
                )
            if len(rows) >= k:
                return [(int(r[0]), 1.0 - float(r[1])) for r in rows]
        rows = self.db.fetchall(
            "SELECT rid, distance FROM (SELECT rid, embedding <=> %s AS distance"
            f" FROM memory_vectors WHERE {where} OFFSET 0) mine"
            " ORDER BY distance, rid LIMIT %s",
            [query, *params, k],
        )
        return [(int(r[0]), 1.0 - float(r[1])) for r in rows]

    def _is_large(self, user_id: str) -> bool:
        """Whether the user has at least `exact_below` vectors (counting stops there)."""
        n = self.db.scalar(
            "SELECT count(*) FROM (SELECT 1 FROM memory_vectors WHERE user_id = %s LIMIT %s) s",
            (user_id, self.exact_below),
        )
        return int(n) >= self.exact_below

    def count(self, user_id: str | None = None) -> int:
        if user_id is None:
            return int(self.db.scalar("SELECT count(*) FROM memory_vectors"))
        return int(
            self.db.scalar("SELECT count(*) FROM memory_vectors WHERE user_id = %s", (user_id,))
        )

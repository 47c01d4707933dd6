"""The PostgreSQL `TextIndex`: tsvector + GIN over current memories, ranked by BM25.

`ts_rank_cd` knows nothing of how rare a word is, which is most of what makes a keyword hit
worth ranking (the recall ranker was fitted on FTS5's BM25). So the score is BM25 itself
(k1 = 1.2, b = 0.75, as FTS5), computed in the query from the matching documents' tsvectors:
term frequency from each lexeme's positions, document length stored at insert, and document
frequency, document count and mean length over the user's own documents. FTS5 takes those over
the whole table; per user they stay small and never read another user's rows. The idf is
Lucene's ln(1 + (N - n + 0.5) / (n + 0.5)), always positive, where FTS5 clamps a word found in
most documents to ~0.

Words are read as FTS5's adapter reads them (`fts_terms`: distinct words minus the adapter's stop
words, all words if only those are left), OR-ed, each through `plainto_tsquery`, never query
syntax. Diacritics are folded away in Python on both sides (FTS5's remove_diacritics; PostgreSQL's
unaccent is an extension a managed server may lack). Stemming is English snowball with no stop
words of its own (schema.TEXT_CONFIG).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

from ...models import MemoryCategory
from ..fts5_index import fts_terms
from .connection import PgDatabase
from .deferred import BulkInsert, deferred_writes
from .schema import TEXT_CONFIG

__all__ = ["PgTextIndex", "fold_diacritics"]

_K1 = 1.2
_B = 0.75
# The document length (tokens, for BM25's length normalisation) is counted once, at insert.
_INSERT_TEXT = BulkInsert(
    "memory_text", ("rid", "user_id", "scope_key", "category", "content"),
    ("int8", "text", "text", "text", "text"),
    select="r.rid, r.user_id, r.scope_key, r.category, v.tsv,"
    " coalesce((SELECT sum(coalesce(array_length(u.positions, 1), 1)) FROM unnest(v.tsv) u), 0)",
    lateral=f" CROSS JOIN LATERAL to_tsvector('{TEXT_CONFIG}', r.content) AS v(tsv)",
    targets=("rid", "user_id", "scope_key", "category", "tsv", "doc_len"),
)


def fold_diacritics(text: str) -> str:
    """`café` → `cafe`: decompose and drop the combining marks (letters of other scripts stay)."""
    if text.isascii():
        return text  # nothing to fold: the common case, and a char-by-char walk otherwise
    decomposed = unicodedata.normalize("NFKD", text)
    return unicodedata.normalize(
        "NFC", "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    )


class PgTextIndex:
    def __init__(self, db: PgDatabase, stop_words: frozenset[str] = frozenset()) -> None:
        self.db = db
        self.stop_words = stop_words
        self.deferred = deferred_writes(db)  # rows wait for the write transaction's next need

    def add(
        self, rowid: int, user_id: str, scope_key: str, category: MemoryCategory, content: str
    ) -> None:
        self.deferred.defer_row(
            _INSERT_TEXT, user_id,
            (rowid, user_id, scope_key, category.value, fold_diacritics(content)),
        )

    def remove(self, rowids: Sequence[int]) -> None:
        self.deferred.flush("memory_text")
        if rowids:
            self.db.execute(
                "DELETE FROM memory_text WHERE rid = ANY(%s)", ([int(r) for r in rowids],)
            )

    def search(
        self, query: str, user_id: str, *, scope_keys: Sequence[str] | None,
        categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]]:
        terms = [fold_diacritics(t) for t in fts_terms(query, self.stop_words)]
        if not terms or k <= 0:
            return []
        self.deferred.flush("memory_text", user_id)
        tsquery = " || ".join(f"plainto_tsquery('{TEXT_CONFIG}', %s)" for _ in terms)
        filters = ""
        params: list[Any] = [" ".join(terms), *terms, user_id, user_id]
        if scope_keys is not None:
            filters += " AND h.scope_key = ANY(%s)"
            params.append(list(scope_keys))
        if categories:
            filters += " AND h.category = ANY(%s)"
            params.append([c.value for c in categories])
        params.append(k)
        # Statistics come from all of the user's documents (as FTS5's from all of its table);
        # scope and category then choose which hits are returned.
        sql = f"""
            WITH terms AS (
                SELECT DISTINCT u.lexeme FROM unnest(to_tsvector('{TEXT_CONFIG}', %s)) u
            ),
            q AS (SELECT {tsquery} AS q),
            hits AS (
                SELECT t.rid, t.scope_key, t.category, t.tsv, t.doc_len
                FROM memory_text t, q WHERE t.user_id = %s AND t.tsv @@ q.q
            ),
            docs AS (
                SELECT count(*)::float8 AS n, greatest(avg(doc_len), 1)::float8 AS avgdl
                FROM memory_text WHERE user_id = %s
            ),
            tf AS (
                SELECT h.rid, h.scope_key, h.category, h.doc_len, u.lexeme,
                       coalesce(array_length(u.positions, 1), 1)::float8 AS f
                FROM hits h, unnest(h.tsv) u
                WHERE u.lexeme IN (SELECT lexeme FROM terms)
            ),
            df AS (SELECT lexeme, count(*)::float8 AS n FROM tf GROUP BY lexeme)
            SELECT h.rid, sum(
                ln(1 + (docs.n - df.n + 0.5) / (df.n + 0.5))
                * h.f * {_K1 + 1} / (h.f + {_K1} * (1 - {_B} + {_B} * h.doc_len / docs.avgdl))
            ) AS score
            FROM tf h JOIN df USING (lexeme) CROSS JOIN docs
            WHERE true{filters}
            GROUP BY h.rid ORDER BY score DESC, h.rid LIMIT %s
        """
        return [(int(r[0]), float(r[1])) for r in self.db.fetchall(sql, params)]

    def optimize(self) -> None:
        """Merge the GIN index's pending list into the index proper (what FTS5's 'optimize'
        does for its segments); a no-op when it is empty."""
        self.deferred.flush("memory_text")
        if self.db.in_transaction:
            self.db.execute("SELECT gin_clean_pending_list('memory_text_tsv'::regclass)")
            return
        self.db.execute("VACUUM memory_text")

    def count(self, user_id: str | None = None) -> int:
        self.deferred.flush("memory_text", user_id)
        if user_id is None:
            return int(self.db.scalar("SELECT count(*) FROM memory_text"))
        return int(
            self.db.scalar("SELECT count(*) FROM memory_text WHERE user_id = %s", (user_id,))
        )

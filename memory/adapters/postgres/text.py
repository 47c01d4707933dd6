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
syntax (the OR-ed query is built from those queries' own text form). Diacritics are folded
away in Python on both sides (FTS5's remove_diacritics; PostgreSQL's unaccent is an extension a
managed server may lack). Stemming is English snowball with no stop words of its own
(schema.TEXT_CONFIG).
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
_SCAN_BELOW = 2000  # a user's documents read one by one up to this many, else the GIN index
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
        filters = ""
        params: list[Any] = [" ".join(terms), terms, user_id, user_id, user_id]
        if scope_keys is not None:
            filters += " AND h.scope_key = ANY(%s)"
            params.append(list(scope_keys))
        if categories:
            filters += " AND h.category = ANY(%s)"
            params.append([c.value for c in categories])
        params.append(k)
        # Statistics come from all of the user's documents (as FTS5's from all of its table);
        # scope and category then choose which hits are returned. A user with few documents
        # (most: 1M memories over 10k users is ~100 each) has them read through the user_id
        # index and matched one by one; the planner would otherwise AND that index with the
        # GIN index, whose posting lists hold every user's matches (~20k rows of a common
        # word at 1M). Only a user past `_SCAN_BELOW` documents goes through the GIN index.
        # `docs.n` picks the branch when the statement runs (a one-time filter), so it stays
        # one statement, and its text is the same whatever the number of words (the words'
        # queries are OR-ed in SQL, as `q1 || q2 || ...` would), so it is prepared once per
        # connection. Each document's terms are summed in one order (lexeme) whatever the
        # plan, and scores equal to 9 decimals are ties broken by row key, so a plan change
        # never reorders equal scores by their last bit.
        sql = f"""
            WITH terms AS (
                SELECT DISTINCT u.lexeme FROM unnest(to_tsvector('{TEXT_CONFIG}', %s)) u
            ),
            q AS (
                SELECT string_agg('(' || w.q::text || ')', ' | ')::tsquery AS q
                FROM unnest(%s::text[]) AS t(word),
                     LATERAL plainto_tsquery('{TEXT_CONFIG}', t.word) AS w(q)
                WHERE numnode(w.q) > 0
            ),
            docs AS (
                SELECT count(*)::float8 AS n, greatest(avg(doc_len), 1)::float8 AS avgdl
                FROM memory_text WHERE user_id = %s
            ),
            hits AS (
                SELECT m.rid, m.scope_key, m.category, m.tsv, m.doc_len
                FROM (SELECT rid, scope_key, category, tsv, doc_len FROM memory_text
                      WHERE user_id = %s OFFSET 0) m, q
                WHERE m.tsv @@ q.q AND (SELECT n FROM docs) <= {_SCAN_BELOW}
                UNION ALL
                SELECT t.rid, t.scope_key, t.category, t.tsv, t.doc_len
                FROM memory_text t, q
                WHERE t.user_id = %s AND t.tsv @@ q.q AND (SELECT n FROM docs) > {_SCAN_BELOW}
            ),
            tf AS (
                SELECT h.rid, h.scope_key, h.category, h.doc_len, u.lexeme,
                       coalesce(array_length(u.positions, 1), 1)::float8 AS f
                FROM hits h, unnest(h.tsv) u
                WHERE u.lexeme IN (SELECT lexeme FROM terms)
            ),
            df AS (SELECT lexeme, count(*)::float8 AS n FROM tf GROUP BY lexeme)
            SELECT rid, score FROM (
                SELECT h.rid, sum(
                    ln(1 + (docs.n - df.n + 0.5) / (df.n + 0.5))
                    * h.f * {_K1 + 1}
                    / (h.f + {_K1} * (1 - {_B} + {_B} * h.doc_len / docs.avgdl))
                    ORDER BY h.lexeme
                ) AS score
                FROM tf h JOIN df USING (lexeme) CROSS JOIN docs
                WHERE true{filters}
                GROUP BY h.rid
            ) s ORDER BY round(score::numeric, 9) DESC, rid LIMIT %s
        """
        return [(int(r[0]), float(r[1])) for r in self.db.fetchall(sql, params, binary=True)]

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

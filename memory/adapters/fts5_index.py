"""The FTS5 `TextIndex`: BM25 over current memories, with the user as an indexed token.

Matching `user_key:<token>` inside the MATCH expression makes FTS5 intersect posting lists, so one
user's query never walks other users' matches. Query words are quoted one by one (never raw MATCH
syntax) and OR-ed, so BM25 ranks by how many and how rare the shared words are.

Each user's row count is kept beside the index (`memories_fts_users`, migration m006) as rows
are added and removed: counting in FTS5 walks the user's whole posting list, and recall asks on
every query.

Searches outside a write transaction are scored from a per-process copy of the user's postings
in memory with FTS5's own bm25 arithmetic and tokens (cached_text.py), checked against the
file's per-user change log (index_log.py) on every search; every add and remove here writes
that log in its transaction. A query word FTS5 would read as several tokens (a phrase), or a
totals record that cannot be read, is scored by FTS5 itself.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from typing import Any

from ..db import Database, connect
from ..models import MemoryCategory
from . import index_log
from .cached_text import Fts5Words, TermHits, UserPostings, table_stats
from .user_cache import Builder, UserCache, attach_cache, current_entry

log = logging.getLogger(__name__)

__all__ = ["HEAVY_ROWS", "FTS5TextIndex", "fts_terms", "user_token"]

_WORD = re.compile(r"\w+", re.UNICODE)
# From this many rows a user's search ranks first and filters scope and category after.
HEAVY_ROWS = 5000
_LOG = "text"  # this index's name in the change log


def user_token(user_id: str) -> str:
    return "u" + hashlib.sha1(user_id.encode("utf-8")).hexdigest()[:20]


def fts_terms(query: str, stop_words: frozenset[str] = frozenset()) -> list[str]:
    """Distinct words of `query` in order, minus stop words (all words if only those are left)."""
    words = [w.casefold() for w in _WORD.findall(query)]
    seen: dict[str, None] = {}
    for w in words:
        if w not in stop_words:
            seen.setdefault(w, None)
    if not seen:
        for w in words:
            seen.setdefault(w, None)
    return list(seen)


def _quote(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


class FTS5TextIndex:
    def __init__(
        self, db: Database, stop_words: frozenset[str] = frozenset(), *,
        heavy_rows: int = HEAVY_ROWS, filter_depth: int = 4, cache: UserCache | bool = True,
    ) -> None:
        """`cache`: True for the process's shared cache (user_cache.DEFAULT_CACHE_BYTES), a
        `UserCache` of one's own, or False to let FTS5 score every search."""
        self.db = db
        self.stop_words = stop_words
        self.heavy_rows = heavy_rows
        self.filter_depth = filter_depth
        self.cache, self._owner = attach_cache(self, cache)
        self._words: Fts5Words | None = None
        self._hits: TermHits = {}  # rows per term in the whole table, while it is unchanged
        self.builder = Builder()  # heavy users' copies are read on a background thread

    def words(self) -> Fts5Words:
        """The tokenizer of `memories_fts` itself, as a private table (made on first use)."""
        if self._words is None:
            row = self.db.conn.execute(
                "SELECT sql FROM sqlite_master WHERE name = 'memories_fts'"
            ).fetchone()
            found = re.search(r"tokenize\s*=\s*'((?:[^']|'')*)'", str(row[0]) if row else "")
            self._words = Fts5Words(found.group(1).replace("''", "'") if found else "unicode61")
        return self._words

    def add(
        self, rowid: int, user_id: str, scope_key: str, category: MemoryCategory, content: str
    ) -> None:
        token = user_token(user_id)
        conn = self.db.conn
        conn.execute(
            "INSERT INTO memories_fts(rowid, content, user_key, scope_key, category)"
            " VALUES (?, ?, ?, ?, ?)",
            (rowid, content, token, scope_key, category.value),
        )
        index_log.record(conn, _LOG, token, index_log.ADD, (rowid,))
        conn.execute(
            "INSERT INTO memories_fts_users(user_key, docs) VALUES (?, 1)"
            " ON CONFLICT(user_key) DO UPDATE SET docs = docs + 1",
            (token,),
        )

    def remove(self, rowids: Sequence[int]) -> None:
        conn = self.db.conn
        removed: dict[str, list[int]] = {}
        for rowid in rowids:
            row = conn.execute(
                "SELECT user_key FROM memories_fts WHERE rowid = ?", (int(rowid),)
            ).fetchone()
            if row is None:
                continue
            conn.execute("DELETE FROM memories_fts WHERE rowid = ?", (int(rowid),))
            removed.setdefault(str(row[0]), []).append(int(rowid))
        for token, gone in removed.items():
            conn.execute(
                "UPDATE memories_fts_users SET docs = docs - ? WHERE user_key = ?",
                (len(gone), token),
            )
            left = conn.execute(
                "SELECT docs FROM memories_fts_users WHERE user_key = ?", (token,)
            ).fetchone()
            if left is None or int(left[0]) <= 0:
                # A user with no rows left leaves no row here either (purge leaves no trace).
                conn.execute("DELETE FROM memories_fts_users WHERE user_key = ?", (token,))
                index_log.forget(conn, _LOG, token)
            else:
                index_log.record(conn, _LOG, token, index_log.REMOVE, gone)

    def search(
        self, query: str, user_id: str, *, scope_keys: Sequence[str] | None,
        categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]]:
        terms = fts_terms(query, self.stop_words)
        if not terms or k <= 0:
            return []
        if self.cache is not None:
            try:
                found = self._cached(terms, user_id, scope_keys, categories, k)
            except Exception:  # the copy changes speed only: FTS5 answers instead
                log.warning("searching a user's in-memory postings failed", exc_info=True)
                self.cache.drop(self._owner, user_token(user_id))
                found = None
            if found is not None:
                return found
        match = f"user_key:{user_token(user_id)} AND content:({' OR '.join(map(_quote, terms))})"
        if (scope_keys is not None or categories) and self.count(user_id) >= self.heavy_rows:
            found = self._rank_then_filter(match, scope_keys, categories, k)
            if found is not None:
                return found
        return self._ranked(match, scope_keys, categories, k)

    def _cached(
        self, terms: list[str], user_id: str, scope_keys: Sequence[str] | None,
        categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]] | None:
        """FTS5's answer from the in-memory postings; None to let FTS5 answer."""
        assert self.cache is not None
        words = self.words()
        phrases = words.tokens(terms)
        if any(len(p) != 1 for p in phrases):
            return None  # a word FTS5 reads as a phrase of several tokens, or as none
        conn = self.db.conn
        entry = self._copy(user_id, background=True)
        if entry is not None and entry.stale:
            self.cache.drop(self._owner, user_token(user_id))
            entry = self._copy(user_id, background=True)
        if entry is None:
            return None
        terms_of = [p[0] for p in phrases]
        stats = table_stats(conn, self._hits, terms_of)
        if stats is None:
            return None
        return entry.search(terms_of, stats, scope_keys=scope_keys, categories=categories, k=k)

    def _copy(self, user_id: str, *, background: bool) -> UserPostings | None:
        """The user's in-memory postings, current; None: let FTS5 answer (see current_entry).
        A user of `heavy_rows` rows or more is first read on a background thread."""
        assert self.cache is not None
        words = self.words()
        token = user_token(user_id)

        def build(conn: Any, seq: int) -> UserPostings:
            docs = [
                (int(r[0]), str(r[1]), str(r[2]), str(r[3]))
                for r in conn.execute(
                    "SELECT rowid, content, scope_key, category FROM memories_fts"
                    " WHERE memories_fts MATCH ?", (f"user_key:{_quote(token)}",),
                ).fetchall()
            ]
            return UserPostings(words, len(words.text_tokens(token)), seq, docs)

        return current_entry(
            self.cache, self._owner, self.db.conn, _LOG, token, build,
            background=(self.builder, lambda: connect(self.db.path),
                        lambda: self.count(user_id) >= self.heavy_rows)
            if background and self.db.path != ":memory:" else None,
        )

    def warm(self, user_id: str) -> None:
        """Read the user's postings into memory now (a no-op without a cache, or when
        current)."""
        if self.cache is not None:
            self._copy(user_id, background=False)

    def _ranked(
        self, match: str, scope_keys: Sequence[str] | None,
        categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]]:
        # bm25() is lower-is-better; negate so callers get higher-is-better relevance.
        sql = (
            "SELECT rowid, -bm25(memories_fts, 1.0, 0.0, 0.0, 0.0) AS score FROM memories_fts"
            " WHERE memories_fts MATCH ?"
        )
        params: list[object] = [match]
        if scope_keys is not None:
            sql += f" AND scope_key IN ({','.join('?' * len(scope_keys))})"
            params.extend(scope_keys)
        if categories:
            sql += f" AND category IN ({','.join('?' * len(categories))})"
            params.extend(c.value for c in categories)
        sql += " ORDER BY score DESC LIMIT ?"
        params.append(k)
        return [(int(r[0]), float(r[1])) for r in self.db.conn.execute(sql, params).fetchall()]

    def _rank_then_filter(
        self, match: str, scope_keys: Sequence[str] | None,
        categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]] | None:
        """A heavy user's best `filter_depth * k` matches ranked without the scope and category
        filters, then filtered; None when fewer than `k` pass and more matches exist (the caller
        then filters inside the query). The filter columns are UNINDEXED, so filtering inside
        the query reads every match's stored row: ~45% of the search at 100k memories. The
        answer is the same, as the ranked matches that pass are the filtered ranking's head."""
        depth = k * self.filter_depth
        conn = self.db.conn
        ranked = conn.execute(
            "SELECT rowid, -bm25(memories_fts, 1.0, 0.0, 0.0, 0.0) AS score FROM memories_fts"
            " WHERE memories_fts MATCH ? ORDER BY score DESC LIMIT ?",
            (match, depth),
        ).fetchall()
        if not ranked:
            return []
        rowids = [int(r[0]) for r in ranked]
        labels = {
            int(r[0]): (str(r[1]), str(r[2]))
            for r in conn.execute(
                "SELECT rowid, scope_key, category FROM memories_fts"
                f" WHERE rowid IN ({','.join('?' * len(rowids))})",
                rowids,
            ).fetchall()
        }
        scopes = None if scope_keys is None else set(scope_keys)
        wanted = {c.value for c in categories} if categories else None
        kept = [
            (rid, float(score)) for rid, score in ((int(r[0]), r[1]) for r in ranked)
            if (scopes is None or labels[rid][0] in scopes)
            and (wanted is None or labels[rid][1] in wanted)
        ]
        if len(kept) >= k or len(ranked) < depth:
            return kept[:k]
        return None

    def optimize(self) -> None:
        """Merge the index's segments into one. Many small segments (from many small writes)
        made each query walk them all: measured ~2 ms of a 100k-memory hybrid search."""
        self.db.conn.execute("INSERT INTO memories_fts(memories_fts) VALUES ('optimize')")

    def count(self, user_id: str | None = None) -> int:
        if user_id is None:
            return int(self.db.conn.execute("SELECT count(*) FROM memories_fts").fetchone()[0])
        row = self.db.conn.execute(
            "SELECT docs FROM memories_fts_users WHERE user_key = ?", (user_token(user_id),)
        ).fetchone()
        return 0 if row is None else int(row[0])

"""One user's full-text postings in memory, scored by FTS5's own BM25 in numpy.

FTS5 scores every row a query matches with bm25() before the LIMIT applies (~2 us a row), and a
heavy user's query matches ~16k rows (48 ms at 100k memories). Here a user's rows are kept as
postings per term (`UserPostings`: row positions and term frequencies) and a query costs one
numpy pass over the postings of its terms. The score is FTS5's bm25 with the weights the text
index passes (content 1, the rest 0), term for term:

    sum over query phrases of idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * D / avgdl))

with k1 = 1.2, b = 0.75, D the row's tokens in all columns (content and the user token),
avgdl and N (rows) over the whole table, read from FTS5's own totals record per query, and
idf = log((N - n + 0.5) / (n + 0.5)) (1e-6 if not positive) where n is the rows of the whole
table holding the term in content (an fts5vocab lookup), so the numbers are FTS5's own.

Tokens are FTS5's own too: text is split into words on the unicode61 rules (letters and
digits), and each distinct word goes once through a private in-memory FTS5 table with the
index's `tokenize` option (`Fts5Words`), so stemming and case and diacritic folding are never
re-implemented. What can differ: characters Python and unicode61 classify differently (private
use code points, combining marks in decomposed text), and the order of rows with equal scores.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..db import sqlite_module
from ..models import MemoryCategory
from .index_log import ADD, Change
from .user_cache import ReadersThenScrub

__all__ = ["Fts5Words", "TermHits", "UserPostings", "table_stats"]

_WORD = re.compile(r"[^\W_]+")  # unicode61's token characters: letters and numbers
_K1, _B = 1.2, 0.75
_MAX_WORDS = 200_000  # distinct words whose tokens are remembered
_TERMS = "memories_fts_rows"  # a temp fts5vocab table, per connection


class Fts5Words:
    """Words to FTS5 tokens through a private FTS5 table with the same tokenizer."""

    def __init__(self, tokenize: str) -> None:
        self._conn = sqlite_module().connect(":memory:", check_same_thread=False)
        quoted = tokenize.replace("'", "''")
        self._conn.execute(f"CREATE VIRTUAL TABLE words USING fts5(w, tokenize = '{quoted}')")
        self._conn.execute("CREATE VIRTUAL TABLE word_tokens USING fts5vocab(words, instance)")
        self._known: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def tokens(self, words: Sequence[str]) -> list[tuple[str, ...]]:
        """Each word's tokens, in order."""
        with self._lock:
            missing = list(dict.fromkeys(w for w in words if w not in self._known))
            if missing:
                if len(self._known) + len(missing) > _MAX_WORDS:
                    self._known.clear()
                self._learn(missing)
            known = self._known
            return [known[w] for w in words]

    def _learn(self, words: list[str]) -> None:
        conn = self._conn
        for start in range(0, len(words), 5000):
            part = words[start : start + 5000]
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO words(rowid, w) VALUES (?, ?)", enumerate(part))
            found: dict[int, list[tuple[int, str]]] = {}
            for term, doc, offset in conn.execute("SELECT term, doc, offset FROM word_tokens"):
                found.setdefault(int(doc), []).append((int(offset), str(term)))
            conn.execute("DELETE FROM words")
            conn.execute("COMMIT")
            for i, word in enumerate(part):
                self._known[word] = tuple(t for _, t in sorted(found.get(i, [])))

    def occurrences(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Every token of `texts` at once: (distinct terms, each token's term id, each token's
        text index), vectorised so a 100k-row user is read in about a second."""
        per_text = [_WORD.findall(t) for t in texts]
        flat = [w for words in per_text for w in words]
        distinct = list(dict.fromkeys(flat))
        word_id = {w: i for i, w in enumerate(distinct)}
        terms: dict[str, int] = {}
        spans = [[terms.setdefault(t, len(terms)) for t in toks] for toks in self.tokens(distinct)]
        lens = np.array([len(x) for x in spans], dtype=np.int64)
        flat_terms = np.array([t for x in spans for t in x], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else lens
        codes = np.array(list(map(word_id.__getitem__, flat)), dtype=np.int64)
        text_of_word = np.repeat(np.arange(len(texts), dtype=np.int64),
                                 [len(words) for words in per_text])
        counts = lens[codes] if len(codes) else codes
        # token j of word occurrence i is flat_terms[offsets[code_i] + j]
        starts = np.repeat(offsets[codes] if len(codes) else codes, counts)
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return list(terms), flat_terms[starts + within], np.repeat(text_of_word, counts)

    def text_tokens(self, text: str) -> list[str]:
        words = _WORD.findall(text)
        return [t for toks in self.tokens(words) for t in toks]


def _varints(blob: bytes) -> list[int]:
    """SQLite's varints (as FTS5 writes its records), one after another."""
    out: list[int] = []
    i = 0
    while i < len(blob):
        value = 0
        for n in range(9):
            byte = blob[i]
            i += 1
            if n == 8:
                value = (value << 8) | byte
                break
            value = (value << 7) | (byte & 0x7F)
            if byte < 0x80:
                break
        out.append(value)
    return out


_prepared: weakref.WeakSet[Any] = weakref.WeakSet()
_prepared_lock = threading.Lock()
_MAX_HITS = 100_000
TermHits = dict[str, tuple[tuple[int, int, int], int]]  # term -> (table version, rows)


def table_stats(
    conn: Any, hits: TermHits, terms: Sequence[str]
) -> tuple[int, float, list[int]] | None:
    """FTS5's N (rows), avgdl (tokens per row, all columns) and, per term, the rows holding it;
    None if the totals record cannot be read (then FTS5 scores instead).

    The rows per term come from an fts5vocab 'row' table (~8x cheaper than 'col': it counts a
    row whatever column holds the term, which differs from FTS5's content-only count only for
    a content word equal to a user token). They are kept per process while the table's row
    count, token count and the change log's newest seq are all unchanged (any write moves one),
    in `hits`, which the caller keeps per index."""
    row = conn.execute(
        "SELECT (SELECT block FROM memories_fts_data WHERE id = 1),"
        " (SELECT seq FROM sqlite_sequence WHERE name = 'memory_index_log')"
    ).fetchone()
    if row is None or row[0] is None:
        return None
    totals = _varints(bytes(row[0]))
    if not totals or totals[0] <= 0:
        return None
    rows, tokens = totals[0], sum(totals[1:])
    version = (rows, tokens, int(row[1] or 0))
    found: dict[str, int] = {}
    for term in terms:
        hit = hits.get(term)
        if hit is not None and hit[0] == version:
            found[term] = hit[1]
    missing = [t for t in dict.fromkeys(terms) if t not in found]
    if missing:
        with _prepared_lock:
            if conn not in _prepared:
                conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{_TERMS}"
                             " USING fts5vocab(main, memories_fts, row)")
                _prepared.add(conn)
        counted = {str(r[0]): int(r[1]) for r in conn.execute(
            f"SELECT term, doc FROM temp.{_TERMS} WHERE term IN ({','.join('?' * len(missing))})",
            missing,
        ).fetchall()}
        if len(hits) > _MAX_HITS:
            hits.clear()
        for term in missing:
            found[term] = counted.get(term, 0)
            hits[term] = (version, found[term])
    return rows, tokens / rows, [found[t] for t in terms]


Doc = tuple[int, str, str, str]  # (rowid, content, scope_key, category)


class UserPostings(ReadersThenScrub):
    """A user's full-text rows at log `seq`: per-row arrays and postings per term. Replayed
    adds go to per-term tails, merged into the arrays when a query reads that term."""

    def __init__(self, words: Fts5Words, user_tokens: int, seq: int, docs: list[Doc]) -> None:
        self.words = words
        self.user_tokens = user_tokens  # the user token's own tokens, counted in D
        self.seq = seq
        self.lock = threading.Lock()
        self._labels: dict[str, int] = {}
        self.n = 0
        self.live = 0
        self.pos: dict[int, int] = {}
        self.rowids = np.zeros(0, dtype=np.int64)
        self.lengths = np.zeros(0, dtype=np.float64)
        self.scopes = np.zeros(0, dtype=np.int32)
        self.categories = np.zeros(0, dtype=np.int32)
        self.alive = np.zeros(0, dtype=bool)
        self.postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.tails: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._postings_bytes = 0
        # each row's terms, so a removed row's postings go with it (a purge leaves no trace):
        # per appended batch (first position, offsets by row, term numbers), and the terms by
        # number with the count of live rows holding each (a term no row holds is forgotten)
        self._row_terms: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._term_no: dict[str, int] = {}
        self._terms: list[str | None] = []
        self._holders = np.zeros(0, dtype=np.int64)
        # Searches read the arrays outside the lock; a removed row's key and length are zeroed
        # once none that began before the removal (and may still weigh it) is running.
        self._readers = 0
        self._unscrubbed: list[int] = []
        self._append(docs, bulk=True)

    def _label(self, name: str) -> int:
        return self._labels.setdefault(name, len(self._labels))

    def _append(self, docs: list[Doc], *, bulk: bool = False) -> None:
        if not docs:
            return
        start = self.n
        need = start + len(docs)
        if need > len(self.rowids):
            cap = max(need, int(len(self.rowids) * 1.25) + 16)

            def grown(a: np.ndarray) -> np.ndarray:
                out = np.zeros(cap, dtype=a.dtype)
                out[:start] = a[:start]
                return out

            self.rowids, self.lengths = grown(self.rowids), grown(self.lengths)
            self.scopes, self.categories = grown(self.scopes), grown(self.categories)
            self.alive = grown(self.alive)
        vocab, term_ids, at = self.words.occurrences([d[1] for d in docs])
        self.rowids[start:need] = [d[0] for d in docs]
        self.lengths[start:need] = np.bincount(at, minlength=len(docs)) + self.user_tokens
        self.scopes[start:need] = [self._label(d[2]) for d in docs]
        self.categories[start:need] = [self._label(d[3]) for d in docs]
        self.alive[start:need] = True
        for i, d in enumerate(docs):
            self.pos[d[0]] = start + i
        # one sort of (term, row) keys gives every term's rows, ascending, and frequencies
        keys, tf = np.unique(term_ids.astype(np.int64) * len(docs) + at, return_counts=True)
        term_of = keys // len(docs)
        row_of = (keys % len(docs)).astype(np.int32) + start
        self._remember_terms(start, len(docs), vocab, term_of, row_of)
        bounds = np.flatnonzero(np.diff(term_of)) + 1
        for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(keys)], strict=True):
            if lo == hi:
                continue
            term = vocab[int(term_of[lo])]
            # copies, not views of one array: a removed row's posting is freed with its term's
            part = (row_of[lo:hi].copy(), tf[lo:hi].astype(np.float64))
            if bulk:
                self.postings[term] = part
            else:
                self.tails.setdefault(term, []).append(part)
            self._postings_bytes += 12 * (hi - lo) + 100
        self.n = need
        self.live += len(docs)

    def _remember_terms(
        self, start: int, count: int, vocab: list[str], term_of: np.ndarray, row_of: np.ndarray
    ) -> None:
        numbers = np.array([self._number(t) for t in vocab], dtype=np.int32)
        if len(self._terms) > len(self._holders):
            grown = np.zeros(max(len(self._terms), 2 * len(self._holders)), dtype=np.int64)
            grown[: len(self._holders)] = self._holders
            self._holders = grown
        order = np.argsort(row_of, kind="stable")
        per_row = np.bincount(row_of - start, minlength=count)
        offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
        held = numbers[term_of[order]] if len(order) else numbers[:0]
        np.add.at(self._holders, held, 1)
        self._row_terms.append((start, offsets, held))

    def _number(self, term: str) -> int:
        no = self._term_no.get(term)
        if no is None:
            no = self._term_no[term] = len(self._terms)
            self._terms.append(term)
        return no

    def _drop_postings(self, at: int) -> None:
        """Take row position `at` out of its terms' postings and tails, and forget each term
        no live row holds any more."""
        batch = bisect.bisect_right([b[0] for b in self._row_terms], at) - 1
        start, offsets, held = self._row_terms[batch]
        lo, hi = int(offsets[at - start]), int(offsets[at - start + 1])
        for no in held[lo:hi].tolist():
            term = self._terms[no] if no >= 0 else None
            if term is None:
                continue
            self._drop_from_term(term, at)
            self._holders[no] -= 1
            if self._holders[no] <= 0:
                self.postings.pop(term, None)
                self.tails.pop(term, None)
                self._term_no.pop(term, None)
                self._terms[no] = None
                self._postings_bytes -= 100
        held[lo:hi] = -1  # the row's term numbers say nothing once it is gone

    def _drop_from_term(self, term: str, at: int) -> None:
        parts = ([] if term not in self.postings else [("base", self.postings[term])]) + [
            ("tail", p) for p in self.tails.get(term, [])
        ]
        tails: list[tuple[np.ndarray, np.ndarray]] = []
        for kind, (rows, tf) in parts:
            i = int(np.searchsorted(rows, at))  # postings hold positions in ascending order
            if i < len(rows) and rows[i] == at:
                rows, tf = np.delete(rows, i), np.delete(tf, i)
                self._postings_bytes -= 12
            if kind == "base":
                self.postings[term] = (rows, tf)
            else:
                tails.append((rows, tf))
        if term in self.tails:
            self.tails[term] = tails

    def _remove(self, rowid: int) -> None:
        at = self.pos.pop(rowid, None)
        if at is None:
            return
        self.alive[at] = False
        self.live -= 1
        self._drop_postings(at)  # replaced, not changed in place: a running search keeps its own
        self._unscrubbed.append(at)
        if self._readers == 0:
            self._scrub()

    def _scrub(self) -> None:
        """Zero removed rows' keys, lengths and labels; the caller holds the lock and no search
        is reading the arrays."""
        if not self._unscrubbed:
            return
        at = np.array(self._unscrubbed, dtype=np.int64)
        self._unscrubbed = []
        self.rowids[at] = 0
        self.lengths[at] = 0.0
        self.scopes[at] = self.categories[at] = 0

    @property
    def nbytes(self) -> int:
        arrays = (self.rowids, self.lengths, self.scopes, self.categories, self.alive,
                  self._holders, *(a for _, o, h in self._row_terms for a in (o, h)))
        return (sum(a.nbytes for a in arrays) + self._postings_bytes + 100 * len(self.pos)
                + 100 * len(self._term_no))

    def replay(self, conn: Any, changes: list[Change]) -> None:
        """Apply logged changes in order; an add re-reads the row as it is now, so replaying
        an entry twice changes nothing. Positions of removed rows are not reused (their
        postings stay, masked out), and a rebuild drops them once they are many."""
        if not changes:
            return
        added = list(dict.fromkeys(rowid for _, op, rowid in changes if op == ADD))
        current: dict[int, Doc] = {}
        for start in range(0, len(added), 500):
            part = added[start : start + 500]
            for r in conn.execute(
                "SELECT rowid, content, scope_key, category FROM memories_fts"
                f" WHERE rowid IN ({','.join('?' * len(part))})", part,
            ).fetchall():
                current[int(r[0])] = (int(r[0]), str(r[1]), str(r[2]), str(r[3]))
        pending: dict[int, Doc] = {}
        for _, op, rowid in changes:
            self._remove(rowid)
            pending.pop(rowid, None)
            if op == ADD and rowid in current:
                pending[rowid] = current[rowid]
        self._append(list(pending.values()))
        self.seq = max(self.seq, changes[-1][0])

    @property
    def stale(self) -> bool:
        """Mostly removed rows: cheaper to rebuild than to keep scoring their postings."""
        return self.n - self.live > max(1024, self.n // 4)

    def _term(self, term: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The term's postings, its tail merged in; the caller holds the lock."""
        tail = self.tails.pop(term, None)
        base = self.postings.get(term)
        if tail:
            parts = ([] if base is None else [base]) + tail
            base = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
            self.postings[term] = base
            self._postings_bytes -= 100 * (len(parts) - 1)
        return base

    def search(
        self, phrases: Sequence[str], stats: tuple[int, float, list[int]], *,
        scope_keys: Sequence[str] | None, categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]]:
        with self.reading():
            return self._search(phrases, stats, scope_keys=scope_keys, categories=categories, k=k)

    def _search(
        self, phrases: Sequence[str], stats: tuple[int, float, list[int]], *,
        scope_keys: Sequence[str] | None, categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]]:
        rows, avgdl, hits = stats
        with self.lock:
            lists = [self._term(p) for p in phrases]
            n = self.n
            rowids, lengths = self.rowids[:n], self.lengths[:n]
            keep = self.alive[:n].copy()
            for labels, wanted in (
                (self.scopes[:n], None if scope_keys is None else list(scope_keys)),
                (self.categories[:n], [c.value for c in categories] if categories else None),
            ):
                if wanted is not None:
                    allowed = np.zeros(n, dtype=bool)
                    for i in {self._labels[w] for w in wanted if w in self._labels}:
                        allowed |= labels == i
                    keep &= allowed
        at_parts, score_parts = [], []
        for found, n_hit in zip(lists, hits, strict=True):
            if found is None:
                continue
            at, tf = found
            idf = math.log((rows - n_hit + 0.5) / (n_hit + 0.5))
            if idf <= 0.0:
                idf = 1e-6
            # FTS5's expression, in its order of operations, so the doubles are its own
            part = idf * ((tf * (_K1 + 1.0)) / (tf + _K1 * (1 - _B + _B * lengths[at] / avgdl)))
            at_parts.append(at)
            score_parts.append(part)
        if not at_parts:
            return []
        # bincount adds each row's terms in query order, as FTS5's loop over phrases does;
        # every posting adds a positive amount, so a matched row scores above zero
        every = np.bincount(np.concatenate(at_parts), weights=np.concatenate(score_parts),
                            minlength=n)
        matched = np.flatnonzero((every > 0) & keep)
        if len(matched) == 0:
            return []
        scores = every[matched]
        top = _top(scores, rowids[matched], k)
        return [(int(rowids[matched[i]]), float(scores[i])) for i in top]


def _top(scores: np.ndarray, rowids: np.ndarray, k: int) -> np.ndarray:
    """Indices of the best `k` scores, ties by ascending rowid as FTS5's ORDER BY leaves
    them: every row tied with the k-th is a candidate, not an arbitrary few of them."""
    if k < len(scores):
        kth = scores[np.argpartition(-scores, k - 1)[k - 1]]
        pool = np.flatnonzero(scores >= kth)
    else:
        pool = np.arange(len(scores))
    return pool[np.lexsort((rowids[pool], -scores[pool]))][:k]

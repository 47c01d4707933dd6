"""What the raw tables of a database hold, read past the engine (as another process would), on
either backend: a SQLite file's path or a postgresql:// URL (conftest's PostgreSQL leg hands the
engine's config that URL). The engine suites use these to prove writes are whole and purges leave
nothing, the same assertions on both backends."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from headroom.memory.adapters.fts5_index import user_token
from headroom.memory.adapters.postgres.schema import TEXT_CONFIG
from headroom.memory.db import connect
from headroom.memory.models import is_database_url

__all__ = ["outbox_rows", "row_counts", "user_traces"]

# The row-count keys are the SQLite tables' names; on PostgreSQL the text index is memory_text and
# every vector sits in memory_vectors (SQLite keeps small users' in memory_vectors_compact).
TABLES = ("memories", "memory_events", "memory_vectors", "memories_fts", "outbox")


@contextlib.contextmanager
def _scalar(target: str | Path) -> Iterator[Any]:
    """`one(sql, *params)` on the database, with `?` placeholders on both backends."""
    if is_database_url(target):
        with psycopg.connect(str(target)) as conn:
            yield lambda sql, *p: conn.execute(sql.replace("?", "%s"), p).fetchone()[0]
        return
    sqlite = connect(target)
    try:
        yield lambda sql, *p: sqlite.execute(sql, p).fetchone()[0]
    finally:
        sqlite.close()


def row_counts(target: str | Path) -> dict[str, int]:
    """Rows per table (`TABLES`), every vector counted once wherever it is kept."""
    postgres = is_database_url(target)
    with _scalar(target) as one:
        counts = {
            t: int(one(f"SELECT count(*) FROM {t}"))
            for t in TABLES
            if not (postgres and t == "memories_fts")
        }
        if postgres:
            counts["memories_fts"] = int(one("SELECT count(*) FROM memory_text"))
        else:
            counts["memory_vectors"] += int(one("SELECT count(*) FROM memory_vectors_compact"))
    return {t: counts[t] for t in TABLES}


def user_traces(target: str | Path, user: str, word: str | None = None) -> dict[str, int]:
    """What the raw tables still hold of `user` (and of `word` in the text index and content)."""
    postgres = is_database_url(target)
    with _scalar(target) as one:
        out = {
            "memories": one("SELECT count(*) FROM memories WHERE user_id = ?", user),
            "events": one("SELECT count(*) FROM memory_events WHERE user_id = ?", user),
            "outbox": one("SELECT count(*) FROM outbox WHERE user_id = ?", user),
        }
        if postgres:
            out["vectors"] = one("SELECT count(*) FROM memory_vectors WHERE user_id = ?", user)
            out["fts"] = one("SELECT count(*) FROM memory_text WHERE user_id = ?", user)
        else:
            out["vectors"] = one(
                "SELECT count(*) FROM memory_vectors WHERE user_id = ?", user
            ) + one("SELECT count(*) FROM memory_vectors_compact WHERE user_id = ?", user)
            out["fts"] = one(
                "SELECT count(*) FROM memories_fts WHERE memories_fts MATCH ?",
                f"user_key:{user_token(user)}",
            )
        if word is not None:
            if postgres:
                out["fts_word"] = one(
                    f"SELECT count(*) FROM memory_text WHERE tsv @@ plainto_tsquery("
                    f"'{TEXT_CONFIG}', ?)",
                    word,
                )
            else:
                out["fts_word"] = one(
                    "SELECT count(*) FROM memories_fts WHERE memories_fts MATCH ?", f'"{word}"'
                )
            out["content"] = one("SELECT count(*) FROM memories WHERE content LIKE ?", f"%{word}%")
    return {k: int(v) for k, v in out.items()}


def outbox_rows(target: str | Path) -> int:
    """Rows in the outbox as another connection (another process) sees them."""
    if is_database_url(target):
        with _scalar(target) as one:
            return int(one("SELECT count(*) FROM outbox"))
    # sqlite3, not the engine's library: another process's view, with its own locks.
    conn = sqlite3.connect(target)
    try:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()

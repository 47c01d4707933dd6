"""Named, append-only schema migrations. Never edit an applied one; add the next.

Each runs in one BEGIN IMMEDIATE transaction together with the row that records it, so two
processes opening a new file at once cannot both apply it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from .timefmt import to_db

log = logging.getLogger(__name__)

Migration = Callable[[Any], None]


def m001_initial(conn: Any) -> None:
    conn.executescript(
        """
        CREATE TABLE memories (
            rid INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            user_id TEXT NOT NULL,
            session_id TEXT,
            agent_id TEXT,
            turn_id TEXT,
            scope_key TEXT NOT NULL,
            content TEXT NOT NULL,
            content_norm TEXT NOT NULL,
            category TEXT NOT NULL,
            importance REAL NOT NULL,
            entity_refs TEXT NOT NULL DEFAULT '[]',
            metadata TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL,
            valid_from TEXT NOT NULL,
            valid_until TEXT,
            supersedes TEXT,
            superseded_by TEXT,
            forgotten_at TEXT,
            access_count INTEGER NOT NULL DEFAULT 0,
            last_accessed TEXT,
            embedding BLOB,
            embedding_model TEXT
        );
        CREATE INDEX memories_user_time ON memories(user_id, created_at);
        CREATE INDEX memories_current_norm ON memories(user_id, content_norm)
            WHERE valid_until IS NULL;
        CREATE INDEX memories_supersedes ON memories(supersedes);

        CREATE TABLE memory_events (
            id INTEGER PRIMARY KEY,
            memory_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            op TEXT NOT NULL,
            at TEXT NOT NULL,
            request_id TEXT,
            old TEXT,
            new TEXT
        );
        CREATE INDEX memory_events_memory ON memory_events(memory_id);
        CREATE INDEX memory_events_user ON memory_events(user_id);

        CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            created_at TEXT NOT NULL,
            user_id TEXT NOT NULL,
            payload TEXT NOT NULL
        );

        CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);

        -- user_key is an indexed token, so a user's search intersects posting lists instead of
        -- scanning every user's matches; its BM25 weight is zero.
        CREATE VIRTUAL TABLE memories_fts USING fts5(
            content, user_key, scope_key UNINDEXED, category UNINDEXED,
            tokenize = 'porter unicode61 remove_diacritics 2'
        );
        """
    )


def m002_fts_secure_delete(conn: Any) -> None:
    """Deletes remove terms from the FTS5 index itself instead of leaving delete markers next to
    them until a merge, so a purged memory's words are gone from the file (SQLite >= 3.42)."""
    try:
        conn.execute("INSERT INTO memories_fts(memories_fts, rank) VALUES('secure-delete', 1)")
    except Exception as exc:  # pragma: no cover - an older SQLite
        log.warning("FTS5 secure-delete unavailable (%s): purged words stay until a merge", exc)


def m003_outbox_leases(conn: Any) -> None:
    """Outbox rows are claimed with a lease (owner, until) so two workers, threads or processes,
    never apply one row twice; a row that keeps failing is parked in `outbox_dead` with its error
    instead of holding back the rows behind it. AUTOINCREMENT so an id is never handed out twice
    (a dead letter or a log line keeps naming one row)."""
    conn.executescript(
        """
        CREATE TABLE outbox_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            created_at TEXT NOT NULL,
            user_id TEXT NOT NULL,
            payload TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            owner TEXT,
            lease_until REAL
        );
        INSERT INTO outbox_new(id, created_at, user_id, payload)
            SELECT id, created_at, user_id, payload FROM outbox;
        DROP TABLE outbox;
        ALTER TABLE outbox_new RENAME TO outbox;
        CREATE INDEX outbox_user ON outbox(user_id);

        CREATE TABLE outbox_dead (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            outbox_id INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            user_id TEXT NOT NULL,
            payload TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            error TEXT NOT NULL,
            dead_at TEXT NOT NULL
        );
        CREATE INDEX outbox_dead_user ON outbox_dead(user_id);
        """
    )


def m004_compact_vectors(conn: Any) -> None:
    """Vectors of users with few memories, searched exactly, so a new user costs a row instead
    of a sqlite-vec partition chunk (~200 KiB at 128 x 384 floats). See sqlite_vec_index.py."""
    conn.executescript(
        """
        CREATE TABLE memory_vectors_compact (
            rowid INTEGER PRIMARY KEY,
            user_id TEXT NOT NULL,
            scope_key TEXT NOT NULL,
            category TEXT NOT NULL,
            embedding BLOB NOT NULL
        );
        CREATE INDEX memory_vectors_compact_user ON memory_vectors_compact(user_id);
        """
    )


def m005_heavy_vectors(conn: Any) -> None:
    """The heavy tier of the vector index (sign bits in blocks, floats by rowid; see
    adapters/heavy_vectors.py), then the move into it of the users an older file already has
    past `HEAVY_LIMIT` vectors, so their next search is not the linear float scan."""
    conn.executescript(
        """
        CREATE TABLE memory_vector_heavy_users (
            user_id TEXT PRIMARY KEY,
            center BLOB NOT NULL,
            version INTEGER NOT NULL
        );
        CREATE TABLE memory_vectors_heavy (
            rowid INTEGER PRIMARY KEY,
            user_id TEXT NOT NULL,
            block INTEGER NOT NULL,
            embedding BLOB NOT NULL
        );
        CREATE INDEX memory_vectors_heavy_user ON memory_vectors_heavy(user_id);
        CREATE TABLE memory_vector_blocks (
            user_id TEXT NOT NULL,
            block INTEGER NOT NULL,
            rowids BLOB NOT NULL,
            bits BLOB NOT NULL,
            scopes BLOB NOT NULL,
            categories BLOB NOT NULL,
            PRIMARY KEY (user_id, block)
        );
        CREATE TABLE memory_vector_labels (
            id INTEGER PRIMARY KEY,
            user_id TEXT NOT NULL,
            label TEXT NOT NULL,
            UNIQUE (user_id, label)
        );
        """
    )
    row = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'memory_vectors'").fetchone()
    if row is None:  # a new file: the index creates its vec0 table when it knows the dimension
        return
    from .adapters.heavy_vectors import HEAVY_LIMIT, HeavyVectors, move_to_heavy

    found = re.search(r"float\[(\d+)\]", str(row[0]))
    if found is None:  # pragma: no cover - a vec0 table this code did not create
        raise RuntimeError("cannot read the vector dimension of memory_vectors")
    heavy = HeavyVectors(lambda: conn, int(found.group(1)))
    users = [
        str(r[0]) for r in conn.execute(
            "SELECT user_id FROM memory_vectors GROUP BY user_id HAVING count(*) >= ?",
            (HEAVY_LIMIT,),
        ).fetchall()
    ]
    for user_id in users:
        move_to_heavy(conn, heavy, user_id)
    if users:
        log.info("moved %d heavy users' vectors to the quantized tier", len(users))


def m006_fts_user_counts(conn: Any) -> None:
    """Each user's number of full-text rows, kept by the text index as it writes: counting them
    in FTS5 walks the user's whole posting list (~1 ms at 10k memories, ~9 ms at 100k), and
    recall counts them on every query (common words)."""
    conn.executescript(
        """
        CREATE TABLE memories_fts_users (
            user_key TEXT PRIMARY KEY,
            docs INTEGER NOT NULL
        );
        INSERT INTO memories_fts_users(user_key, docs)
            SELECT user_key, count(*) FROM memories_fts GROUP BY user_key;
        """
    )


def m007_core_index(conn: Any) -> None:
    """The core tier reads a user's newest memories of importance >= a threshold; through
    memories_user_time that walks every row of the user when few are that important (measured
    23 ms at 10k memories, none important), through this index it reads only those (0.02 ms)."""
    conn.execute("CREATE INDEX memories_user_importance ON memories(user_id, importance)")


def m008_index_log(conn: Any) -> None:
    """Per-user change log of the vector and text indexes, so a process can hold a user's index
    in memory and replay what other processes wrote since (adapters/index_log.py). Users the
    file already holds get a state row at seq 0: a copy read now replays from there on."""
    conn.executescript(
        """
        CREATE TABLE memory_index_log (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            index_name TEXT NOT NULL,
            user_key TEXT NOT NULL,
            op INTEGER NOT NULL,
            row INTEGER NOT NULL
        );
        CREATE INDEX memory_index_log_user ON memory_index_log(index_name, user_key, seq);
        CREATE TABLE memory_index_users (
            index_name TEXT NOT NULL,
            user_key TEXT NOT NULL,
            seq INTEGER NOT NULL,
            floor INTEGER NOT NULL,
            PRIMARY KEY (index_name, user_key)
        ) WITHOUT ROWID;
        INSERT INTO memory_index_users(index_name, user_key, seq, floor)
            SELECT 'text', user_key, 0, 1 FROM memories_fts_users WHERE docs > 0;
        INSERT OR IGNORE INTO memory_index_users(index_name, user_key, seq, floor)
            SELECT DISTINCT 'vector', user_id, 0, 1 FROM memory_vectors_compact;
        INSERT OR IGNORE INTO memory_index_users(index_name, user_key, seq, floor)
            SELECT DISTINCT 'vector', user_id, 0, 1 FROM memory_vectors_heavy;
        """
    )
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'memory_vectors'").fetchone():
        conn.execute(
            "INSERT OR IGNORE INTO memory_index_users(index_name, user_key, seq, floor)"
            " SELECT DISTINCT 'vector', user_id, 0, 1 FROM memory_vectors"
        )


def m009_index_log_entries(conn: Any) -> None:
    """Each user's count of change-log entries, so the log is trimmed to `index_log.KEEP`
    entries of that user (the global seq counts every user's). Existing logs start at 0: they
    are trimmed once they hold 2 x KEEP more."""
    conn.execute(
        "ALTER TABLE memory_index_users ADD COLUMN entries INTEGER NOT NULL DEFAULT 0"
    )


def m010_core_covering_index(conn: Any) -> None:
    """The core tier's filter (user, importance, current, scope, category) and order (newest)
    answered from one index: through memories_user_importance every important memory of the
    user was read from the table to sort it (a heavy user's ~1,000 of 100k memories: 4.7 ms
    CPU per recall); with this index only the 50 kept are (1.0 ms). It starts with the same
    columns, so it replaces that one."""
    conn.executescript(
        """
        CREATE INDEX memories_user_core
            ON memories(user_id, importance, valid_until, scope_key, category, created_at);
        DROP INDEX IF EXISTS memories_user_importance;
        """
    )


MIGRATIONS: list[tuple[str, Migration]] = [
    ("m001_initial", m001_initial),
    ("m002_fts_secure_delete", m002_fts_secure_delete),
    ("m003_outbox_leases", m003_outbox_leases),
    ("m004_compact_vectors", m004_compact_vectors),
    ("m005_heavy_vectors", m005_heavy_vectors),
    ("m006_fts_user_counts", m006_fts_user_counts),
    ("m007_core_index", m007_core_index),
    ("m008_index_log", m008_index_log),
    ("m009_index_log_entries", m009_index_log_entries),
    ("m010_core_covering_index", m010_core_covering_index),
]


def migrate(conn: Any) -> list[str]:
    """Apply pending migrations; returns the names applied."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version"
        " (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    applied: list[str] = []
    names = [n for n, _ in MIGRATIONS]
    if len(set(names)) != len(names):  # pragma: no cover - a programming error
        raise RuntimeError("duplicate migration names")
    done_before = {row[0] for row in conn.execute("SELECT name FROM schema_version")}
    for name, fn in MIGRATIONS:
        if name in done_before:
            continue  # no write lock when nothing is pending: opening must not wait on writers
        conn.execute("BEGIN IMMEDIATE")
        try:
            done = conn.execute("SELECT 1 FROM schema_version WHERE name = ?", (name,)).fetchone()
            if done is None:
                # executescript would COMMIT our transaction; run statements one by one instead.
                _run_in_transaction(conn, fn)
                conn.execute(
                    "INSERT INTO schema_version(name, applied_at) VALUES (?, ?)", (name, to_db())
                )
                applied.append(name)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return applied


class _StatementRunner:
    """Lets migrations call `executescript` without it committing the migration's transaction."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def executescript(self, script: str) -> None:
        import sqlite3

        buffer = ""
        for line in script.splitlines(keepends=True):
            if line.strip().startswith("--"):
                continue
            buffer += line
            if sqlite3.complete_statement(buffer):
                self._conn.execute(buffer)
                buffer = ""
        if buffer.strip():
            self._conn.execute(buffer)

    def execute(self, sql: str, params: Any = ()) -> Any:
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> Any:
        return self._conn.executemany(sql, rows)


def _run_in_transaction(conn: Any, fn: Migration) -> None:
    fn(_StatementRunner(conn))

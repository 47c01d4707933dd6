"""Per-user change log of the SQLite indexes: what lets a process keep a user's index in memory
and still never serve a removed row or miss a new one written by another process.

Every `add` / `remove` of the vector and text indexes appends (index, user, op, rowid) to
`memory_index_log` and moves the user's `seq` in `memory_index_users` (migration m008), in the
writer's transaction, so the log commits or rolls back with the rows. A reader holding a cached
copy built at `seq` S checks the user's row with one primary-key SELECT per search:

- same seq: the copy is current;
- a newer seq and S >= floor - 1: replay the log entries after S (idempotent: an add re-reads
  the row's current data, a remove drops it), so a heavy user's copy is never rebuilt whole;
- older than the kept log (S < floor - 1), or the user's row is gone: rebuild, or forget.

`seq` comes from an AUTOINCREMENT key, so a committed number is never handed out again (a
rolled-back one may be, which is why caches only ever absorb what they read outside a write
transaction: committed rows). The log keeps the last `KEEP` entries of a user; a user left with
no rows loses their log and state row too, so a purge leaves no trace here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["ADD", "KEEP", "REMOVE", "Change", "changes", "forget", "record", "state"]

ADD, REMOVE = 1, 0
KEEP = 1024  # log entries kept per user and index (1-2x this); a copy further behind rebuilds
# (`memory_index_users.entries` counts a user's entries since the last trim, migration m009)
_LOG = "memory_index_log"
_USERS = "memory_index_users"

Change = tuple[int, int, int]  # (seq, op, rowid)


def record(conn: Any, index: str, user: str, op: int, rowids: Iterable[int]) -> None:
    """Append `op` for these rows of `user` and move the user's seq; in the caller's
    transaction."""
    rows = [(index, user, op, int(r)) for r in rowids]
    if not rows:
        return
    insert = f"INSERT INTO {_LOG}(index_name, user_key, op, row) VALUES (?, ?, ?, ?)"
    if len(rows) == 1:  # the common case, an add: two statements in all
        seq = int(conn.execute(insert, rows[0]).lastrowid)
    else:
        conn.executemany(insert, rows)
        seq = int(conn.execute("SELECT last_insert_rowid()").fetchone()[0])
    # A new state row (the user's first rows, or their first since a purge forgot the log)
    # gets floor = its first seq + 1: only a copy read at that seq or later replays it. A copy
    # from before, even one seq before, missed the removals the forgotten log held.
    floor, entries = conn.execute(
        f"INSERT INTO {_USERS}(index_name, user_key, seq, floor, entries) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT(index_name, user_key) DO UPDATE SET seq = excluded.seq,"
        " entries = entries + excluded.entries RETURNING floor, entries",
        (index, user, seq, seq - len(rows) + 2, len(rows)),
    ).fetchone()
    # Trim by the user's own entries, in steps of KEEP, not on every write. (`seq` counts
    # every user's entries: trimming by it made a quiet user's next write, after others
    # wrote KEEP entries, push the log past their copy and force a rebuild.)
    if int(entries) >= 2 * KEEP:
        newest_dropped = conn.execute(
            f"SELECT seq FROM {_LOG} WHERE index_name = ? AND user_key = ?"
            " ORDER BY seq DESC LIMIT 1 OFFSET ?",
            (index, user, KEEP),
        ).fetchone()
        if newest_dropped is not None:
            # a copy at the newest dropped entry still replays
            floor = max(int(floor), int(newest_dropped[0]) + 1)
            conn.execute(
                f"DELETE FROM {_LOG} WHERE index_name = ? AND user_key = ? AND seq < ?",
                (index, user, floor),
            )
        conn.execute(
            f"UPDATE {_USERS} SET floor = ?, entries = ? WHERE index_name = ? AND user_key = ?",
            (int(floor), min(int(entries), KEEP), index, user),
        )


def forget(conn: Any, index: str, user: str) -> None:
    """The user has no rows left in `index`: drop their log and state row."""
    conn.execute(f"DELETE FROM {_LOG} WHERE index_name = ? AND user_key = ?", (index, user))
    conn.execute(f"DELETE FROM {_USERS} WHERE index_name = ? AND user_key = ?", (index, user))


def state(conn: Any, index: str, user: str) -> tuple[int, int] | None:
    """(seq, floor) of the user's log, None if the log holds no rows of theirs."""
    row = conn.execute(
        f"SELECT seq, floor FROM {_USERS} WHERE index_name = ? AND user_key = ?", (index, user)
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def changes(conn: Any, index: str, user: str, after: int) -> list[Change]:
    """The user's log entries after seq `after`, oldest first."""
    return [
        (int(r[0]), int(r[1]), int(r[2]))
        for r in conn.execute(
            f"SELECT seq, op, row FROM {_LOG} WHERE index_name = ? AND user_key = ? AND seq > ?"
            " ORDER BY seq",
            (index, user, after),
        ).fetchall()
    ]

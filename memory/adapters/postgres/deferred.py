"""Result-less statements of one database's adapters, held until the write transaction needs them.

Round trips, not statements, are what a write costs here (~0.3 ms each on a local socket), and
a memory's write was eight of them. The ones whose results nobody reads (its row, its vector
row, its text row, its audit event) wait in `DeferredWrites` until the write transaction needs
them: they go together in one pipeline before COMMIT, or before this family next reads or changes
that table (for that user). Rows of one `BulkInsert` go as ONE statement over arrays
(`INSERT ... SELECT ... FROM unnest(...)`): one parse, one plan and one executor start for a whole
batch, where `executemany` pays each of them per row on both sides of the socket.

A row's key comes from the identity sequence as before, a block of values per round trip inside
a write transaction (doubling per block up to `_RID_BLOCK_MAX`, or as many as a batch announced
with `expect_rows`; what the transaction does not use is a gap, as a rollback leaves). Inside the
transaction nothing can tell the difference; outside, nobody sees any of it before COMMIT anyway.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .connection import PgDatabase, storage_error

__all__ = ["BulkInsert", "DeferredWrites", "deferred_writes"]

_RID_BLOCK_MAX = 256  # row keys reserved per round trip, at most, unless a batch says more
_RID_BATCH_MAX = 4096  # what a batch may announce


@dataclass(frozen=True)
class BulkInsert:
    """An INSERT whose rows are sent as one array per column.

    `columns` and `types` are what each row carries; `select` (default: the columns as they
    are) is the SELECT list over them as `r.<column>`, `lateral` what it joins to compute from
    them, and `targets` (default: `columns`) the table's columns it fills."""

    table: str
    columns: tuple[str, ...]
    types: tuple[str, ...]
    select: str | None = None
    lateral: str = ""
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.columns) != len(self.types):
            raise ValueError("a BulkInsert needs one type per column")

    @property
    def sql(self) -> str:
        # Binary: a vector in an array is otherwise sent as text, formatted float by float.
        arrays = ", ".join(f"%b::{t}[]" for t in self.types)
        select = self.select or ", ".join(f"r.{c}" for c in self.columns)
        targets = ", ".join(self.targets or self.columns)
        return (
            f"INSERT INTO {self.table} ({targets}) SELECT {select}"
            f" FROM unnest({arrays}) AS r({', '.join(self.columns)}){self.lateral}"
        )

    def params(self, rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """The rows as one list per column."""
        return [list(column) for column in zip(*rows, strict=True)]


_Held = tuple[str, str, "str | BulkInsert", Sequence[Any]]


class DeferredWrites:
    """Result-less statements of one database's adapters, held per thread inside `collecting()`
    (the store's write transaction) and sent by `flush`. Outside such a block `defer` runs the
    statement at once. Each statement names its table and user, so a read of one user's rows
    sends the queue only when it holds rows it must see."""

    def __init__(self, db: PgDatabase) -> None:
        self.db = db
        self._local = threading.local()

    def _queue(self) -> list[_Held] | None:
        return getattr(self._local, "queue", None)

    @property
    def collecting_now(self) -> bool:
        """Whether this thread is inside a `collecting()` block of an open transaction."""
        return self._queue() is not None and self.db.in_transaction

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """Hold deferred statements until the block ends (then send them) or fails (then drop
        them: the transaction rolls back). A nested block joins the outer one."""
        if self._queue() is not None:
            yield
            return
        self._local.queue = []
        self._local.keys = set()
        self._local.rids = []
        self._local.rid_block = 1
        try:
            yield
            self.flush()
        finally:
            self._local.queue = None
            self._local.keys = None
            self._local.rids = []

    def expect_rows(self, n: int) -> None:
        """A batch of up to `n` new rows is coming: reserve that many keys in the next block."""
        if self.collecting_now:
            self._local.rid_block = max(self._local.rid_block, min(int(n), _RID_BATCH_MAX))

    def next_rid(self) -> int:
        """A fresh `memories.rid` from the identity sequence, reserved in blocks (call only while
        `collecting_now`)."""
        rids: list[int] = self._local.rids
        if not rids:
            block = self._local.rid_block
            self._local.rid_block = min(2 * block, max(_RID_BLOCK_MAX, block))
            rows = self.db.fetchall(
                "SELECT nextval(pg_get_serial_sequence('memories', 'rid'))"
                " FROM generate_series(1, %s)",
                (block,),
            )
            rids.extend(sorted((int(r[0]) for r in rows), reverse=True))
        return rids.pop()

    def defer(self, table: str, user_id: str, sql: str, params: Sequence[Any]) -> None:
        """Run `sql` now, or inside `collecting()` when the transaction next needs `table`."""
        self._hold(table, user_id, sql, params)

    def defer_row(self, insert: BulkInsert, user_id: str, row: Sequence[Any]) -> None:
        """Insert one row of `insert` now, or inside `collecting()` with the others of its kind
        as one statement."""
        self._hold(insert.table, user_id, insert, row)

    def _hold(self, table: str, user_id: str, what: str | BulkInsert, params: Sequence[Any]
              ) -> None:
        queue = self._queue()
        if queue is None or not self.db.in_transaction:
            if isinstance(what, BulkInsert):
                self.db.execute(what.sql, what.params([params]))
            else:
                self.db.execute(what, params)
            return
        queue.append((table, user_id, what, params))
        self._local.keys.update(((table, user_id), (table, None)))

    def flush(self, table: str | None = None, user_id: str | None = None) -> None:
        """Send what is held, if any of it is in `table` (for `user_id`; None: any), or with no
        table named, all of it: each `BulkInsert` as one statement, each other kind of statement
        as one `executemany`, in the order each kind was first deferred (kinds write different
        tables, so their order does not matter), all in one pipeline."""
        queue = self._queue()
        if not queue or (table is not None and (table, user_id) not in self._local.keys):
            return
        groups: dict[str | BulkInsert, list[Sequence[Any]]] = {}
        for _, _, what, params in queue:
            groups.setdefault(what, []).append(params)
        queue.clear()
        self._local.keys.clear()
        with self.db.connection() as conn:
            try:
                with conn.pipeline(), conn.cursor() as cur:
                    for what, rows in groups.items():
                        if isinstance(what, BulkInsert):
                            cur.execute(what.sql, what.params(rows))
                        else:
                            cur.executemany(what, rows)
            except Exception as exc:
                translated = storage_error(exc, self.db.where)
                if translated is None or translated is exc:
                    raise
                raise translated from exc


_DEFERRED: weakref.WeakKeyDictionary[PgDatabase, DeferredWrites] = weakref.WeakKeyDictionary()
_DEFERRED_LOCK = threading.Lock()


def deferred_writes(db: PgDatabase) -> DeferredWrites:
    """The one `DeferredWrites` of `db`, which its store, vector and text index share."""
    with _DEFERRED_LOCK:
        found = _DEFERRED.get(db)
        if found is None:
            found = _DEFERRED[db] = DeferredWrites(db)
        return found

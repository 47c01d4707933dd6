"""What the SQLite and PostgreSQL memory stores share apart from SQL dialect: the column list,
a row turned into a `Memory` or an audit event, the filter turned into WHERE conditions (given
the dialect's placeholder, list test and time encoding), a supersession chain walk, purge's scope
test, and the stats shape."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..candidates import CandidateRows
from ..models import Memory, MemoryCategory, MemoryFilter

__all__ = [
    "COLUMNS",
    "CandidateRows",
    "Dialect",
    "chain",
    "event_json",
    "in_scope",
    "normalize_content",
    "purge_filter",
    "row_to_event",
    "row_to_memory",
    "stats_summary",
    "where_clause",
]

COLUMNS = (
    "rid, id, user_id, session_id, agent_id, turn_id, content, category, importance, "
    "entity_refs, metadata, created_at, valid_from, valid_until, supersedes, superseded_by, "
    "forgotten_at, access_count, last_accessed, embedding_model"
)
_SCOPE_COLUMNS = ("session_id", "agent_id", "turn_id")
_WS = re.compile(r"\s+")


def normalize_content(text: str) -> str:
    """The exact-duplicate key: case, spacing and final punctuation do not make a new fact."""
    return _WS.sub(" ", text).strip().rstrip(".!").strip().casefold()


def _json_list(text: str) -> list[Any]:
    # Most rows hold the empty default; recall turns ~85 rows into memories per query.
    return [] if text == "[]" else json.loads(text)


def _json_dict(text: str) -> dict[str, Any]:
    return {} if text == "{}" else json.loads(text)


def row_to_memory(row: Mapping[str, Any], when: Callable[[Any], datetime | None]) -> Memory:
    """A `memories` row as a `Memory`; `when` decodes the backend's stored times."""
    return Memory(
        id=row["id"],
        content=row["content"],
        user_id=row["user_id"],
        session_id=row["session_id"],
        agent_id=row["agent_id"],
        turn_id=row["turn_id"],
        category=MemoryCategory(row["category"]),
        importance=row["importance"],
        entity_refs=_json_list(row["entity_refs"]),
        metadata=_json_dict(row["metadata"]),
        created_at=when(row["created_at"]),  # type: ignore[arg-type]
        valid_from=when(row["valid_from"]),  # type: ignore[arg-type]
        valid_until=when(row["valid_until"]),
        supersedes=row["supersedes"],
        superseded_by=row["superseded_by"],
        forgotten_at=when(row["forgotten_at"]),
        access_count=row["access_count"],
        last_accessed=when(row["last_accessed"]),
        embedding_model=row["embedding_model"],
    )


def event_json(value: Any) -> str | None:
    """An audit event's old/new value as stored (anything not JSON, such as a time, as text)."""
    return None if value is None else json.dumps(value, default=str)


def row_to_event(row: Mapping[str, Any], when: Callable[[Any], datetime | None]) -> dict[str, Any]:
    """A `memory_events` row (op, at, request_id, old, new) as the event dict stores return."""
    return {
        "op": row["op"],
        "at": when(row["at"]),
        "request_id": row["request_id"],
        "old": None if row["old"] is None else json.loads(row["old"]),
        "new": None if row["new"] is None else json.loads(row["new"]),
    }


@dataclass(frozen=True)
class Dialect:
    """How one backend spells a filter: its placeholder, a column-in-list test (SQL and its
    params), and how a time is passed as a parameter."""

    mark: str
    one_of: Callable[[str, list[Any]], tuple[str, list[Any]]]
    time: Callable[[datetime], Any]


def where_clause(flt: MemoryFilter, dialect: Dialect) -> tuple[str, list[Any]]:
    """SQL conditions for a filter. User isolation and scope are part of the WHERE clause itself,
    never applied to results afterwards."""
    p = dialect.mark
    clauses = [f"user_id = {p}"]
    params: list[Any] = [flt.user_id]

    def one_of(column: str, values: list[Any]) -> None:
        sql, values_params = dialect.one_of(column, values)
        clauses.append(sql)
        params.extend(values_params)

    if flt.all_scopes:
        for column in _SCOPE_COLUMNS:
            value = getattr(flt, column)
            if value is not None:
                clauses.append(f"{column} = {p}")
                params.append(value)
    else:
        one_of("scope_key", list(flt.scope.visible_keys()))
    if flt.as_of is not None:
        clauses.append(f"valid_from <= {p} AND (valid_until IS NULL OR valid_until > {p})")
        params.extend([dialect.time(flt.as_of), dialect.time(flt.as_of)])
    elif not flt.include_superseded:
        clauses.append("valid_until IS NULL")
    if flt.categories:
        one_of("category", [c.value for c in flt.categories])
    if flt.min_importance is not None:
        clauses.append(f"importance >= {p}")
        params.append(flt.min_importance)
    if flt.created_after is not None:
        clauses.append(f"created_at >= {p}")
        params.append(dialect.time(flt.created_after))
    if flt.created_before is not None:
        clauses.append(f"created_at < {p}")
        params.append(dialect.time(flt.created_before))
    return " AND ".join(clauses), params


def chain(get: Callable[[str], Memory | None], memory_id: str) -> list[Memory]:
    """The supersession chain through `memory_id`, oldest first (a cycle stops the walk)."""
    start = get(memory_id)
    if start is None:
        return []
    seen = {start.id}
    older = _follow(get, start, lambda m: m.supersedes, seen)
    newer = _follow(get, start, lambda m: m.superseded_by, seen)
    return [*reversed(older), start, *newer]


def _follow(
    get: Callable[[str], Memory | None], start: Memory,
    link: Callable[[Memory], str | None], seen: set[str],
) -> list[Memory]:
    """The memories `link` leads to from `start`, nearest first, none of them in `seen`."""
    out: list[Memory] = []
    cursor = start
    while (next_id := link(cursor)) and next_id not in seen:
        found = get(next_id)
        if found is None:
            break
        out.append(found)
        seen.add(found.id)
        cursor = found
    return out


def purge_filter(flt: MemoryFilter) -> MemoryFilter:
    """What a purge deletes: every row of the user in the given scope, superseded ones too."""
    return MemoryFilter(
        user_id=flt.user_id, session_id=flt.session_id, agent_id=flt.agent_id,
        turn_id=flt.turn_id, all_scopes=True, include_superseded=True, limit=None,
    )


def in_scope(scope: Mapping[str, Any], flt: MemoryFilter) -> bool:
    """Whether an outbox payload's scope falls inside a purge filter (unset levels match all)."""
    return all(
        getattr(flt, key) is None or scope.get(key) == getattr(flt, key)
        for key in _SCOPE_COLUMNS
    )


def stats_summary(
    counts: Sequence[int],
    grouped: Callable[[str], dict[str, int]],
    user_id: str | None,
    outbox_pending: int,
    outbox_dead: int,
) -> dict[str, Any]:
    """The stats both stores report, from (rows, current, superseded, forgotten) and a
    `grouped(expr)` that counts current rows by a SQL expression."""
    rows, n_current, n_superseded, n_forgotten = counts
    by_scope = grouped(
        "CASE WHEN turn_id IS NOT NULL THEN 'turn' WHEN agent_id IS NOT NULL THEN 'agent'"
        " WHEN session_id IS NOT NULL THEN 'session' ELSE 'user' END"
    )
    return {
        "total": n_current,
        "current": n_current,
        "superseded": n_superseded,
        "forgotten": n_forgotten,
        "rows": rows,
        "categories": grouped("category"),
        "scopes": {lvl: by_scope.get(lvl, 0) for lvl in ("user", "session", "agent", "turn")},
        "users": grouped("user_id") if user_id is None else {user_id: n_current},
        "outbox_pending": outbox_pending,
        "outbox_dead": outbox_dead,
    }

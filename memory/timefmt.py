"""One text format for times in SQLite: fixed-width UTC, so string order is time order."""

from __future__ import annotations

from datetime import UTC, datetime

_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def to_db(value: datetime | None = None) -> str:
    value = value or datetime.now(UTC)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime(_FORMAT)


def to_db_opt(value: datetime | None) -> str | None:
    return None if value is None else to_db(value)


def from_db(value: str | None) -> datetime | None:
    if value is None:
        return None
    # fromisoformat reads the trailing Z as UTC and is ~20x faster than strptime, which matters:
    # recall turns ~50 candidate rows into memories per query.
    return datetime.fromisoformat(value).astimezone(UTC)

"""Every exception the engine raises, so callers can catch one base class.

    HeadroomMemoryError
    ├── ValidationError          bad input: empty content, importance outside 0..1, unknown category
    ├── ConfigError              a MemoryConfig option that is invalid or not supported
    ├── MemoryNotFoundError      no memory with that id (for this user)
    ├── SupersededError          the memory is no longer current (superseded or forgotten)
    ├── StorageError             SQLite failed (cannot open, full, I/O, read-only, locked, corrupt)
    ├── EmbedderError            the embedding backend failed (model missing, HTTP error)
    ├── LimitExceededError       an operator limit (memories per user, new users a minute) is hit
    └── ImportFormatError        a bad line in a JSONL import (carries the line number)
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EmbedderError",
    "HeadroomMemoryError",
    "ImportFormatError",
    "LimitExceededError",
    "MemoryNotFoundError",
    "StorageError",
    "SupersededError",
    "ValidationError",
]


class HeadroomMemoryError(Exception):
    """Base class; named so it does not shadow the builtin MemoryError."""


class ValidationError(HeadroomMemoryError, ValueError):
    pass


class ConfigError(HeadroomMemoryError, ValueError):
    pass


class MemoryNotFoundError(HeadroomMemoryError, KeyError):
    def __init__(self, memory_id: str) -> None:
        super().__init__(memory_id)
        self.memory_id = memory_id

    def __str__(self) -> str:
        return f"no memory with id {self.memory_id!r}"


class SupersededError(HeadroomMemoryError):
    def __init__(self, memory_id: str, superseded_by: str | None) -> None:
        self.memory_id = memory_id
        self.superseded_by = superseded_by
        if superseded_by:
            msg = f"memory {memory_id!r} is not current: it was superseded by {superseded_by!r}"
        else:
            msg = f"memory {memory_id!r} is not current: it was forgotten"
        super().__init__(msg)


class StorageError(HeadroomMemoryError):
    """The database failed: `reason` is a short label for readiness and logs ("disk full",
    "I/O error", "read-only", "locked", "corrupt", "cannot open", "unavailable"); `path` is the
    file, when one is known."""

    def __init__(
        self, message: str, *, reason: str = "unavailable", path: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.path = path


class EmbedderError(HeadroomMemoryError):
    pass


class LimitExceededError(HeadroomMemoryError):
    """An add refused by `MemoryConfig.max_memories_per_user` or `max_new_users_per_minute`;
    `limit` names which."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class ImportFormatError(HeadroomMemoryError):
    def __init__(self, line_number: int, reason: str) -> None:
        self.line_number = line_number
        super().__init__(f"line {line_number}: {reason}")

"""The engine's direct writes (`add`, `update`, `supersede`, `forget`): validate, embed on the
embedding thread, then run the unit of work on the writer thread in one transaction.

The proxy's write-behind path (`writer`) runs the same unit of work on rows of the outbox.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from .errors import ValidationError
from .executors import Executors
from .models import Memory, MemoryCategory, MemoryDraft, as_utc, utcnow
from .parts import EngineParts
from .text import clean_text
from .unit_of_work import UnitOfWork

__all__ = ["Commands"]


def _check_importance(importance: float | None) -> None:
    if importance is not None and not 0.0 <= importance <= 1.0:
        raise ValidationError(f"importance must be between 0 and 1, got {importance!r}")


class Commands:
    def __init__(
        self, parts: EngineParts, executors: Executors, unit: UnitOfWork,
        after_write: Callable[[Iterable[str]], None],
    ) -> None:
        self.parts = parts
        self.executors = executors
        self.unit = unit
        # Told the users whose memories a write added (recall recounts their common words).
        self.after_write = after_write

    async def add_many(
        self, drafts: Sequence[MemoryDraft], *, request_id: str | None = None
    ) -> list[Memory]:
        """One embedding call and one transaction for the whole batch."""
        memories = [d.build(self.parts.embedder.model_id) for d in drafts]
        if not memories:
            return []
        vectors = await self.executors.embed([m.content for m in memories])
        items = [(m, v, d.dedup) for m, v, d in zip(memories, vectors, drafts, strict=True)]
        added = await self.executors.write(
            lambda: self.unit.insert_or_reinforce_many(items, request_id)
        )
        self.after_write(m.user_id for m in added)
        return added

    async def update(
        self, memory_id: str, *, metadata: dict[str, Any] | None, importance: float | None,
        entity_refs: list[str] | None, user_id: str | None, request_id: str | None,
    ) -> Memory:
        _check_importance(importance)
        return await self.executors.write(
            lambda: self.unit.update(
                memory_id, metadata=metadata, importance=importance, entity_refs=entity_refs,
                user_id=user_id, request_id=request_id,
            )
        )

    async def supersede(
        self, old_memory_id: str, new_content: str, *, category: MemoryCategory | str | None,
        importance: float | None, metadata: dict[str, Any] | None,
        entity_refs: list[str] | None, user_id: str | None, at: datetime | None,
        request_id: str | None,
    ) -> Memory:
        content = clean_text(new_content or "").strip()
        if not content:
            raise ValidationError("memory content must not be empty")
        _check_importance(importance)
        cat = MemoryCategory.parse(category) if category is not None else None
        vector = (await self.executors.embed([content]))[0]
        when = as_utc(at) if at else utcnow()
        new = await self.executors.write(
            lambda: self.unit.supersede(
                old_memory_id, content, vector, when, cat, importance, metadata, entity_refs,
                user_id, request_id,
            )
        )
        self.after_write([new.user_id])
        return new

    async def forget(
        self, memory_id: str, *, user_id: str | None, reason: str | None,
        request_id: str | None,
    ) -> Memory:
        forgotten = await self.executors.write(
            lambda: self.unit.forget(memory_id, user_id, reason, request_id)
        )
        self.after_write([forgotten.user_id])
        return forgotten

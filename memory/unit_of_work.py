"""The write unit of work: what one write does to the store and both indexes.

Every method runs on the writer thread inside the caller's transaction, so a row, its vector,
its full-text entry and its audit event commit or roll back together. The policies live here:
an exact or near-identical fact reinforces the memory it repeats (and may widen its scope, or
bubble it up to the user level when it becomes important enough), unless the near-identical one
is a *changed* fact (another number, date, name, or a negation: `changed_fact`), which supersedes
the old memory instead, so the history keeps both and the current value is the new one; a new
memory must fit the operator's limits (`limits`); a supersede closes the old row and indexes its
successor; a forget takes a memory off every current read path. The rules on the rows
themselves (what a supersede or forget changes) are `temporal`'s pure functions.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import numpy as np

from . import temporal
from .dedup import is_changed_fact
from .errors import MemoryNotFoundError, ValidationError
from .limits import WriteLimits
from .models import Memory, MemoryCategory, Scope, utcnow
from .parts import EngineParts

__all__ = ["UnitOfWork", "scope_dict"]


def scope_dict(scope: Scope) -> dict[str, str | None]:
    """A scope as an audit event records it."""
    return {
        "user_id": scope.user_id, "session_id": scope.session_id,
        "agent_id": scope.agent_id, "turn_id": scope.turn_id, "level": scope.level.value,
    }


CHANGED_FACT = "changed fact"  # the reason a near-duplicate's supersede event records


class UnitOfWork:
    def __init__(
        self, parts: EngineParts, *, limits: WriteLimits | None = None,
        changed_fact: Callable[[str, str], bool] | None = is_changed_fact,
    ) -> None:
        self.parts = parts
        self.limits = limits or WriteLimits(parts.config)
        # (old text, new text) -> whether the new one states a different fact (`dedup`); None
        # treats every near-duplicate as a restatement.
        self.changed_fact = changed_fact

    # --- adding ------------------------------------------------------------------------------

    def insert_or_reinforce(
        self, memory: Memory, vector: np.ndarray, *, dedup: bool, request_id: str | None
    ) -> Memory:
        """Add `memory`, or reinforce the current memory it repeats (same text, or cosine at
        least `dedup_threshold`); an important new memory is bubbled up to the user level."""
        p = self.parts
        if dedup:
            existing = p.store.find_current_by_content(memory.user_id, memory.content)
            if existing is None:
                hits = p.vectors.search(
                    vector, memory.user_id, scope_keys=None, categories=None, k=1
                )
                if hits and hits[0][1] >= p.config.dedup_threshold:
                    existing = p.store.get_by_rowids([hits[0][0]]).get(hits[0][0])
                    if existing is not None and self._changed(existing, memory):
                        if memory.created_at >= existing.valid_from:
                            return self._supersede_changed(existing, memory, vector, request_id)
                        existing = None  # an older value told late: stored beside the newer one
            if existing is not None:
                return self.reinforce(existing, memory, request_id)
        self.limits.check_new_memory(p.store, memory.user_id)
        if temporal.should_bubble(memory, p.config.bubble_importance_threshold):
            origin = memory.scope
            memory = temporal.promote(memory, Scope(memory.user_id))
            self.index_new(memory, vector, request_id)
            p.store.record_event(
                memory.id, memory.user_id, "promote", old=scope_dict(origin),
                new=scope_dict(memory.scope), request_id=request_id,
            )
            return memory
        self.index_new(memory, vector, request_id)
        return memory

    def _changed(self, existing: Memory, incoming: Memory) -> bool:
        return self.changed_fact is not None and self.changed_fact(
            existing.content, incoming.content
        )

    def _supersede_changed(
        self, existing: Memory, incoming: Memory, vector: np.ndarray, request_id: str | None
    ) -> Memory:
        """A near-duplicate that states another value: a new version of the old memory."""
        return self.supersede(
            existing.id, incoming.content, vector, incoming.created_at, incoming.category,
            max(existing.importance, incoming.importance), None,
            incoming.entity_refs or None, existing.user_id, request_id, reason=CHANGED_FACT,
        )

    def index_new(self, memory: Memory, vector: np.ndarray, request_id: str | None) -> int:
        """Insert a row (with its embedding) and, when current, its index entries; returns the
        row key."""
        p = self.parts
        memory.embedding = vector.tolist()
        rid = p.store.insert(memory)
        memory.embedding = None
        if memory.is_current:
            p.vectors.add(rid, memory.user_id, memory.scope.key, memory.category, vector)
            p.text.add(rid, memory.user_id, memory.scope.key, memory.category, memory.content)
        p.store.record_event(
            memory.id, memory.user_id, "add", new={"content": memory.content},
            request_id=request_id, at=memory.created_at,
        )
        return rid

    def reinforce(self, existing: Memory, incoming: Memory, request_id: str | None) -> Memory:
        p = self.parts
        now = utcnow()
        old_scope = existing.scope
        target = temporal.common_scope(old_scope, incoming.scope)
        existing.importance = max(existing.importance, incoming.importance)
        if temporal.should_bubble(existing, p.config.bubble_importance_threshold):
            target = Scope(existing.user_id)  # reinforced up to the bubbling threshold
        existing.access_count += 1
        existing.last_accessed = now
        if target != old_scope:
            existing = temporal.promote(existing, target)
            self.reindex(existing)
            p.store.record_event(
                existing.id, existing.user_id, "promote", old=scope_dict(old_scope),
                new=scope_dict(target), request_id=request_id,
            )
        p.store.save(existing)
        p.store.record_event(
            existing.id, existing.user_id, "reinforce",
            new={"content": incoming.content, "importance": existing.importance},
            request_id=request_id,
        )
        p.invalidate(existing.id)
        return existing

    def reindex(self, memory: Memory) -> None:
        """Re-add a current memory's index entries after its scope or category changed."""
        p = self.parts
        rid = p.store.rowid_of(memory.id)
        vector = p.store.get_embedding(memory.id)
        assert rid is not None and vector is not None
        p.vectors.remove([rid])
        p.text.remove([rid])
        p.vectors.add(rid, memory.user_id, memory.scope.key, memory.category, vector)
        p.text.add(rid, memory.user_id, memory.scope.key, memory.category, memory.content)

    # --- changing ----------------------------------------------------------------------------

    def update(
        self, memory_id: str, *, metadata: dict[str, Any] | None, importance: float | None,
        entity_refs: list[str] | None, user_id: str | None, request_id: str | None,
    ) -> Memory:
        """Change annotations in place (metadata merged); content never changes in place."""
        p = self.parts
        memory = self.load(memory_id, user_id)
        old = {"metadata": memory.metadata, "importance": memory.importance,
               "entity_refs": memory.entity_refs}
        if metadata:
            memory.metadata = {**memory.metadata, **metadata}
        if importance is not None:
            memory.importance = float(importance)
        if entity_refs is not None:
            memory.entity_refs = list(entity_refs)
        p.store.save(memory)
        p.store.record_event(
            memory.id, memory.user_id, "update", old=old,
            new={"metadata": memory.metadata, "importance": memory.importance,
                 "entity_refs": memory.entity_refs},
            request_id=request_id,
        )
        p.invalidate(memory.id)
        return memory

    def supersede(
        self, old_id: str, content: str, vector: np.ndarray, at: datetime,
        category: MemoryCategory | None, importance: float | None, metadata: dict | None,
        entity_refs: list[str] | None, user_id: str | None, request_id: str | None,
        *, reason: str | None = None,
    ) -> Memory:
        """Close `old_id` (valid_until, superseded_by) and index its successor; `reason`, when
        given, is recorded in the supersede event."""
        if not content.strip():  # the facade checks too; the outbox worker comes here directly
            raise ValidationError("memory content must not be empty")
        if importance is not None and not 0.0 <= importance <= 1.0:
            raise ValidationError(f"importance must be between 0 and 1, got {importance!r}")
        p = self.parts
        old = self.load(old_id, user_id)
        closed, new = temporal.supersede(
            old, content, at, category=category, importance=importance, metadata=metadata,
            entity_refs=entity_refs, embedding_model=p.embedder.model_id,
        )
        old_rid = p.store.rowid_of(closed.id)
        assert old_rid is not None
        p.store.save(closed)
        p.vectors.remove([old_rid])
        p.text.remove([old_rid])
        self.index_new(new, vector, request_id)
        change: dict[str, Any] = {"id": new.id, "content": new.content}
        if reason is not None:
            change["reason"] = reason
        p.store.record_event(
            closed.id, closed.user_id, "supersede", old={"content": closed.content},
            new=change, request_id=request_id, at=at,
        )
        p.invalidate(closed.id)
        return new

    def forget(
        self, memory_id: str, user_id: str | None, reason: str | None, request_id: str | None
    ) -> Memory:
        """Soft delete: off every current read path; the row and its history stay."""
        p = self.parts
        memory = temporal.forget(self.load(memory_id, user_id), utcnow())
        rid = p.store.rowid_of(memory.id)
        assert rid is not None
        p.store.save(memory)
        p.vectors.remove([rid])
        p.text.remove([rid])
        p.store.record_event(
            memory.id, memory.user_id, "forget", old={"content": memory.content},
            new={"reason": reason}, request_id=request_id,
        )
        p.invalidate(memory.id)
        return memory

    def load(self, memory_id: str, user_id: str | None) -> Memory:
        """The row with this id; another user's is not found."""
        memory = self.parts.store.get(memory_id)
        if memory is None or (user_id is not None and memory.user_id != user_id):
            raise MemoryNotFoundError(memory_id)
        return memory

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import numpy as np

from . import temporal
from .dedup import is_changed_fact
from .errors import MemoryNotFoundError, ValidationError
from .limits import WriteLimits
from .models import Memory, MemoryCategory, Scope, utcnow
from .parts import EngineParts

__all__ = ["BatchContentLookup", "BatchNearest", "UnitOfWork", "scope_dict"]


@runtime_checkable
class BatchContentLookup(Protocol):
    """A store that finds a whole batch's exact repeats in one statement (a server round trip
    per op is most of what a write costs on PostgreSQL; SQLite's are function calls)."""

    def find_current_by_contents(
        self, wanted: Sequence[tuple[str, str]]
    ) -> list[Memory | None]:
        """`find_current_by_content(user_id, content)` for each pair, in order; also takes each
        user's write lock (as that method does) before reading."""


@runtime_checkable
class BatchNearest(Protocol):
    """A vector index that finds a whole batch's nearest current vectors in one statement."""

    def nearest_many(
        self, probes: Sequence[tuple[str, np.ndarray]]
    ) -> list[tuple[int, float] | None]:
        """`search(vector, user_id, scope_keys=None, categories=None, k=1)` for each pair, in
        order: the top hit, or None when the user has no vector."""


@dataclass
class _Lookup:
    """What a batch lookup found for one op before the op ran."""

    exact: Memory | None
    nearest: tuple[int, float] | None


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

    def insert_or_reinforce_many(
        self, items: Sequence[tuple[Memory, np.ndarray, bool]], request_id: str | None
    ) -> list[Memory]:
        """`insert_or_reinforce` for each (memory, vector, dedup), in one transaction, with the
        same result as one after the other. When the store and vector index can look a batch
        up at once, the ops run in rounds, each holding at most one op per user (a user's ops
        in their order): a round's lookups are two statements for all of it, and what one op
        writes can change only its own user's later lookups, which are in later rounds."""
        p = self.parts
        store, vectors = p.store, p.vectors
        if (len(items) < 2 or not isinstance(store, BatchContentLookup)
                or not isinstance(vectors, BatchNearest)):
            return [
                self.insert_or_reinforce(m, v, dedup=d, request_id=request_id)
                for m, v, d in items
            ]
        results: list[Memory | None] = [None] * len(items)
        for round_ in _rounds([m.user_id for m, _, _ in items]):
            # Every op is looked up, dedup or not: the lookup takes the users' write locks, all
            # at once in one order (round 1 holds every user of the batch), so two batches
            # sharing users never wait on each other in a cycle.
            looked_up = store.find_current_by_contents(
                [(items[i][0].user_id, items[i][0].content) for i in round_]
            )
            probed = [i for i in round_ if items[i][2]]
            exact = [e for i, e in zip(round_, looked_up, strict=True) if items[i][2]]
            unmatched = [i for i, e in zip(probed, exact, strict=True) if e is None]
            nearest = dict(zip(unmatched, vectors.nearest_many(
                [(items[i][0].user_id, items[i][1]) for i in unmatched]
            ), strict=True))
            found = {i: _Lookup(e, nearest.get(i)) for i, e in zip(probed, exact, strict=True)}
            for i in round_:
                memory, vector, dedup = items[i]
                results[i] = self.insert_or_reinforce(
                    memory, vector, dedup=dedup, request_id=request_id, found=found.get(i)
                )
        return [m for m in results if m is not None]

    def insert_or_reinforce(
        self, memory: Memory, vector: np.ndarray, *, dedup: bool, request_id: str | None,
        found: _Lookup | None = None,
    ) -> Memory:
        """Add `memory`, or reinforce the current memory it repeats (same text, or cosine at
        least `dedup_threshold`); an important new memory is bubbled up to the user level.
        `found` is what a batch lookup found for it (and its user's lock is held)."""
        p = self.parts
        if dedup:
            if found is None:
                existing = p.store.find_current_by_content(memory.user_id, memory.content)
            else:
                existing = found.exact
            if existing is None:
                if found is None:
                    hits = p.vectors.search(
                        vector, memory.user_id, scope_keys=None, categories=None, k=1
                    )
                else:
                    hits = [found.nearest] if found.nearest is not None else []
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


def _rounds(user_ids: Sequence[str]) -> list[list[int]]:
    """Indexes of `user_ids` in rounds: round k holds each user's k-th op, in batch order."""
    seen: dict[str, int] = {}
    rounds: list[list[int]] = []
    for i, user_id in enumerate(user_ids):
        k = seen.get(user_id, 0)
        seen[user_id] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(i)
    return rounds

"""Supersession, forgetting, as-of and promotion rules as pure functions (no I/O).

Two clocks, kept apart: `created_at` is when we learned a fact; `valid_from` / `valid_until` is when
it was true. A superseded or forgotten memory gets `valid_until` and leaves every current read
path, but its row stays for history and as-of reads.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from .errors import SupersededError, ValidationError
from .models import Memory, MemoryCategory, Scope, new_id

__all__ = ["common_scope", "forget", "promote", "should_bubble", "supersede"]


def ensure_current(memory: Memory) -> None:
    if not memory.is_current:
        raise SupersededError(memory.id, memory.superseded_by)


def supersede(
    old: Memory, new_content: str, at: datetime, *, category: MemoryCategory | None = None,
    importance: float | None = None, metadata: dict | None = None,
    entity_refs: list[str] | None = None, embedding_model: str | None = None,
) -> tuple[Memory, Memory]:
    """(closed old, new) — the new memory inherits scope, category and importance unless given."""
    ensure_current(old)
    if at < old.valid_from:  # the old memory would end before it began
        raise ValidationError(
            f"cannot supersede memory {old.id!r} at {at.isoformat()}: it is valid only from "
            f"{old.valid_from.isoformat()}"
        )
    new = Memory(
        id=new_id(),
        content=new_content,
        user_id=old.user_id,
        session_id=old.session_id,
        agent_id=old.agent_id,
        turn_id=old.turn_id,
        category=category or old.category,
        importance=old.importance if importance is None else importance,
        entity_refs=list(old.entity_refs if entity_refs is None else entity_refs),
        metadata=dict(old.metadata if metadata is None else metadata),
        created_at=at,
        valid_from=at,
        supersedes=old.id,
        embedding_model=embedding_model,
    )
    closed = replace(old, valid_until=at, superseded_by=new.id)
    return closed, new


def forget(memory: Memory, at: datetime) -> Memory:
    ensure_current(memory)
    return replace(memory, valid_until=at, forgotten_at=at)


def common_scope(a: Scope, b: Scope) -> Scope:
    """The narrowest scope that contains both: where a fact stated in both places belongs."""
    if a.user_id != b.user_id:
        raise ValueError("scopes of different users have no common scope")
    ids: list[str | None] = []
    for x, y in (
        (a.session_id, b.session_id),
        (a.agent_id, b.agent_id),
        (a.turn_id, b.turn_id),
    ):
        if x != y or x is None:
            break
        ids.append(x)
    ids += [None] * (3 - len(ids))
    return Scope(a.user_id, *ids)


def promote(memory: Memory, to: Scope) -> Memory:
    return replace(memory, session_id=to.session_id, agent_id=to.agent_id, turn_id=to.turn_id)


def should_bubble(memory: Memory, threshold: float | None) -> bool:
    """A narrow memory important enough to hold in every session moves up to USER scope."""
    return (
        threshold is not None
        and memory.importance >= threshold
        and memory.scope != Scope(memory.user_id)
    )

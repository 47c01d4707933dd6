"""What an outbox row holds: one `<memory>` block's ops, the request's scope and its id, as JSON.

Text is made valid (`text.clean_text`) when a payload is written and again when one is read, so
a row written by an older version with a lone surrogate in it is repaired rather than failing
forever.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .models import MemoryOps, Scope
from .text import clean_text

__all__ = ["OutboxPayload", "clean_ops", "decode_payload", "encode_payload", "op_count"]


def clean_ops(ops: MemoryOps) -> MemoryOps:
    """`ops` with every text and id made valid UTF-8."""
    return MemoryOps(
        add=tuple(
            replace(a, text=clean_text(a.text),
                    entity_refs=tuple(clean_text(e) for e in a.entity_refs))
            for a in ops.add
        ),
        update=tuple(replace(u, id=clean_text(u.id), text=clean_text(u.text)) for u in ops.update),
        forget=tuple(replace(f, id=clean_text(f.id)) for f in ops.forget),
    )


def op_count(ops: MemoryOps) -> int:
    return len(ops.add) + len(ops.update) + len(ops.forget)


def encode_payload(ops: MemoryOps, scope: Scope, request_id: str | None) -> dict[str, Any]:
    return {
        "ops": clean_ops(ops).to_dict(),
        "scope": {
            "user_id": scope.user_id, "session_id": scope.session_id,
            "agent_id": scope.agent_id, "turn_id": scope.turn_id,
        },
        "request_id": request_id,
    }


class OutboxPayload:
    """A decoded row: its ops, the scope they were written from, and the request's id."""

    __slots__ = ("ops", "request_id", "scope")

    def __init__(self, ops: MemoryOps, scope: Scope, request_id: str | None) -> None:
        self.ops = ops
        self.scope = scope
        self.request_id = request_id

    @property
    def texts(self) -> list[str]:
        """What to embed for this row: each add's text, then each update's."""
        return [a.text for a in self.ops.add] + [u.text for u in self.ops.update]


def decode_payload(payload: dict[str, Any]) -> OutboxPayload:
    """Raises (KeyError, TypeError, ValueError, ValidationError) for a malformed payload: the
    caller treats that as a fault of this row only."""
    s = payload["scope"]
    scope = Scope(s["user_id"], s.get("session_id"), s.get("agent_id"), s.get("turn_id"))
    request_id = payload.get("request_id")
    return OutboxPayload(
        clean_ops(MemoryOps.from_dict(payload["ops"])), scope,
        None if request_id is None else str(request_id),
    )

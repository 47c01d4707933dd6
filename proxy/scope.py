"""Turns the X-Headroom-* headers (or the body's `user`) into a frozen request scope and memory
mode. No other module reads those headers."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..memory.models import Scope
from .errors import BadRequestError

__all__ = ["HEADROOM_HEADER_PREFIX", "MemoryMode", "RequestScope", "scope_from_request"]

HEADROOM_HEADER_PREFIX = "x-headroom-"
_MAX_ID = 256


class MemoryMode(enum.StrEnum):
    ON = "on"
    OFF = "off"
    READ = "read"  # recall only
    WRITE = "write"  # extract only

    @property
    def recall(self) -> bool:
        return self in (MemoryMode.ON, MemoryMode.READ)

    @property
    def extract(self) -> bool:
        return self in (MemoryMode.ON, MemoryMode.WRITE)


@dataclass(frozen=True)
class RequestScope:
    request_id: str
    scope: Scope | None  # None: no user id, the proxy is a transparent pass-through
    mode: MemoryMode

    @property
    def active(self) -> bool:
        return self.scope is not None and self.mode is not MemoryMode.OFF


def _clean_id(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequestError(f"{name} must be a string")
    value = value.strip()
    if not value:
        return None
    if len(value) > _MAX_ID or any(ord(c) < 32 for c in value):
        raise BadRequestError(f"{name} must be at most {_MAX_ID} printable characters")
    return value


def scope_from_request(headers: Mapping[str, str], body: Mapping[str, Any] | None) -> RequestScope:
    raw_mode = (headers.get("x-headroom-memory") or "on").strip().lower()
    try:
        mode = MemoryMode(raw_mode)
    except ValueError:
        raise BadRequestError(
            f"X-Headroom-Memory must be one of on, off, read, write (got {raw_mode!r})",
            code="invalid_header",
        ) from None
    user_id = _clean_id("X-Headroom-User-Id", headers.get("x-headroom-user-id"))
    if user_id is None and body is not None:
        user_id = _clean_id("user", body.get("user"))
    scope = None
    if user_id is not None:
        scope = Scope(
            user_id,
            _clean_id("X-Headroom-Session-Id", headers.get("x-headroom-session-id")),
            _clean_id("X-Headroom-Agent-Id", headers.get("x-headroom-agent-id")),
            _clean_id("X-Headroom-Turn-Id", headers.get("x-headroom-turn-id")),
        )
    return RequestScope(request_id="hr-" + uuid.uuid4().hex[:20], scope=scope, mode=mode)

"""Turns the X-Headroom-* headers (or the body's `user`) into a frozen request scope and memory
mode, inside the tenant of whoever is asking. No other module reads those headers, and this is the
one place where ids are checked.

Ids (user, session, agent, turn, key bindings): 1 to 256 characters of UTF-8 text, compared code
point for code point. Header values are decoded as UTF-8 (the same id in a header and in the body's
`user` is the same user); leading and trailing whitespace is trimmed; refused with a 400:
control and format characters (Unicode categories Cc, Cf, Co, Cn, Cs: NUL..U+001F, U+007F,
U+0085, zero-width and bidi marks, ...), any whitespace or line/paragraph separator (Zs, Zl, Zp:
spaces, U+2028, U+2029, ...), and the tenant separator `|`.

Tenants: a proxy key binds a tenant (`[a-z0-9][a-z0-9_.-]{0,62}`). The engine knows only user ids,
so the engine's user id of user U in tenant T is `T|U`; since no client id may hold `|`, no client
can name another tenant's user. The keyless default tenant (`default`) keeps plain ids, so
databases from before keys existed keep working and their users belong to it.
"""

from __future__ import annotations

import contextvars
import enum
import re
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..memory.models import Scope
from .errors import BadRequestError, PermissionDeniedError

if TYPE_CHECKING:
    from .limits import RateLimiter

__all__ = [
    "DEFAULT_TENANT",
    "HEADROOM_HEADER_PREFIX",
    "KEYLESS",
    "MAX_ID_CHARS",
    "TENANT_SEPARATOR",
    "MemoryMode",
    "Principal",
    "RequestScope",
    "bind_principal",
    "check_id",
    "check_tenant",
    "client_user_id",
    "current_principal",
    "engine_user_id",
    "header_text",
    "reset_principal",
    "scope_from_request",
]

HEADROOM_HEADER_PREFIX = "x-headroom-"
MAX_ID_CHARS = 256
TENANT_SEPARATOR = "|"
DEFAULT_TENANT = "default"
_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cn", "Cs", "Zs", "Zl", "Zp"})


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
class Principal:
    """Who is asking: the tenant and key of an authenticated request, or the keyless local user.
    `skip_memory` (set by the auth layer, e.g. a key over its request limit) turns memory off for
    this request and says why in the receipt."""

    tenant: str = DEFAULT_TENANT
    key_id: str | None = None
    user: str | None = None  # the key may act for this user only
    user_prefix: str | None = None  # ... or for users whose id starts with this
    admin: bool = False
    requests_per_minute: int | None = None  # None: the server's default
    memories_per_minute: int | None = None  # resolved: the key's own, else the server's
    skip_memory: str | None = None
    notes: list[str] = field(default_factory=list, compare=False)
    limiter: RateLimiter | None = field(default=None, compare=False, repr=False)

    @property
    def authenticated(self) -> bool:
        return self.key_id is not None

    def allows(self, user_id: str) -> bool:
        if self.user is not None:
            return user_id == self.user
        if self.user_prefix is not None:
            return user_id.startswith(self.user_prefix)
        return True


KEYLESS = Principal(admin=True)  # loopback without keys: the local user owns the database

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "headroom_principal", default=None
)


def current_principal() -> Principal:
    """The principal the auth middleware bound to this request (keyless when there is none:
    the in-process wrapper and direct calls have no keys)."""
    return _principal.get() or KEYLESS


def bind_principal(principal: Principal) -> contextvars.Token[Principal | None]:
    return _principal.set(principal)


def reset_principal(token: contextvars.Token[Principal | None]) -> None:
    _principal.reset(token)


@dataclass(frozen=True)
class RequestScope:
    request_id: str
    scope: Scope | None  # None: no user id, the proxy is a transparent pass-through
    mode: MemoryMode

    @property
    def active(self) -> bool:
        return self.scope is not None and self.mode is not MemoryMode.OFF


def header_text(value: str) -> str:
    """A header value as the client wrote it. ASGI gives bytes and starlette decodes them as
    latin-1, which is lossless, so encoding back gives the bytes to decode as UTF-8."""
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:  # already text (not from an ASGI scope)
        return value
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestError("header values must be UTF-8", code="invalid_header") from None


def check_id(name: str, value: Any) -> str:
    """The one id rule (see the module docstring); returns the trimmed id or raises a 400."""
    if not isinstance(value, str):
        raise BadRequestError(f"{name} must be a string")
    value = value.strip()
    if not value:
        raise BadRequestError(f"{name} must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise BadRequestError(f"{name} must be at most {MAX_ID_CHARS} characters")
    for char in value:
        if char == TENANT_SEPARATOR or unicodedata.category(char) in _REFUSED_CATEGORIES:
            raise BadRequestError(
                f"{name} must not contain whitespace, control or format characters or "
                f"{TENANT_SEPARATOR!r} (found U+{ord(char):04X})"
            )
    return value


def check_tenant(value: str) -> str:
    if not isinstance(value, str) or not _TENANT_RE.fullmatch(value):
        raise BadRequestError(
            "a tenant is 1-63 characters of a-z, 0-9, '_', '.', '-', starting with a letter or "
            f"digit (got {value!r})",
            code="invalid_tenant",
        )
    return value


def engine_user_id(tenant: str, user_id: str) -> str:
    """The id the engine stores for `user_id` of `tenant` (both already checked)."""
    return user_id if tenant == DEFAULT_TENANT else f"{tenant}{TENANT_SEPARATOR}{user_id}"


def client_user_id(tenant: str, engine_id: str) -> str | None:
    """The inverse of `engine_user_id`; None when the engine's id is not of this tenant."""
    if tenant == DEFAULT_TENANT:
        return None if TENANT_SEPARATOR in engine_id else engine_id
    prefix = f"{tenant}{TENANT_SEPARATOR}"
    return engine_id[len(prefix):] if engine_id.startswith(prefix) else None


def _out_of_new_memories(principal: Principal) -> bool:
    if principal.limiter is None or principal.key_id is None:
        return False
    return not principal.limiter.has(principal.key_id, "memories",
                                     principal.memories_per_minute)


def _optional_id(name: str, value: Any, *, from_header: bool) -> str | None:
    if value is None:
        return None
    if from_header and isinstance(value, str):
        value = header_text(value)
    if isinstance(value, str) and not value.strip():
        return None
    return check_id(name, value)


def scope_from_request(
    headers: Mapping[str, str], body: Mapping[str, Any] | None,
    principal: Principal | None = None,
) -> RequestScope:
    """`principal` defaults to the one bound to this request by the auth middleware. A key bound
    to one user acts for that user when the request names none; naming another user is a 403."""
    principal = principal or current_principal()
    raw_mode = (headers.get("x-headroom-memory") or "on").strip().lower()
    try:
        mode = MemoryMode(raw_mode)
    except ValueError:
        raise BadRequestError(
            f"X-Headroom-Memory must be one of on, off, read, write (got {raw_mode!r})",
            code="invalid_header",
        ) from None
    user_id = _optional_id("X-Headroom-User-Id", headers.get("x-headroom-user-id"),
                           from_header=True)
    if user_id is None and body is not None:
        user_id = _optional_id("user", body.get("user"), from_header=False)
    if user_id is None:
        user_id = principal.user
    if user_id is not None and not principal.allows(user_id):
        raise PermissionDeniedError(
            "this API key may not act for that user", code="user_not_allowed"
        )
    request_id = "hr-" + uuid.uuid4().hex[:20]
    if principal.key_id is not None:
        # Memory events record the request id: this names the key that wrote them (never its
        # secret).
        request_id += f".k-{principal.key_id}"
    if principal.skip_memory is not None and user_id is not None:
        principal.notes.append(principal.skip_memory)
        mode = MemoryMode.OFF
    elif mode.extract and user_id is not None and _out_of_new_memories(principal):
        # Do not even ask the model to write; recall still runs.
        principal.notes.append(
            f"memory writes skipped: key over its limit of {principal.memories_per_minute} "
            "new memories/min"
        )
        mode = MemoryMode.READ if mode is MemoryMode.ON else MemoryMode.OFF
    scope = None
    if user_id is not None:
        scope = Scope(
            engine_user_id(principal.tenant, user_id),
            _optional_id("X-Headroom-Session-Id", headers.get("x-headroom-session-id"),
                         from_header=True),
            _optional_id("X-Headroom-Agent-Id", headers.get("x-headroom-agent-id"),
                         from_header=True),
            _optional_id("X-Headroom-Turn-Id", headers.get("x-headroom-turn-id"),
                         from_header=True),
        )
    return RequestScope(request_id=request_id, scope=scope, mode=mode)

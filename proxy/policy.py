"""Who may do what, decided once at startup: the auth mode and why (`resolve_auth`), the web
origins allowed in, which routes may spend the operator's upstream key (`RouteRule`), that key
(or a tenant's own) and the default per-key limits. Pure: settings in, an `AuthPolicy` out."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..memory.models import is_database_url
from .keys import default_key_db

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_UPSTREAM_ROUTES",
    "AuthConfigError",
    "AuthPolicy",
    "RouteRule",
    "is_loopback",
    "log_policy",
    "resolve_auth",
]

# What a request carrying the operator's key may reach upstream ("METHOD /path", `*` = one
# segment). Files, batches, fine-tunes, organisation admin: not with the operator's key.
DEFAULT_UPSTREAM_ROUTES: tuple[str, ...] = (
    "POST /v1/chat/completions",
    "POST /v1/responses",
    "POST /v1/messages",
    "POST /v1/embeddings",
    "GET /v1/models",
    "GET /v1/models/*",
)


class AuthConfigError(ValueError):
    """A combination of settings that would expose memory or the operator's key."""


@dataclass(frozen=True)
class RouteRule:
    method: str | None  # None: any method
    parts: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> RouteRule:
        method, _, path = text.strip().rpartition(" ")
        if not path.startswith("/v1/"):
            raise AuthConfigError(f"an upstream route starts with /v1/: {text!r}")
        return cls(method.strip().upper() or None, tuple(path.strip("/").split("/")))

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        parts = path.strip("/").split("/")
        return len(parts) == len(self.parts) and all(
            want in ("*", got) for want, got in zip(self.parts, parts, strict=True)
        )


@dataclass(frozen=True)
class AuthPolicy:
    required: bool
    reason: str
    key_db: Path | str  # a SQLite file or a postgresql:// URL (proxy.keys.open_key_store)
    # auth off although an upstream key is set: anonymous requests get it (explicitly allowed)
    open_relay: bool = False
    cors_origins: frozenset[str] = frozenset()
    upstream_key: str | None = field(default=None, repr=False)
    tenant_upstream_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    upstream_routes: tuple[RouteRule, ...] = ()
    requests_per_minute: int | None = None
    memories_per_minute: int | None = None

    @property
    def mode(self) -> str:
        return "on" if self.required else "off"

    def operator_key(self, tenant: str | None) -> str | None:
        if tenant is not None and tenant in self.tenant_upstream_keys:
            return self.tenant_upstream_keys[tenant]
        return self.upstream_key

    def route_allowed(self, method: str, path: str) -> bool:
        return any(rule.matches(method, path) for rule in self.upstream_routes)


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def resolve_auth(config: Any) -> AuthPolicy:
    """The auth mode and why. `auto` requires keys on a non-loopback bind or when an upstream key
    is configured; `off` there needs `allow_unauthenticated` (and is logged loudly)."""
    mode = str(config.auth).lower()
    if mode not in ("auto", "on", "off"):
        raise AuthConfigError(f"auth must be auto, on or off (got {config.auth!r})")
    exposed = [] if is_loopback(config.host) else [f"listening on {config.host}, not loopback"]
    has_key = bool(config.upstream_key) or bool(config.tenant_upstream_keys)
    if has_key:
        exposed.append("an upstream key is configured")
    if mode == "on":
        required, reason = True, "--auth on"
    elif mode == "auto":
        required = bool(exposed)
        reason = " and ".join(exposed) if exposed else "loopback bind without an upstream key"
    else:
        if exposed and not config.allow_unauthenticated:
            raise AuthConfigError(
                f"--auth off refused: {' and '.join(exposed)}; anyone who can connect could "
                "read and erase every user's memory"
                + (" and spend the upstream key" if has_key else "")
                + ". Pass --allow-unauthenticated to do it anyway."
            )
        required = False
        reason = "--auth off" + (f" although {' and '.join(exposed)}" if exposed else "")
    key_db = _key_db(config.key_db_path) if config.key_db_path else default_key_db(
        config.db_path
    )
    return AuthPolicy(
        required=required, reason=reason, key_db=key_db,
        open_relay=not required and has_key,
        cors_origins=frozenset(o.strip().rstrip("/").lower() for o in config.cors_origins),
        upstream_key=config.upstream_key or None,
        tenant_upstream_keys=dict(config.tenant_upstream_keys),
        upstream_routes=tuple(RouteRule.parse(r) for r in config.upstream_routes),
        requests_per_minute=config.key_requests_per_minute,
        memories_per_minute=config.key_memories_per_minute,
    )





def _key_db(target: str | Path) -> Path | str:
    """A postgresql:// URL stays a str (a Path would fold its `//`)."""
    return str(target) if is_database_url(target) else Path(target)


def log_policy(policy: AuthPolicy) -> None:
    """One line at startup saying which mode is on and why; loud when it is risky."""
    if policy.required:
        log.info("auth on (%s): clients need a proxy key (headroom keys create)", policy.reason)
    elif policy.open_relay or "not loopback" in policy.reason:
        log.warning(
            "AUTH OFF (%s): anyone who can connect can read and erase every user's memory%s",
            policy.reason, " and spend the upstream key" if policy.open_relay else "",
        )
    else:
        log.info("auth off (%s): keyless quick start; proxy keys still work", policy.reason)

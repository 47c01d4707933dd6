"""The gate in front of every route (pure ASGI): path checks, the Origin/CORS policy, proxy-key
authentication, the tenant binding, the operator-key route allowlist and per-key request limits.

What a request goes through, in order:
1. its raw path (`raw_path`, before any normalisation) must be `/v1/...`, `/admin/v1/...`,
   `/healthz` or `/readyz`, with no dot segments (also percent-encoded), no `//`, no encoded
   `.`, `\\`, `%` or NUL, and not in absolute form: else 400;
2. an `Origin` (or `Sec-Fetch-Site: cross-site`) outside the allowlist (`--cors-origin`, empty by
   default) is a 403; `OPTIONS` preflights are answered here from that policy, never forwarded;
3. memory-bearing requests with a body must be `application/json` (else 415), so a cross-site
   "simple" request (text/plain) can never carry a memory write;
4. the key: `Authorization: Bearer hk_...` is checked (401 when unknown, revoked or expired)
   whatever the mode, and removed; when auth is required, a request without one is a 401;
5. `/admin/v1/` needs an admin key (or the keyless local user);
6. when the operator's upstream key is attached (authenticated requests; anonymous ones only in the
   explicitly allowed open-relay mode), the route must be on the upstream allowlist (else 403);
7. a key over its request limit gets its memory steps skipped (a receipt note says so) or, for
   admin work, a 429.
The principal (tenant, key id, bindings) is then bound for `proxy.scope` to read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..memory.errors import StorageError
from .errors import (
    AuthenticationError,
    BadRequestError,
    PermissionDeniedError,
    ProxyError,
    RateLimitError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
    error_response,
)
from .keys import KEY_PREFIX, KeyStore, open_key_store
from .limits import RateLimiter
from .policy import (
    DEFAULT_UPSTREAM_ROUTES,
    AuthConfigError,
    AuthPolicy,
    RouteRule,
    is_loopback,
    log_policy,
    resolve_auth,
)
from .scope import KEYLESS, Principal, bind_principal, reset_principal

# The policy's names are re-exported: callers know them as proxy.auth's.
__all__ = [
    "DEFAULT_UPSTREAM_ROUTES",
    "MEMORY_ROUTES",
    "AuthConfigError",
    "AuthMiddleware",
    "AuthPolicy",
    "RouteRule",
    "check_path",
    "is_loopback",
    "log_policy",
    "resolve_auth",
]

# Routes whose body can carry memory (a user id, messages to recall for and extract from).
MEMORY_ROUTES = frozenset({"/v1/chat/completions", "/v1/responses", "/v1/messages"})
_PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
_ADMIN_PREFIX = "/admin/v1/"
# An encoded `/` stays (model ids such as meta-llama%2FLlama-3); the dot-segment check below runs
# on the decoded path, so `..%2F..` is refused all the same.
_ENCODED_FORBIDDEN = re.compile(rb"%(2e|5c|25|00)", re.IGNORECASE)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_PREFLIGHT_MAX_AGE = "600"
_NOTES = b"x-headroom-memory-notes"
_ALT_KEYS = (b"x-api-key", b"api-key")
_EXPOSED = (
    "x-headroom-request-id, x-headroom-memories-injected, x-headroom-memory-overhead-ms, "
    "x-headroom-memory-notes, x-headroom-memory-block"
)


def check_path(raw: bytes) -> str:
    """The request path, refused (400) unless it is plainly one of ours. `raw` is the ASGI
    `raw_path`: what the client sent, before uvicorn decoded `%2e` or anything else."""
    if not raw.startswith(b"/"):
        raise BadRequestError("request target must be a path (no absolute form)",
                              code="invalid_path")
    if b"//" in raw or b"\\" in raw or _ENCODED_FORBIDDEN.search(raw):
        raise BadRequestError("request path must not contain '//', '\\' or an encoded '.', "
                              "'\\', '%' or NUL", code="invalid_path")
    decoded = unquote_to_bytes(raw)
    if any(b < 0x20 or b == 0x7F for b in decoded):
        raise BadRequestError("request path must not contain control characters",
                              code="invalid_path")
    if b"//" in decoded or any(part in (b".", b"..") for part in decoded.split(b"/")):
        raise BadRequestError("request path must not contain dot segments", code="invalid_path")
    path = decoded.decode("utf-8", errors="replace")
    if not (path.startswith("/v1/") or path.startswith(_ADMIN_PREFIX) or path in _PUBLIC_PATHS):
        raise BadRequestError("only /v1/ (the upstream API) and /admin/v1/ are served here",
                              code="invalid_path")
    return path


def _headers(scope: Scope, name: bytes) -> list[bytes]:
    return [v for k, v in scope["headers"] if k.lower() == name]


def _one(scope: Scope, name: bytes) -> bytes | None:
    values = _headers(scope, name)
    if len(values) > 1:
        raise BadRequestError(f"{name.decode()} must be sent once", code="invalid_header")
    return values[0] if values else None


def _bearer(value: bytes | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class _OverLimit(RateLimitError):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AuthMiddleware:
    def __init__(self, app: ASGIApp, policy: AuthPolicy, keys: KeyStore | None = None) -> None:
        self.app = app
        self.policy = policy
        # A store given by the caller is the caller's to close; the one opened here closes
        # with the server (its PostgreSQL pool would otherwise outlive the app).
        self._owns_keys = keys is None
        self.keys: KeyStore = keys or open_key_store(policy.key_db)
        self.limiter = RateLimiter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no route takes one; refuse the handshake here
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] == "lifespan" and self._owns_keys:
            await self.app(scope, receive, self._closing_keys_after_shutdown(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = _one_or_none(scope, b"origin")
        allowed_origin = origin if origin and origin.lower() in self.policy.cors_origins else None
        try:
            principal = await self._admit(scope, origin, allowed_origin)
        except ProxyError as exc:
            headers = self._cors_headers(allowed_origin)
            if isinstance(exc, _OverLimit):
                headers["retry-after"] = str(exc.retry_after)
            await error_response(exc, headers=headers)(scope, receive, send)
            return
        if principal is None:  # a preflight, answered
            await self._preflight(scope, allowed_origin, send)
            return
        scope.setdefault("state", {})["headroom.principal"] = principal
        token = bind_principal(principal)
        extra = self._cors_headers(allowed_origin)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                for name, value in extra.items():
                    headers.append((name.encode(), value.encode()))
                if principal.notes:  # merged into the turn's own notes, if it wrote any
                    ours = "; ".join(principal.notes).encode()
                    theirs = [v for k, v in headers if k.lower() == _NOTES]
                    headers = [(k, v) for k, v in headers if k.lower() != _NOTES]
                    headers.append((_NOTES, b"; ".join([*theirs, ours])))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            reset_principal(token)

    def _closing_keys_after_shutdown(self, send: Send) -> Send:
        async def close_then_send(message: Message) -> None:
            # Before the server hears "complete": after it, it stops waiting on this task.
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await asyncio.to_thread(self.keys.close)
            await send(message)

        return close_then_send

    async def _admit(
        self, scope: Scope, origin: str | None, allowed_origin: str | None
    ) -> Principal | None:
        raw = scope.get("raw_path") or scope["path"].encode()
        path = check_path(raw)
        method = scope["method"].upper()
        if origin is not None and allowed_origin is None:
            raise PermissionDeniedError(
                f"requests from the web origin {origin!r} are not allowed (see --cors-origin)",
                code="origin_not_allowed",
            )
        if allowed_origin is None and _one_or_none(scope, b"sec-fetch-site") == "cross-site":
            raise PermissionDeniedError("cross-site requests are not allowed",
                                        code="origin_not_allowed")
        if method == "OPTIONS":
            return None
        if path in _PUBLIC_PATHS:
            return _keyless()
        admin = path.startswith(_ADMIN_PREFIX)
        if method in _BODY_METHODS and (admin or path.rstrip("/") in MEMORY_ROUTES):
            media = (_one_or_none(scope, b"content-type") or "").split(";")[0].strip().lower()
            if media != "application/json":
                raise UnsupportedMediaTypeError(
                    f"{path} takes application/json (got {media or 'no content type'})"
                )
        principal = await self._authenticate(scope)
        if admin:
            if not principal.admin:
                raise PermissionDeniedError("the admin API needs an admin key",
                                            code="admin_key_required")
        elif principal.authenticated or self.policy.open_relay:
            # Matched on the path as sent (and forwarded): `%2F` inside a model id is one segment.
            self._attach_operator_key(scope, principal, method, raw.decode("latin-1"))
        if principal.key_id is not None:
            limit = principal.requests_per_minute
            if limit is None:
                limit = self.policy.requests_per_minute
            if not self.limiter.take(principal.key_id, "requests", limit):
                if admin:
                    raise _OverLimit(
                        f"this key is over its limit of {limit} requests per minute",
                        self.limiter.retry_after(principal.key_id, "requests", limit),
                    )
                return dataclasses.replace(
                    principal,
                    skip_memory=f"memory skipped: key over its limit of {limit} requests/min",
                    notes=[],
                )
        return principal

    async def _authenticate(self, scope: Scope) -> Principal:
        token = _bearer(_one(scope, b"authorization"))
        # SDKs put their api_key in Authorization (OpenAI), x-api-key (Anthropic) or api-key
        # (Azure): a proxy key counts in any of them, and none of them goes upstream.
        presented: dict[bytes, str] = {}
        if token and token.startswith(KEY_PREFIX):
            presented[b"authorization"] = token
        for name in _ALT_KEYS:
            value = (_one(scope, name) or b"").decode("latin-1").strip()
            if value.startswith(KEY_PREFIX):
                presented[name] = value
        if len(set(presented.values())) > 1:
            raise BadRequestError("two different proxy keys in one request",
                                  code="invalid_header")
        if presented:
            for name in presented:
                _drop_header(scope, name)
            token = next(iter(presented.values()))
            try:
                check = await asyncio.to_thread(self.keys.verify, token)
            except StorageError as exc:
                # Not failing open: a key that cannot be checked admits nobody.
                raise ServiceUnavailableError(
                    f"proxy keys cannot be checked now (key store unreachable: {exc.reason}); "
                    "retry shortly", code="key_store_unavailable",
                ) from exc
            if not check.ok or check.key is None:
                reason = check.reason or "unknown"
                raise AuthenticationError(
                    "invalid API key" if reason == "unknown" else f"this API key is {reason}",
                    code="invalid_api_key" if reason == "unknown" else f"api_key_{reason}",
                )
            key = check.key
            return Principal(
                tenant=key.tenant, key_id=key.id, user=key.user, user_prefix=key.user_prefix,
                admin=key.admin, requests_per_minute=key.requests_per_minute,
                memories_per_minute=(key.memories_per_minute
                                     if key.memories_per_minute is not None
                                     else self.policy.memories_per_minute),
                limiter=self.limiter,
            )
        if self.policy.required:
            _drop_header(scope, b"authorization")
            if token is None:
                raise AuthenticationError(
                    "this proxy needs an API key: send it as `Authorization: Bearer hk_...` "
                    "(the SDK's api_key)", code="missing_api_key",
                )
            raise AuthenticationError("invalid API key", code="invalid_api_key")
        return _keyless()

    def _attach_operator_key(
        self, scope: Scope, principal: Principal, method: str, path: str
    ) -> None:
        if not principal.authenticated and _headers(scope, b"authorization"):
            return  # open relay, and the client brought its own key: it is theirs to spend
        key = self.policy.operator_key(principal.tenant if principal.authenticated else None)
        if key is None:
            return
        if not self.policy.route_allowed(method, path):
            raise PermissionDeniedError(
                f"{method} {path} is not open to this proxy's clients", code="route_not_allowed"
            )
        _drop_header(scope, b"authorization")
        if path == "/v1/messages":
            # Anthropic's Messages API takes its key in x-api-key, not as a bearer token.
            _drop_header(scope, b"x-api-key")
            scope["headers"] = [*scope["headers"], (b"x-api-key", key.encode())]
        else:
            scope["headers"] = [*scope["headers"], (b"authorization", f"Bearer {key}".encode())]

    def _cors_headers(self, allowed_origin: str | None) -> dict[str, str]:
        if allowed_origin is None:
            return {}
        return {"access-control-allow-origin": allowed_origin, "vary": "Origin",
                "access-control-expose-headers": _EXPOSED}

    async def _preflight(self, scope: Scope, allowed_origin: str | None, send: Send) -> None:
        headers = [(b"allow", b"GET, POST, DELETE, OPTIONS"), (b"content-length", b"0")]
        if allowed_origin is not None:
            requested = _one_or_none(scope, b"access-control-request-headers") or ""
            headers += [
                (b"access-control-allow-origin", allowed_origin.encode()),
                (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
                (b"access-control-allow-headers", requested.encode("latin-1")),
                (b"access-control-max-age", _PREFLIGHT_MAX_AGE.encode()),
                (b"vary", b"Origin"),
            ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def _keyless() -> Principal:
    """A fresh keyless principal per request: its notes list is this request's own."""
    return dataclasses.replace(KEYLESS, notes=[])


def _one_or_none(scope: Scope, name: bytes) -> str | None:
    values: Sequence[bytes] = _headers(scope, name)
    return values[0].decode("latin-1").strip() if values else None


def _drop_header(scope: Scope, name: bytes) -> None:
    scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != name]


"""The admin HTTP API under /admin/v1/: what an app's backend needs to show users their memories
and to honour access and erasure requests. Admin keys only (the auth middleware checks; so does
every handler); a key sees its own tenant and, if it is bound to users, only those.

    GET    /admin/v1/users                                  users with current memories
    GET    /admin/v1/memories?user=U[&session=&agent=&category=&include_superseded=&limit=&offset=]
    GET    /admin/v1/memories/search?user=U&q=TEXT[&session=&agent=&top_k=]
    GET    /admin/v1/memories/{id}                          one memory
    GET    /admin/v1/memories/{id}/history                  its supersession chain and events
    DELETE /admin/v1/memories/{id}                          forget (soft delete, history kept)
    DELETE /admin/v1/memories?user=U[&session=S]            purge: every trace, with counts
    GET    /admin/v1/export?user=U                          JSONL, the format of `headroom export`

The user is a query parameter (any id the proxy accepts can be named, `/` included). Ids in
answers are the tenant's own (`alice`), never the engine's namespaced ones. Events name the key
that wrote them (`key_id`, taken from the request id; never a secret).
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..memory.errors import HeadroomMemoryError, MemoryNotFoundError, ValidationError
from ..memory.hierarchical import HierarchicalMemory
from ..memory.models import Memory, MemoryCategory, MemoryFilter
from .errors import BadRequestError, NotFoundError, PermissionDeniedError, ServiceUnavailableError
from .scope import Principal, check_id, client_user_id, current_principal, engine_user_id

if TYPE_CHECKING:  # the service moves between packages; only its type is needed here
    from ..turn.service import MemoryService

__all__ = ["admin_routes"]

_MAX_LIMIT = 1000
_KEY_MARK = ".k-"


def _principal() -> Principal:
    principal = current_principal()
    if not principal.admin:
        raise PermissionDeniedError("the admin API needs an admin key", code="admin_key_required")
    return principal


def _engine(service: MemoryService) -> HierarchicalMemory:
    if service.engine is None:
        raise ServiceUnavailableError(f"memory is not available: {service.open_error}")
    return service.engine


def _param(request: Request, name: str) -> str | None:
    """A query parameter given at most once, as valid UTF-8. Starlette keeps the last of a
    repeated one and turns bad bytes into U+FFFD: `DELETE ?user=a&user=b` or `?user=%ff`
    would then act on a user the caller did not name."""
    values = request.query_params.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequestError(f"`{name}` is given {len(values)} times; give it once", param=name)
    if "\ufffd" in values[0] and not _utf8_in_query(request, name):
        raise BadRequestError(f"`{name}` is not valid UTF-8 once percent-decoded", param=name)
    return values[0]


def _utf8_in_query(request: Request, name: str) -> bool:
    for part in bytes(request.scope.get("query_string", b"")).split(b"&"):
        key, _, value = part.partition(b"=")
        if unquote_to_bytes(key.replace(b"+", b" ")) != name.encode():
            continue
        try:
            unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True


def _user(request: Request, principal: Principal, *, required: bool = True) -> str | None:
    """The engine id of the `user` query parameter, checked against the key's bindings."""
    raw = _param(request, "user")
    if raw is None:
        if required:
            raise BadRequestError("the `user` query parameter is required", param="user")
        return None
    user = check_id("user", raw)
    if not principal.allows(user):
        raise PermissionDeniedError("this API key may not act for that user",
                                    code="user_not_allowed")
    return engine_user_id(principal.tenant, user)


def _optional(request: Request, name: str) -> str | None:
    value = _param(request, name)
    return check_id(name, value) if value is not None else None


def _int(request: Request, name: str, default: int, *, low: int = 0, high: int = _MAX_LIMIT) -> int:
    raw = _param(request, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"{name} must be an integer", param=name) from None
    if not low <= value <= high:
        raise BadRequestError(f"{name} must be between {low} and {high}", param=name)
    return value


def _flag(request: Request, name: str) -> bool:
    raw = (_param(request, name) or "").strip().lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("", "0", "false", "no"):
        return False
    raise BadRequestError(f"{name} must be true or false", param=name)


def _categories(request: Request) -> list[MemoryCategory] | None:
    raw = request.query_params.getlist("category")
    if not raw:
        return None
    try:
        return [MemoryCategory.parse(c) for c in raw]
    except (ValueError, ValidationError) as exc:
        raise BadRequestError(str(exc), param="category") from None


def _visible(memory: Memory, principal: Principal) -> str:
    """The tenant's own id of the memory's user; not found when it is not theirs to see."""
    user = client_user_id(principal.tenant, memory.user_id)
    if user is None or not principal.allows(user):
        raise NotFoundError(f"no memory with id {memory.id!r}")
    return user


def _memory_json(memory: Memory, principal: Principal) -> dict[str, Any]:
    data = memory.to_dict()
    data["user_id"] = _visible(memory, principal)
    return data


def _key_id(request_id: str | None) -> str | None:
    if not request_id or _KEY_MARK not in request_id:
        return None
    return request_id.rsplit(_KEY_MARK, 1)[1]


async def _load(engine: HierarchicalMemory, request: Request, principal: Principal) -> Memory:
    memory_id = request.path_params["memory_id"]
    try:
        memory = await engine.get(memory_id)
    except MemoryNotFoundError:
        raise NotFoundError(f"no memory with id {memory_id!r}") from None
    user = _user(request, principal, required=False)
    if user is not None and memory.user_id != user:
        raise NotFoundError(f"no memory with id {memory_id!r}")
    _visible(memory, principal)
    return memory


def admin_routes(service: MemoryService) -> list[Route]:
    async def users(request: Request) -> Response:
        principal = _principal()
        stats = await _engine(service).stats()
        data = []
        for engine_id, count in stats["users"].items():
            user = client_user_id(principal.tenant, engine_id)
            if user is not None and principal.allows(user):
                data.append({"user_id": user, "memories": count})
        return JSONResponse({"object": "list", "data": data})

    async def list_memories(request: Request) -> Response:
        principal = _principal()
        user = _user(request, principal)
        try:
            flt = MemoryFilter(
                user_id=user, session_id=_optional(request, "session"),
                agent_id=_optional(request, "agent"), all_scopes=True,
                categories=_categories(request),
                include_superseded=_flag(request, "include_superseded"),
                limit=_int(request, "limit", 100), offset=_int(request, "offset", 0, high=10**9),
            )
        except ValidationError as exc:
            raise BadRequestError(str(exc)) from None
        memories = await _engine(service).query(flt)
        return JSONResponse(
            {"object": "list", "data": [_memory_json(m, principal) for m in memories]}
        )

    async def search(request: Request) -> Response:
        principal = _principal()
        user = _user(request, principal)
        assert user is not None
        query = (_param(request, "q") or "").strip()
        if not query:
            raise BadRequestError("the `q` query parameter is required", param="q")
        if not service.ready:
            raise ServiceUnavailableError("the embedding model is still loading")
        results = await _engine(service).hybrid_search(
            query, user, _optional(request, "session"), _optional(request, "agent"), None,
            _int(request, "top_k", 10, low=1, high=100), _categories(request),
        )
        return JSONResponse({"object": "list", "data": [
            {**_memory_json(r.memory, principal), "similarity": r.similarity, "score": r.score}
            for r in results
        ]})

    async def get_memory(request: Request) -> Response:
        principal = _principal()
        memory = await _load(_engine(service), request, principal)
        return JSONResponse(_memory_json(memory, principal))

    async def history(request: Request) -> Response:
        principal = _principal()
        engine = _engine(service)
        memory = await _load(engine, request, principal)
        chain = await engine.get_history(memory.id)
        events = await engine.get_events(memory.id)
        return JSONResponse({
            "chain": [_memory_json(m, principal) for m in chain],
            "events": [
                {**e, "at": e["at"].isoformat() if e.get("at") else None,
                 "key_id": _key_id(e.get("request_id"))}
                for e in events
            ],
        })

    async def forget(request: Request) -> Response:
        principal = _principal()
        engine = _engine(service)
        memory = await _load(engine, request, principal)
        request_id = f"admin{_KEY_MARK}{principal.key_id}" if principal.key_id else "admin"
        try:
            forgotten = await engine.forget(memory.id, reason="admin API", request_id=request_id)
        except HeadroomMemoryError as exc:  # already forgotten or superseded
            raise BadRequestError(str(exc), code="not_current") from None
        return JSONResponse(_memory_json(forgotten, principal))

    async def purge(request: Request) -> Response:
        principal = _principal()
        user = _user(request, principal)
        assert user is not None
        counts = await _engine(service).purge(user, _optional(request, "session"))
        return JSONResponse({"purged": counts})

    async def export(request: Request) -> Response:
        principal = _principal()
        user = _user(request, principal)
        buffer = io.StringIO()
        await _engine(service).export_jsonl(buffer, user)
        client_id = client_user_id(principal.tenant, user or "")
        lines = []
        for line in buffer.getvalue().splitlines():
            record = json.loads(line)
            if "user_id" in record:
                record["user_id"] = client_id
            lines.append(json.dumps(record, ensure_ascii=False))
        return Response("\n".join(lines) + "\n", media_type="application/x-ndjson")

    return [
        Route("/admin/v1/users", users, methods=["GET"]),
        Route("/admin/v1/memories", list_memories, methods=["GET"]),
        Route("/admin/v1/memories", purge, methods=["DELETE"]),
        Route("/admin/v1/memories/search", search, methods=["GET"]),
        Route("/admin/v1/memories/{memory_id}", get_memory, methods=["GET"]),
        Route("/admin/v1/memories/{memory_id}", forget, methods=["DELETE"]),
        Route("/admin/v1/memories/{memory_id}/history", history, methods=["GET"]),
        Route("/admin/v1/export", export, methods=["GET"]),
    ]

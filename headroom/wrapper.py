"""`with_memory(client, user_id=...)`: a turn with memory around every chat completion, Responses
call and Anthropic message of a client, in-process. It imports neither the HTTP proxy nor its web
stack.

For the official `openai` and `anthropic` SDKs (sync and async) memory is installed below the SDK,
in its httpx client (`headroom.turn.transport`): every entry point that sends a chat completion,
a Responses call or a message gets it - `create`, `stream()`, `parse()`, `with_raw_response`,
`with_streaming_response`, `with_options(...)` copies, `responses.*`, `messages.*`. What cannot
get memory (legacy completions, realtime sessions, batches) works as before and logs a warning
once. Any other object with `.chat.completions.create` gets memory on that method only, and a
warning once says so.

One engine per database runs on a background thread with its own event loop
(`headroom.turn.runtime`), shared by every wrapper on that database; each wrapper keeps its own
recall settings (top_k, token_budget, preset, timeout).
Memory trouble is logged and the call goes on without memory: the client's own answer and its
own errors always reach the caller.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .memory.models import (
    EmbedderBackend,
    Memory,
    MemoryCategory,
    MemoryConfig,
    MemoryFilter,
    Scope,
    ScopeLevel,
)
from .memory.ports import Embedder
from .memory.recall import get_preset
from .turn.chat import CHAT_COMPLETIONS
from .turn.format import AnswerStreamStripper
from .turn.runtime import Runtime, runtime_for
from .turn.service import RecallSettings
from .turn.stripper import Block
from .turn.transport import TurnMaker, httpx_module, transport_classes
from .turn.turn import Turn

log = logging.getLogger(__name__)

__all__ = ["AsyncMemoryAPI", "MemoryAPI", "MemoryClient", "with_memory"]

T = TypeVar("T")



def with_memory(
    client: Any,
    user_id: str,
    session_id: str | None = None,
    agent_id: str | None = None,
    db_path: str | Path | None = None,
    top_k: int = 5,
    embedder_backend: EmbedderBackend | str = EmbedderBackend.LOCAL,
    *,
    embedder_model: str | None = None,
    token_budget: int = 800,
    recall_preset: str | None = None,
    recall_timeout_s: float = 10.0,
    config: MemoryConfig | None = None,
    embedder: Embedder | None = None,
) -> MemoryClient:
    """Wrap `client` so every chat completion recalls and stores memories for `user_id`.

    `top_k`, `token_budget`, `recall_preset` (default: `config.recall_preset`, else the engine's)
    and `recall_timeout_s` (past it the call goes on without memories) belong to this wrapper,
    also when another wrapper shares its database."""
    if config is None:
        config = MemoryConfig(db_path=db_path, embedder_backend=embedder_backend,
                              embedder_model=embedder_model)
    create = getattr(getattr(getattr(client, "chat", None), "completions", None), "create", None)
    http = _sdk_http_client(client)
    if not callable(create) and http is None:
        raise TypeError(
            "with_memory needs an openai or anthropic SDK client, or an OpenAI-compatible "
            "client with chat.completions.create"
        )
    preset = recall_preset if recall_preset is not None else config.recall_preset
    get_preset(preset)  # an unknown preset fails here, not on the first call
    runtime = runtime_for(config, embedder)
    settings = RecallSettings(
        top_k=top_k, token_budget=token_budget,
        # The engine's own preset needs no naming (and keeps its cached query vectors).
        preset=None if preset == runtime.config.recall_preset else preset,
        timeout_s=recall_timeout_s,
    )
    scope = Scope(user_id, session_id, agent_id)
    is_async = _is_async_http(http) if http is not None else _is_async(create)
    return MemoryClient(client, scope, runtime, settings, is_async=is_async)


def _sdk_http_client(client: Any) -> Any:
    """The httpx (or httpx2) client of an official SDK client (openai, anthropic:
    Stainless-built, with `with_options`), where memory can sit below every entry point; else
    None."""
    http = getattr(client, "_client", None)
    if callable(getattr(client, "with_options", None)) and httpx_module(http) is not None:
        return http
    return None


def _is_async_http(http: Any) -> bool:
    hx = httpx_module(http)
    return hx is not None and isinstance(http, hx.AsyncClient)


def _install(client: Any, maker: TurnMaker) -> Any:
    """A copy of the SDK client whose httpx client runs every memory-bearing request through a
    turn; the requests go out through the original httpx client's own transports (proxies,
    certificates, connection pool). The original client is left as it was."""
    http = _sdk_http_client(client)
    hx = httpx_module(http)
    assert hx is not None
    sync_transport, async_transport = transport_classes(hx)
    if isinstance(http, hx.AsyncClient):

        async def asend(request: Any) -> Any:
            return await http._transport_for_url(request.url).handle_async_request(request)

        async def aclose() -> None:
            # The pool is shared, as between an SDK client and its with_options copies:
            # closing the wrapper closes it, as closing a copy would.
            await http.aclose()

        wrapped = hx.AsyncClient(transport=async_transport(asend, maker, aclose),
                                 timeout=http.timeout, follow_redirects=http.follow_redirects)
    else:

        def send(request: Any) -> Any:
            return http._transport_for_url(request.url).handle_request(request)

        wrapped = hx.Client(transport=sync_transport(send, maker, http.close),
                            timeout=http.timeout, follow_redirects=http.follow_redirects)
    return client.with_options(http_client=wrapped)


# Parts of an SDK client whose requests never reach a memory route: they work, without memory.
_UNCOVERED = {
    "completions": "legacy completions (client.completions) get no memory",
    "realtime": "realtime sessions (websockets) get no memory",
    "batches": "batch jobs run upstream and get no memory",
}
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("with_memory: %s", message)


def _is_async(create: Any) -> bool:
    """SDKs wrap `create` in decorators that hide `async def`; look through `__wrapped__`."""
    while create is not None:
        if inspect.iscoroutinefunction(create):
            return True
        create = getattr(create, "__wrapped__", None)
    return False


class MemoryClient:
    """The wrapped client. An SDK client: every chat completion, Responses call and message
    remembers (see the module docstring); other objects: `.chat.completions.create` remembers.
    Everything else is the client's."""

    def __init__(self, client: Any, scope: Scope, runtime: Runtime, settings: RecallSettings,
                 *, is_async: bool) -> None:
        self._raw = client
        self._scope = scope
        self._runtime = runtime
        self._is_async = is_async
        self.settings = settings
        self._maker = TurnMaker(scope, runtime, settings)
        if _sdk_http_client(client) is not None:
            self._client = _install(client, self._maker)
        else:
            self._client = client
            completions = _Completions(client.chat.completions, self._maker, is_async)
            self.chat = _Namespace(client.chat, completions=completions)
            _warn_once(f"plain:{type(client).__name__}",
                       f"{type(client).__name__} is not an openai/anthropic SDK client: only "
                       "chat.completions.create gets memory; its other methods reach the "
                       "client without memory")
        self.memory: MemoryAPI | AsyncMemoryAPI = (
            AsyncMemoryAPI(scope, runtime) if is_async else MemoryAPI(scope, runtime)
        )

    def with_options(self, **options: Any) -> MemoryClient:
        """The SDK's copy with other options, memory included (also with its own http_client)."""
        return MemoryClient(self._raw.with_options(**options), self._scope, self._runtime,
                            self.settings, is_async=self._is_async)

    copy = with_options

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    async def __aenter__(self) -> MemoryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_client", "_raw"):
            raise AttributeError(name)  # not set yet (or never): no recursion through here
        if name in _UNCOVERED:
            _warn_once(name, _UNCOVERED[name])
        return getattr(self._client, name)


class _Namespace:
    def __init__(self, inner: Any, **overrides: Any) -> None:
        self._inner = inner
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Completions:
    def __init__(self, inner: Any, maker: TurnMaker, is_async: bool) -> None:
        self._inner = inner
        self._maker = maker
        self._runtime = maker.runtime
        self.create = self._acreate if is_async else self._create

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _create(self, **kwargs: Any) -> Any:
        turn = self._maker.turn(CHAT_COMPLETIONS)
        body = self._runtime.run(self._maker.prepare(turn, kwargs))
        response = self._inner.create(**body)
        if CHAT_COMPLETIONS.streams(kwargs):
            return _SyncStream(response, _ChunkStripper(turn.stream_stripper()),
                               lambda b: self._runtime.run(turn.store(b)))
        self._runtime.run(turn.store(_strip_response(turn, response)))
        return response

    async def _acreate(self, **kwargs: Any) -> Any:
        turn = self._maker.turn(CHAT_COMPLETIONS)
        body = await self._runtime.arun(self._maker.prepare(turn, kwargs))
        response = await self._inner.create(**body)
        if CHAT_COMPLETIONS.streams(kwargs):
            return _AsyncStream(response, _ChunkStripper(turn.stream_stripper()),
                                lambda b: self._runtime.arun(turn.store(b)))
        await self._runtime.arun(turn.store(_strip_response(turn, response)))
        return response


def _dump(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    dumper = getattr(obj, "model_dump", None)
    if callable(dumper):
        return dumper(mode="json", exclude_unset=True)
    raise TypeError(f"cannot read a chat completion of type {type(obj).__name__}")


def _strip_response(turn: Turn, response: Any) -> Block | None:
    """Remove the block from every choice of a non-streaming response, in place; returns the
    block to store."""
    clean, block = turn.strip_answer(_dump(response))
    for position, choice in enumerate(clean.get("choices") or []):
        content = (choice.get("message") or {}).get("content")
        target = response["choices"][position] if isinstance(response, dict) else (
            response.choices[position]
        )
        if isinstance(target, dict):
            target["message"]["content"] = content
        elif target.message is not None and isinstance(content, str):
            target.message.content = content
    return block


class _ChunkStripper:
    """SDK chunk objects in, chunk objects out, through the turn's chunk stripper (the same one
    the HTTP proxy runs over SSE). An unchanged chunk is the caller's own object."""

    def __init__(self, stripper: AnswerStreamStripper) -> None:
        self.stripper = stripper
        self.template: Any = None

    def feed(self, chunk: Any) -> list[Any]:
        self.template = chunk
        data = _dump(chunk)
        return [chunk if item is data else _rebuild(chunk, item)
                for item in self.stripper.feed(data)]

    def finish(self) -> list[Any]:
        if self.template is None:
            return []
        return [_rebuild(self.template, item) for item in self.stripper.finish()]

    def chosen_block(self) -> Block | None:
        """The block to store, also when the caller stopped reading early: a block that had
        fully arrived before the finish chunk still counts (as when a proxy client leaves)."""
        self.stripper.finish()  # idempotent
        return self.stripper.chosen_block


def _rebuild(template: Any, data: dict[str, Any]) -> Any:
    if isinstance(template, dict):
        return data
    return type(template).model_validate(data)


class _SyncStream:
    def __init__(self, inner: Any, stripper: _ChunkStripper,
                 store: Callable[[Block | None], None]) -> None:
        self._inner = inner
        self._stripper = stripper
        self._store = store

    def __iter__(self) -> Iterator[Any]:
        try:
            for chunk in self._inner:
                yield from self._stripper.feed(chunk)
            yield from self._stripper.finish()
        finally:
            self._store(self._stripper.chosen_block())

    def __enter__(self) -> _SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        closer = getattr(self._inner, "close", None)
        if callable(closer):
            closer()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _AsyncStream:
    def __init__(self, inner: Any, stripper: _ChunkStripper,
                 store: Callable[[Block | None], Coroutine[Any, Any, None]]) -> None:
        self._inner = inner
        self._stripper = stripper
        self._store = store

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            async for chunk in self._inner:
                for c in self._stripper.feed(chunk):
                    yield c
            for c in self._stripper.finish():
                yield c
        finally:
            await self._store(self._stripper.chosen_block())

    async def __aenter__(self) -> _AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        closer = getattr(self._inner, "close", None)
        if callable(closer):
            result = closer()
            if inspect.isawaitable(result):
                await result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _MemoryOps:
    """The `.memory` operations as coroutines run on the runtime's loop."""

    def __init__(self, scope: Scope, runtime: Runtime) -> None:
        self.scope = scope
        self.runtime = runtime

    @property
    def engine(self) -> Any:
        return self.runtime.service.engine

    async def search(self, query: str, top_k: int = 5) -> list[Memory]:
        s = self.scope
        await self.runtime.read_own_writes()
        results = await self.engine.search(query, s.user_id, s.session_id, s.agent_id,
                                           top_k=top_k)
        return [r.memory for r in results]

    async def add(self, content: str, category: MemoryCategory | str = MemoryCategory.FACT,
                  importance: float = 0.5, scope: ScopeLevel | str = ScopeLevel.USER,
                  **kwargs: Any) -> Memory:
        target = self.scope.clamp(ScopeLevel.parse(scope))
        return await self.engine.add(content, target.user_id, target.session_id,
                                     target.agent_id, category=category, importance=importance,
                                     **kwargs)

    async def get_all(self) -> list[Memory]:
        await self.runtime.read_own_writes()
        return await self.engine.query(
            MemoryFilter(user_id=self.scope.user_id, all_scopes=True, limit=None)
        )

    async def clear(self) -> dict[str, int]:
        await self.runtime.read_own_writes()
        return await self.engine.purge(self.scope.user_id)

    async def stats(self) -> dict[str, Any]:
        await self.runtime.read_own_writes()
        return await self.engine.stats(self.scope.user_id)

    async def flush(self, timeout: float | None = 30.0) -> None:
        await self.runtime.service.flush(timeout)

    async def supersede(self, memory_id: str, new_content: str, **kwargs: Any) -> Memory:
        return await self.engine.supersede(memory_id, new_content, user_id=self.scope.user_id,
                                           **kwargs)

    async def forget(self, memory_id: str) -> Memory:
        return await self.engine.forget(memory_id, user_id=self.scope.user_id)

    async def get_history(self, memory_id: str) -> list[Memory]:
        return await self.engine.get_history(memory_id, user_id=self.scope.user_id)


_API_METHODS = ("search", "add", "get_all", "clear", "stats", "flush", "supersede", "forget",
                "get_history")


class MemoryAPI:
    """`client.memory` for sync clients: search, add, get_all, clear, stats, flush, supersede,
    forget, get_history."""

    def __init__(self, scope: Scope, runtime: Runtime) -> None:
        self._ops = _MemoryOps(scope, runtime)
        for name in _API_METHODS:
            method = getattr(self._ops, name)
            setattr(self, name, _sync(runtime, method))


class AsyncMemoryAPI:
    """`client.memory` for async clients: the same methods, awaitable."""

    def __init__(self, scope: Scope, runtime: Runtime) -> None:
        self._ops = _MemoryOps(scope, runtime)
        for name in _API_METHODS:
            setattr(self, name, _async(runtime, getattr(self._ops, name)))


def _sync(runtime: Runtime, method: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        return runtime.run(method(*args, **kwargs))

    call.__doc__ = method.__doc__
    call.__name__ = method.__name__
    return call


def _async(runtime: Runtime, method: Any) -> Any:
    async def call(*args: Any, **kwargs: Any) -> Any:
        return await runtime.arun(method(*args, **kwargs))

    call.__doc__ = method.__doc__
    call.__name__ = method.__name__
    return call

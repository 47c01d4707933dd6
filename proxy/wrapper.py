"""`with_memory(client, user_id=...)`: the proxy's pipeline in-process, around any OpenAI-compatible
client object with `.chat.completions.create` (sync or async, streaming or not).

The engine lives on one background thread with its own event loop, shared by every wrapper on
the same database (one model load, one writer). Calls reach it with `run_coroutine_threadsafe`,
so the wrapper works from plain scripts, async code and from inside a running event loop alike.
Streams are stripped by the same `ChunkRewriter` state machine the HTTP proxy uses.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..memory.models import (
    EmbedderBackend,
    Memory,
    MemoryCategory,
    MemoryConfig,
    MemoryFilter,
    Scope,
    ScopeLevel,
)
from ..memory.ports import Embedder
from .pipeline import Prepared, prepare, store_block
from .scope import MemoryMode, RequestScope
from .service import MemoryService
from .stream import Block, ChunkRewriter, SSEEvent, pick_block, strip_completion

log = logging.getLogger("headroom.wrapper")

__all__ = ["MemoryClient", "with_memory"]

T = TypeVar("T")

# How long a recall waits for this process's own queued writes (read-your-writes).
_FLUSH_BEFORE_RECALL_S = 5.0


class _Runtime:
    """A background event loop owning one MemoryService."""

    def __init__(self, config: MemoryConfig, top_k: int, token_budget: int,
                 embedder: Embedder | None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="headroom-memory",
                                       daemon=True)
        self.thread.start()
        self.service = MemoryService(
            config, top_k=top_k, token_budget=token_budget, recall_timeout_s=30.0,
            embedder=embedder,
        )
        # In-process there is no "listen first" to protect: load the model on first use.
        self.run(self.service.start(warm=False))
        if self.service.engine is None:
            raise RuntimeError(f"cannot open memory database: {self.service.open_error}")
        self.closed = False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def store(self, block: Any, prepared: Prepared, rs: RequestScope) -> None:
        self.loop.call_soon_threadsafe(store_block, block, prepared, rs, self.service)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.run(self.service.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)


_runtimes: dict[tuple[str, str, str], _Runtime] = {}
_runtimes_lock = threading.Lock()


def _runtime_for(config: MemoryConfig, top_k: int, token_budget: int,
                 embedder: Embedder | None) -> _Runtime:
    key = (str(Path(str(config.db_path)).resolve()), config.embedder_backend.value,
           str(config.embedder_model))
    with _runtimes_lock:
        runtime = _runtimes.get(key)
        if runtime is None or runtime.closed:
            runtime = _Runtime(config, top_k, token_budget, embedder)
            _runtimes[key] = runtime
        return runtime


def _close_all() -> None:
    """Drain queued writes before the interpreter exits; what is left replays on next start."""
    for runtime in list(_runtimes.values()):
        try:
            runtime.close()
        except Exception:  # pragma: no cover - best effort at exit
            log.warning("could not drain memory writes at exit", exc_info=True)


# Plain atexit runs after concurrent.futures has stopped accepting work, too late to drain. The
# threading hook runs first (hooks run newest first, and concurrent.futures registered earlier).
_register = getattr(threading, "_register_atexit", None)
if callable(_register):
    _register(_close_all)
else:  # pragma: no cover - other Pythons
    atexit.register(_close_all)


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
    config: MemoryConfig | None = None,
    embedder: Embedder | None = None,
) -> MemoryClient:
    """Wrap `client` so every chat completion recalls and stores memories for `user_id`."""
    if config is None:
        config = MemoryConfig(db_path=db_path, embedder_backend=embedder_backend,
                              embedder_model=embedder_model)
    create = getattr(getattr(getattr(client, "chat", None), "completions", None), "create", None)
    if not callable(create):
        raise TypeError(
            "with_memory needs an OpenAI-compatible client with chat.completions.create"
        )
    scope = Scope(user_id, session_id, agent_id)
    runtime = _runtime_for(config, top_k, token_budget, embedder)
    return MemoryClient(client, scope, runtime, is_async=_is_async(create))


def _is_async(create: Any) -> bool:
    """SDKs wrap `create` in decorators that hide `async def`; look through `__wrapped__`."""
    while create is not None:
        if inspect.iscoroutinefunction(create):
            return True
        create = getattr(create, "__wrapped__", None)
    return False


class MemoryClient:
    """The wrapped client: `.chat.completions.create` remembers; everything else is the client's."""

    def __init__(self, client: Any, scope: Scope, runtime: _Runtime, *, is_async: bool) -> None:
        self._client = client
        self._scope = scope
        self._runtime = runtime
        completions = _Completions(client.chat.completions, scope, runtime, is_async)
        self.chat = _Namespace(client.chat, completions=completions)
        self.memory: MemoryAPI | AsyncMemoryAPI = (
            AsyncMemoryAPI(scope, runtime) if is_async else MemoryAPI(scope, runtime)
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class _Namespace:
    def __init__(self, inner: Any, **overrides: Any) -> None:
        self._inner = inner
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Completions:
    def __init__(self, inner: Any, scope: Scope, runtime: _Runtime, is_async: bool) -> None:
        self._inner = inner
        self._scope = scope
        self._runtime = runtime
        self.create = self._acreate if is_async else self._create

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _request_scope(self) -> RequestScope:
        return RequestScope("hr-" + uuid.uuid4().hex[:20], self._scope, MemoryMode.ON)

    async def _prepare(self, kwargs: dict[str, Any], rs: RequestScope) -> Prepared:
        await self._runtime.service.flush(_FLUSH_BEFORE_RECALL_S)
        return await prepare(kwargs, rs, self._runtime.service)

    def _create(self, **kwargs: Any) -> Any:
        rs = self._request_scope()
        prepared = self._runtime.run(self._prepare(kwargs, rs))
        response = self._inner.create(**prepared.body)
        if kwargs.get("stream"):
            return _SyncStream(response, lambda b: self._runtime.store(b, prepared, rs))
        self._runtime.store(_strip_response(response), prepared, rs)
        return response

    async def _acreate(self, **kwargs: Any) -> Any:
        rs = self._request_scope()
        prepared = await self._runtime.arun(self._prepare(kwargs, rs))
        response = await self._inner.create(**prepared.body)
        if kwargs.get("stream"):
            return _AsyncStream(response, lambda b: self._runtime.store(b, prepared, rs))
        self._runtime.store(_strip_response(response), prepared, rs)
        return response


def _dump(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    dumper = getattr(obj, "model_dump", None)
    if callable(dumper):
        return dumper(mode="json", exclude_unset=True)
    raise TypeError(f"cannot read a chat completion of type {type(obj).__name__}")


def _strip_response(response: Any) -> Any:
    """Remove the block from every choice of a non-streaming response, in place; returns the
    block to store."""
    clean, blocks = strip_completion(_dump(response))
    for position, choice in enumerate(clean.get("choices") or []):
        content = (choice.get("message") or {}).get("content")
        target = response["choices"][position] if isinstance(response, dict) else (
            response.choices[position]
        )
        if isinstance(target, dict):
            target["message"]["content"] = content
        elif target.message is not None and isinstance(content, str):
            target.message.content = content
    return pick_block(blocks)


def _rebuild(template: Any, data: dict[str, Any]) -> Any:
    if isinstance(template, dict):
        return data
    return type(template).model_validate(data)


class _ChunkStripper:
    """Chunk objects in, chunk objects out, through the proxy's own SSE `ChunkRewriter`."""

    def __init__(self) -> None:
        self.rewriter = ChunkRewriter()
        self.template: Any = None

    def feed(self, chunk: Any) -> list[Any]:
        self.template = chunk
        events = self.rewriter.feed(SSEEvent.from_data(json.dumps(_dump(chunk))))
        return [self._to_chunk(e, chunk) for e in events]

    def finish(self) -> list[Any]:
        if self.template is None:
            return []
        return [self._to_chunk(e, self.template) for e in self.rewriter.finish()]

    def chosen_block(self) -> Block | None:
        """The block to store, also when the caller stopped reading early: a block that had
        fully arrived before the finish chunk still counts (as when a proxy client leaves)."""
        self.rewriter.finish()  # idempotent
        return self.rewriter.chosen_block

    @staticmethod
    def _to_chunk(event: SSEEvent, template: Any) -> Any:
        data = event.data
        if data is None or data.strip() == "[DONE]":
            return None
        return _rebuild(template, json.loads(data))


class _SyncStream:
    def __init__(self, inner: Any, on_done: Any) -> None:
        self._inner = inner
        self._on_done = on_done
        self._stripper = _ChunkStripper()

    def __iter__(self) -> Iterator[Any]:
        try:
            for chunk in self._inner:
                yield from (c for c in self._stripper.feed(chunk) if c is not None)
            yield from (c for c in self._stripper.finish() if c is not None)
        finally:
            self._on_done(self._stripper.chosen_block())

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
    def __init__(self, inner: Any, on_done: Any) -> None:
        self._inner = inner
        self._on_done = on_done
        self._stripper = _ChunkStripper()

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            async for chunk in self._inner:
                for c in self._stripper.feed(chunk):
                    if c is not None:
                        yield c
            for c in self._stripper.finish():
                if c is not None:
                    yield c
        finally:
            self._on_done(self._stripper.chosen_block())

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

    def __init__(self, scope: Scope, runtime: _Runtime) -> None:
        self.scope = scope
        self.runtime = runtime

    @property
    def engine(self) -> Any:
        return self.runtime.service.engine

    async def search(self, query: str, top_k: int = 5) -> list[Memory]:
        s = self.scope
        await self.runtime.service.flush(_FLUSH_BEFORE_RECALL_S)
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
        await self.runtime.service.flush(_FLUSH_BEFORE_RECALL_S)
        return await self.engine.query(
            MemoryFilter(user_id=self.scope.user_id, all_scopes=True, limit=None)
        )

    async def clear(self) -> dict[str, int]:
        await self.runtime.service.flush(_FLUSH_BEFORE_RECALL_S)
        return await self.engine.purge(self.scope.user_id)

    async def stats(self) -> dict[str, Any]:
        await self.runtime.service.flush(_FLUSH_BEFORE_RECALL_S)
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

    def __init__(self, scope: Scope, runtime: _Runtime) -> None:
        self._ops = _MemoryOps(scope, runtime)
        for name in _API_METHODS:
            method = getattr(self._ops, name)
            setattr(self, name, _sync(runtime, method))


class AsyncMemoryAPI:
    """`client.memory` for async clients: the same methods, awaitable."""

    def __init__(self, scope: Scope, runtime: _Runtime) -> None:
        self._ops = _MemoryOps(scope, runtime)
        for name in _API_METHODS:
            setattr(self, name, _async(runtime, getattr(self._ops, name)))


def _sync(runtime: _Runtime, method: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        return runtime.run(method(*args, **kwargs))

    call.__doc__ = method.__doc__
    call.__name__ = method.__name__
    return call


def _async(runtime: _Runtime, method: Any) -> Any:
    async def call(*args: Any, **kwargs: Any) -> Any:
        return await runtime.arun(method(*args, **kwargs))

    call.__doc__ = method.__doc__
    call.__name__ = method.__name__
    return call

"""A background event loop owning one `MemoryService` per database, for in-process callers
(`headroom.wrapper`): one model load and one writer per file, shared by every wrapper on it, and
reachable from plain scripts, async code and from inside a running event loop alike
(`run_coroutine_threadsafe`). Queued writes are drained when the interpreter exits.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import logging
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ..memory.errors import ConfigError
from ..memory.models import MemoryConfig
from ..memory.ports import Embedder
from .service import MemoryService

log = logging.getLogger(__name__)

__all__ = ["Runtime", "close_all", "runtime_for"]

T = TypeVar("T")

# How long a call waits for this process's own queued writes before recalling (read-your-writes),
# and how long it stops waiting after such a wait ran out (the writer is stuck: embedder down).
_FLUSH_BEFORE_RECALL_S = 2.0
_FLUSH_PAUSE_S = 30.0


class Runtime:
    """A background event loop owning one MemoryService."""

    def __init__(self, config: MemoryConfig, embedder: Embedder | None) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="headroom-memory",
                                       daemon=True)
        self.thread.start()
        self.service = MemoryService(config, embedder=embedder)
        # In-process there is no "listen first" to protect: load the model on first use.
        self.run(self.service.start(warm=False))
        if self.service.engine is None:
            self.close()
            raise RuntimeError(f"cannot open memory database: {self.service.open_error}")
        self.closed = False
        self._no_flush_until = 0.0

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def read_own_writes(self) -> None:
        """Wait (bounded) for queued writes; never raises."""
        if time.monotonic() < self._no_flush_until:
            return
        try:
            await self.service.flush(_FLUSH_BEFORE_RECALL_S)
        except TimeoutError:
            self._no_flush_until = time.monotonic() + _FLUSH_PAUSE_S
            self.service.counters["flush_timeouts"] += 1
            log.warning("queued memory writes not applied within %.0fs (is the embedder down?); "
                        "recalling without them for %.0fs", _FLUSH_BEFORE_RECALL_S,
                        _FLUSH_PAUSE_S)
        except Exception:
            log.exception("waiting for queued memory writes failed; recalling without them")

    def close(self) -> None:
        if getattr(self, "closed", False):
            return
        self.closed = True
        try:
            self.run(self.service.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)


_runtimes: dict[tuple[str, str, str], Runtime] = {}
_runtimes_lock = threading.Lock()


def _resolved(path: Any) -> str:
    return str(Path(str(path)).resolve())


def runtime_for(config: MemoryConfig, embedder: Embedder | None) -> Runtime:
    key = (_resolved(config.db_path), config.embedder_backend.value, str(config.embedder_model))
    with _runtimes_lock:
        runtime = _runtimes.get(key)
        if runtime is None or runtime.closed:
            runtime = Runtime(config, embedder)
            _runtimes[key] = runtime
            return runtime
    _check_same_engine(runtime.config, config)
    return runtime


def _check_same_engine(running: MemoryConfig, wanted: MemoryConfig) -> None:
    """Engine settings are the database's (one engine per file in a process): a second wrapper
    asking for different ones is refused rather than silently given the first one's. Recall
    settings are per wrapper and may differ."""
    per_client = {"db_path", "recall_preset"}
    differ = [
        f.name for f in dataclasses.fields(MemoryConfig)
        if f.name not in per_client and getattr(running, f.name) != getattr(wanted, f.name)
    ]
    if differ:
        raise ConfigError(
            f"{wanted.db_path} is already open in this process with other engine settings "
            f"({', '.join(differ)}); use the same ones, or another database"
        )


def close_all() -> None:
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
    _register(close_all)
else:  # pragma: no cover - other Pythons
    atexit.register(close_all)

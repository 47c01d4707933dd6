"""`serve --workers N`: the parent binds the port once and runs N spawned worker processes on
that one socket, each a whole proxy (engine, model, outbox writer, event loop), so requests use
more than one core. The kernel hands each new connection to whichever worker accepts it first.

The workers share the database: SQLite in WAL mode (readers never wait; the outbox's leased
claims keep a queued write from being applied twice) or PostgreSQL. Per-process state stays per
process: the query-embedding cache, the memory cache (on SQLite a worker may serve a memory
another worker changed until its own copy is evicted; PostgreSQL's cache is invalidated across
processes), and the per-minute limits, which each worker counts on its own.

Lifecycle: the first worker starts alone (it creates or migrates the database, so the others
open a finished one), then the rest. Each loads its model in the background after it listens;
a first-use ONNX export or int8 copy may run in two workers at once, which is safe (each writes
a temporary directory and renames it into place). A worker that dies before it ever
served stops everything with exit 3; one that dies later is replaced. SIGTERM or SIGINT reaches
every worker, each drains as a single server does, and the parent exits 0 when all did.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import SimpleQueue
from pathlib import Path

import uvicorn

from ..memory.errors import ConfigError
from ..memory.models import is_database_url
from .config import ProxyConfig
from .logs import configure_logging

__all__ = ["check_workers", "serve_workers"]

log = logging.getLogger(__name__)

_spawn = multiprocessing.get_context("spawn")
# Lets a listening socket travel to a spawned worker as an argument (uvicorn does the same).
multiprocessing.allow_connection_pickling()

# How often the parent looks at its workers; also the latency of its reaction to a signal.
_POLL_S = 0.2


def check_workers(config: ProxyConfig) -> None:
    """ConfigError when `config.workers` cannot work: below 1, or above 1 on a database that
    lives inside one process (each worker would get an empty database of its own)."""
    if config.workers < 1:
        raise ConfigError("workers must be at least 1")
    if config.workers == 1 or is_database_url(config.db_path):
        return
    target = str(config.db_path)
    if target in ("", ":memory:") or "mode=memory" in target:
        raise ConfigError(
            f"--workers {config.workers} needs a database file or a postgresql:// URL that every "
            f"worker can open; {target or 'an empty path'!r} is private to one process"
        )
    if Path(target).expanduser().is_dir():
        raise ConfigError(f"database path {target} is a directory")


def _run_worker(config: ProxyConfig, listener: socket.socket, ready: SimpleQueue[int]) -> None:
    """A worker process's whole life: one proxy on the parent's socket, exits as `serve` does."""
    from .server import STARTUP_FAILURE, build_server

    configure_logging(config.log_level)
    server = build_server(config, on_ready=lambda: ready.put(os.getpid()))
    server.run(sockets=[listener])
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


class _Supervisor:
    def __init__(self, config: ProxyConfig, listener: socket.socket) -> None:
        self.config = config
        self.listener = listener
        self.ready: SimpleQueue[int] = _spawn.SimpleQueue()
        self.stop = threading.Event()
        self.workers: list[SpawnProcess] = []
        self.served: set[int] = set()  # pids that reported ready

    def start_worker(self) -> SpawnProcess:
        process = _spawn.Process(
            target=_run_worker, args=(self.config, self.listener, self.ready),
            name="headroom-worker", daemon=False,
        )
        process.start()
        return process

    def collect_ready(self) -> None:
        while not self.ready.empty():
            self.served.add(self.ready.get())

    def wait_ready(self, process: SpawnProcess) -> bool:
        """True once `process` serves; False if it exits first or a stop is asked for."""
        while not self.stop.wait(_POLL_S):
            self.collect_ready()
            if process.pid in self.served:
                return True
            if process.exitcode is not None:
                return False
        return False

    def watch(self) -> bool:
        """Until a stop is asked for: replace workers that die after serving. False when one
        dies before it ever served (a broken configuration would fail the same way again)."""
        while not self.stop.wait(_POLL_S):
            self.collect_ready()
            for index, process in enumerate(self.workers):
                if process.exitcode is None:
                    continue
                if process.pid not in self.served:
                    log.error("worker %s exited %s before serving", process.pid, process.exitcode)
                    return False
                log.warning("worker %s exited %s; starting another", process.pid,
                            process.exitcode)
                self.workers[index] = self.start_worker()
        return True

    def stop_all(self) -> bool:
        """SIGTERM to every worker, then wait for their drains. True when all exited cleanly."""
        for process in self.workers:
            if process.exitcode is None and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_timeout_s + 10
        clean = True
        for process in self.workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("worker %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join()
            # A worker signalled while still importing has no handler yet: it dies of SIGTERM.
            if process.exitcode not in (0, -signal.SIGTERM):
                log.error("worker %s exited %s", process.pid, process.exitcode)
                clean = False
        return clean


def serve_workers(config: ProxyConfig, *, on_ready: Callable[[], None] | None = None) -> None:
    """Blocking: `config.workers` proxies on one port; exits 0 after a clean stop, 3 when a
    worker could not start, 1 when a worker failed to stop cleanly."""
    from .server import STARTUP_FAILURE

    check_workers(config)
    # bind_socket logs where it listens, and exits 3 itself when the port is taken.
    listener = uvicorn.Config(
        app=None, host=config.host, port=config.port, log_config=None
    ).bind_socket()
    supervisor = _Supervisor(config, listener)
    previous = {
        sig: signal.signal(sig, lambda *_: supervisor.stop.set())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    log.info("starting %d workers", config.workers)
    try:
        first = supervisor.start_worker()
        supervisor.workers.append(first)
        started = supervisor.wait_ready(first)
        if started:
            supervisor.workers += [
                supervisor.start_worker() for _ in range(config.workers - 1)
            ]
            started = all(supervisor.wait_ready(p) for p in supervisor.workers[1:])
        if started:
            log.info("all %d workers serving", config.workers)
            if on_ready is not None:
                on_ready()
        healthy = started and supervisor.watch()
        stopping_asked = supervisor.stop.is_set()
        clean = supervisor.stop_all()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        listener.close()
    if not healthy and not stopping_asked:
        raise SystemExit(STARTUP_FAILURE)
    if not clean:
        raise SystemExit(1)
    log.info("all workers stopped")

"""What `/readyz` answers: whether this server can serve, and how well.

- 503 `starting`: the database is open but the embedding model is still loading (seconds), so a
  load balancer waits before sending traffic that would get no recall;
- 200 `degraded`, with `reasons`: proxying goes on, memory does less than it should (database
  unusable → plain pass-through; model failed → no recall; storage failing or ops waiting in
  memory, from `HierarchicalMemory.health()`). Dead letters are counted in `health` but, as in
  `headroom outbox status`, do not degrade: they wait for an operator, the server is fine;
- 200 `ok`.

A memory problem never makes the server unready: the answer would still reach the client
(fail open), and a 503 would take a working proxy out of rotation.

When the outbox cannot be read (in time, or at all), the probe connects to the database itself
to say why: a server that does not answer is "database unreachable"; one that answers a read
that timed out is busy.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from ..memory.inspect_db import display_name
from ..memory.models import is_database_url
from ..turn.service import MemoryService

__all__ = ["database_unreachable", "readiness"]

_OUTBOX_UNREADABLE = "outbox unreadable"
_SLOW_OUTBOX = "outbox unreadable within"
_PROBE_TIMEOUT_S = 2.0


def database_unreachable(target: str | Path, timeout_s: float = _PROBE_TIMEOUT_S) -> str | None:
    """Why the database at `target` cannot be reached (one line), or None when it answers.
    Blocking: at most about `timeout_s`."""
    try:
        if is_database_url(target):
            import psycopg  # only a PostgreSQL database needs it

            with psycopg.connect(str(target), connect_timeout=max(1, round(timeout_s))) as conn:
                conn.execute("SELECT 1")
        else:
            if not Path(target).exists():
                return "no database file"
            with sqlite3.connect(f"file:{target}?mode=ro", uri=True, timeout=timeout_s) as conn:
                conn.execute("SELECT 1").fetchone()
            conn.close()
    except Exception as exc:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return None


async def _explain_unreadable_outbox(reasons: list[str], target: str | Path) -> list[str]:
    """Say whether an outbox that cannot be read means the database is gone or just busy."""
    if not any(r.startswith(_OUTBOX_UNREADABLE) for r in reasons):
        return reasons
    try:
        why = await asyncio.wait_for(asyncio.to_thread(database_unreachable, target),
                                     _PROBE_TIMEOUT_S + 1)
    except TimeoutError:
        why = f"no answer within {_PROBE_TIMEOUT_S + 1:.0f}s"
    if why is None:
        note = "the database answers, so it is busy or locked"
        return [f"{r} ({note})" if r.startswith(_SLOW_OUTBOX) else r for r in reasons]
    return [f"database unreachable ({display_name(target)}: {why}); {r}"
            if r.startswith(_OUTBOX_UNREADABLE) else r for r in reasons]


async def readiness(service: MemoryService) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): `status`, `reasons`, the service's status and the engine's health."""
    reasons: list[str] = []
    health: dict[str, Any] = {}
    if service.engine is None:
        reasons.append(f"database unusable, requests pass through without memory: "
                       f"{service.open_error}")
    else:
        try:
            health = await service.engine.health()
        except Exception as exc:  # a probe answers, whatever the engine does
            reasons.append(f"memory health unreadable: {type(exc).__name__}: {exc}")
        reasons.extend(await _explain_unreadable_outbox(list(health.get("reasons", [])),
                                                  service.config.db_path))
    if service.model_error is not None:
        reasons.append(f"embedding model failed to load, recall is off: {service.model_error}")
    starting = service.engine is not None and not service.ready and service.model_error is None
    status = "starting" if starting else ("degraded" if reasons else "ok")
    body = {"ready": not starting, "status": status, "reasons": reasons, **service.status(),
            "health": health}
    return (503 if starting else 200), body

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
"""

from __future__ import annotations

from typing import Any

from ..turn.service import MemoryService

__all__ = ["readiness"]


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
        reasons.extend(health.get("reasons", []))
    if service.model_error is not None:
        reasons.append(f"embedding model failed to load, recall is off: {service.model_error}")
    starting = service.engine is not None and not service.ready and service.model_error is None
    status = "starting" if starting else ("degraded" if reasons else "ok")
    body = {"ready": not starting, "status": status, "reasons": reasons, **service.status(),
            "health": health}
    return (503 if starting else 200), body

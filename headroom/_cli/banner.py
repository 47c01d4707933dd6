"""What `headroom serve` prints before it starts: where it listens, what it forwards to, which
auth mode is on and why, which database and embedder, and warnings about what would keep memory
off (the server then passes requests through untouched). Loads no model."""

import sys
from pathlib import Path
from typing import Any

from rich.markup import escape

from ..memory.errors import HeadroomMemoryError
from ..memory.inspect_db import display_name
from ..memory.models import MemoryConfig, is_database_url
from ..proxy.auth import resolve_auth
from ..proxy.config import ProxyConfig
from . import output
from .engine import engine, run
from .root import version

__all__ = ["print_summary", "startup_summary"]


def _client_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def _counts(db: Path | str) -> dict[str, Any]:
    async with engine(db) as mem:
        return await mem.stats()


def _model_id(config: MemoryConfig) -> str:
    """The id of the embedder `config` names, without loading it (nothing heavy is built)."""
    from ..memory import embedders

    embedder = embedders.make_embedder(config)
    closer = getattr(embedder, "close", None)
    if callable(closer):
        closer()
    return embedder.model_id


def startup_summary(config: ProxyConfig) -> dict[str, Any]:
    """The banner's facts as data. Raises proxy.auth.AuthConfigError for an auth setting the
    server would refuse."""
    policy = resolve_auth(config)
    memory_config = config.memory_config()
    url = is_database_url(config.db_path)
    db: Path | str = str(config.db_path) if url else Path(config.db_path)
    base = _client_url(config.host, config.port)
    warnings: list[str] = []
    try:
        embedder = _model_id(memory_config)
    except HeadroomMemoryError as exc:
        embedder = f"{memory_config.embedder_backend.value}:{memory_config.embedder_model}"
        warnings.append(f"the embedder cannot start, memory stays off: {exc}")
    if not policy.required and (policy.open_relay or "not loopback" in policy.reason):
        warnings.append(
            "auth is off: anyone who can connect can read and erase every user's memory"
            + (" and spend the upstream key" if policy.open_relay else "")
        )
    summary: dict[str, Any] = {
        "listen": f"http://{config.host}:{config.port}",
        "client_base_url": f"{base}/v1",
        "upstream": config.upstream_base,
        "upstream_key": config.upstream_key is not None,
        "tenant_upstream_keys": len(config.tenant_upstream_keys),
        "auth": {"mode": policy.mode, "reason": policy.reason,
                 "key_db": display_name(policy.key_db)},
        "db": display_name(db),
        "db_exists": url or Path(db).exists(),
        "embedder": embedder,
        "memories": {"current": 0, "superseded": 0, "forgotten": 0, "users": 0,
                     "outbox_pending": 0},
        "dead_letters": 0,
        "db_bytes": 0,
        "warnings": warnings,
    }
    if summary["db_exists"]:
        try:
            stats = run(_counts(db))
        except HeadroomMemoryError as exc:
            if not url:
                raise
            # A server down now may be up later: the proxy starts and /readyz says degraded.
            warnings.append(f"the database cannot be read, memory stays off until it can: {exc}")
            return summary
        summary["memories"] = {
            "current": stats["current"], "superseded": stats["superseded"],
            "forgotten": stats["forgotten"], "users": len(stats["users"]),
            "outbox_pending": stats["outbox_pending"],
        }
        summary["dead_letters"] = stats["outbox_dead"]
        summary["db_bytes"] = stats["db_bytes"]
        if stats["embedding_model"] != embedder:
            warnings.append(
                f"{display_name(db)} was built with {stats['embedding_model']}, not {embedder}: "
                "memory stays off until they match (see `headroom doctor`)"
            )
        if stats["outbox_dead"]:
            warnings.append(
                f"{stats['outbox_dead']} dead letters: memory writes that kept failing wait "
                "for `headroom outbox dead` and `headroom outbox redrive`"
            )
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    console = output.out()
    counts = summary["memories"]
    if summary["db_exists"]:
        held = (
            f"{counts['current']} current, {counts['superseded']} superseded, "
            f"{counts['forgotten']} forgotten memories of {counts['users']} users; "
            f"{output.size(summary['db_bytes'])}"
        )
        if counts["outbox_pending"]:
            held += f"; {counts['outbox_pending']} queued writes to replay"
    else:
        held = "new, created on start"
    auth = summary["auth"]
    keys = [
        *(["server key set"] if summary["upstream_key"] else []),
        *([f"keys of {summary['tenant_upstream_keys']} tenants"]
          if summary["tenant_upstream_keys"] else []),
    ]
    if keys:
        key = ", ".join(keys)
    elif auth["mode"] == "off":
        key = "clients' own Authorization forwarded"
    else:
        key = "no upstream key: requests reach it without one"
    needs = "clients need a proxy key (headroom keys create)" if auth["mode"] == "on" else (
        "no proxy key needed"
    )
    console.print(f"[bold]Headroom Memory {version()}[/bold] proxy")
    console.print(f"  listening  {summary['listen']}")
    console.print(f"  upstream   {escape(summary['upstream'])} ({key})")
    console.print(f"  auth       {auth['mode']} ({escape(auth['reason'])}): {needs}")
    console.print(f"  database   {escape(summary['db'])} ({held})")
    console.print(f"  embedder   {escape(summary['embedder'])} (loads in the background)")
    for warning in summary["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    console.print(f"Point a client at it:  OPENAI_BASE_URL={summary['client_base_url']}")
    console.print(
        "Memory is per user: send the X-Headroom-User-Id header (or the body's `user`)."
    )
    sys.stdout.flush()

"""`headroom serve`: build the proxy's config from flags and HEADROOM_* variables, print what it is
about to do, and run it."""

import dataclasses
import enum
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..memory.errors import HeadroomMemoryError
from ..memory.models import MemoryConfig
from ..proxy.config import ProxyConfig
from . import output
from .engine import engine, run
from .options import (
    DbOpt,
    EmbedOptions,
    UpstreamOptions,
    db_path,
    with_embedder_options,
    with_upstream_options,
)
from .root import version

__all__ = ["serve", "startup_summary"]

_LIMITS = "Timeouts and limits"


class LogLevel(enum.StrEnum):
    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    DEBUG = "debug"


def _proxy_default(name: str) -> str | bool:
    """ProxyConfig owns the defaults; --help shows them from there (or none while a field is
    missing, so the CLI still imports)."""
    for field in dataclasses.fields(ProxyConfig):
        if field.name == name and field.default is not dataclasses.MISSING:
            return f"{field.default:g} s" if field.default else "no bound"
    return False


def _positive(value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise typer.BadParameter("must be more than 0 seconds")
    return value


def _seconds(flag: str, env: str, field: str, text: str, *, zero_allowed: bool = False) -> Any:
    """A duration option for `field`; unset, ProxyConfig's default stands."""
    return Annotated[
        float | None,
        typer.Option(
            flag, envvar=env, min=0.0, callback=None if zero_allowed else _positive,
            rich_help_panel=_LIMITS, show_default=_proxy_default(field), help=text,
        ),
    ]


UpstreamConnectOpt = _seconds(
    "--upstream-connect-timeout", "HEADROOM_UPSTREAM_CONNECT_TIMEOUT", "upstream_connect_timeout_s",
    "Seconds to open a connection to the upstream.",
)
UpstreamReadOpt = _seconds(
    "--upstream-read-timeout", "HEADROOM_UPSTREAM_READ_TIMEOUT", "upstream_read_timeout_s",
    "Longest silence, in seconds, between two pieces of the upstream's answer (a model may think "
    "for minutes before its first token).",
)
UpstreamTotalOpt = _seconds(
    "--upstream-total-timeout", "HEADROOM_UPSTREAM_TOTAL_TIMEOUT", "upstream_total_timeout_s",
    "Seconds one upstream exchange may take from request to last byte; 0: no bound.",
    zero_allowed=True,
)
BodyReadOpt = _seconds(
    "--body-read-timeout", "HEADROOM_BODY_READ_TIMEOUT", "body_read_timeout_s",
    "Longest wait, in seconds, between two pieces of a client's request body (then a 408).",
)
HeaderReadOpt = _seconds(
    "--header-read-timeout", "HEADROOM_HEADER_READ_TIMEOUT", "header_read_timeout_s",
    "Seconds a client may take to send its request line and headers.",
)
DurableWaitOpt = _seconds(
    "--durable-wait", "HEADROOM_DURABLE_WAIT", "durable_wait_s",
    "Seconds the answer's last byte waits for its memory writes to be durably queued; past "
    "that the answer goes out and the writes stay queued in memory for retry.",
    zero_allowed=True,
)


def _client_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def _counts(db: Path) -> dict[str, Any]:
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
    """What `serve` prints before it starts: where it listens, what it forwards to, which
    database and embedder, how many memories the database holds, and warnings about what would
    keep memory off (the server then passes requests through untouched). Loads no model."""
    memory_config = config.memory_config()
    db = Path(config.db_path)
    base = _client_url(config.host, config.port)
    warnings: list[str] = []
    try:
        embedder = _model_id(memory_config)
    except HeadroomMemoryError as exc:
        embedder = f"{memory_config.embedder_backend.value}:{memory_config.embedder_model}"
        warnings.append(f"the embedder cannot start, memory stays off: {exc}")
    summary: dict[str, Any] = {
        "listen": f"http://{config.host}:{config.port}",
        "client_base_url": f"{base}/v1",
        "upstream": config.upstream_base,
        "upstream_key": config.upstream_key is not None,
        "db": str(db),
        "db_exists": db.exists(),
        "embedder": embedder,
        "memories": {"current": 0, "superseded": 0, "forgotten": 0, "users": 0,
                     "outbox_pending": 0},
        "db_bytes": 0,
        "warnings": warnings,
    }
    if summary["db_exists"]:
        stats = run(_counts(db))
        summary["memories"] = {
            "current": stats["current"], "superseded": stats["superseded"],
            "forgotten": stats["forgotten"], "users": len(stats["users"]),
            "outbox_pending": stats["outbox_pending"],
        }
        summary["db_bytes"] = stats["db_bytes"]
        if stats["embedding_model"] != embedder:
            warnings.append(
                f"{db} was built with {stats['embedding_model']}, not {embedder}: memory stays "
                "off until they match (see `headroom doctor`)"
            )
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
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
    key = "server key set" if summary["upstream_key"] else "clients' own Authorization forwarded"
    console.print(f"[bold]Headroom Memory {version()}[/bold] proxy")
    console.print(f"  listening  {summary['listen']}")
    console.print(f"  upstream   {escape(summary['upstream'])} ({key})")
    console.print(f"  database   {escape(summary['db'])} ({held})")
    console.print(f"  embedder   {escape(summary['embedder'])} (loads in the background)")
    for warning in summary["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    console.print(f"Point a client at it:  OPENAI_BASE_URL={summary['client_base_url']}")
    console.print(
        "Memory is per user: send the X-Headroom-User-Id header (or the body's `user`)."
    )
    sys.stdout.flush()


@with_upstream_options
@with_embedder_options
def serve(
    host: Annotated[
        str, typer.Option(envvar="HEADROOM_HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="HEADROOM_PORT", min=1, max=65535, help="Port to listen on.")
    ] = 8787,
    db: DbOpt = None,
    top_k: Annotated[
        int, typer.Option(envvar="HEADROOM_TOP_K", min=0, help="Memories recalled per request.")
    ] = 5,
    token_budget: Annotated[
        int,
        typer.Option(
            envvar="HEADROOM_TOKEN_BUDGET", min=0, help="Token budget for recalled memories."
        ),
    ] = 800,
    log_level: Annotated[
        LogLevel,
        typer.Option(envvar="HEADROOM_LOG_LEVEL", case_sensitive=False, help="Log level."),
    ] = LogLevel.INFO,
    upstream_connect_timeout: UpstreamConnectOpt = None,
    upstream_read_timeout: UpstreamReadOpt = None,
    upstream_total_timeout: UpstreamTotalOpt = None,
    body_read_timeout: BodyReadOpt = None,
    header_read_timeout: HeaderReadOpt = None,
    durable_wait: DurableWaitOpt = None,
    *,
    upstream: UpstreamOptions,
    embed: EmbedOptions,
) -> None:
    """Start the memory proxy, an OpenAI-compatible server in front of the upstream.

    Every option can also be set with its HEADROOM_* environment variable. Stop it with Ctrl-C
    or SIGTERM: pending memory writes are drained first.
    """
    given = {
        "upstream_connect_timeout_s": upstream_connect_timeout,
        "upstream_read_timeout_s": upstream_read_timeout,
        "upstream_total_timeout_s": upstream_total_timeout,
        "body_read_timeout_s": body_read_timeout,
        "header_read_timeout_s": header_read_timeout,
        "durable_wait_s": durable_wait,
    }
    config = ProxyConfig(
        host=host, port=port, upstream_url=upstream.url, upstream_key=upstream.key,
        db_path=db_path(db), embedder_backend=embed.backend, embedder_model=embed.model,
        openai_api_key=embed.openai_api_key, ollama_base_url=embed.ollama_url,
        torch_threads=embed.torch_threads, embedder_runtime=embed.runtime, top_k=top_k,
        token_budget=token_budget, log_level=log_level.value,
        # Unset timeouts keep ProxyConfig's defaults, which are the one place they are written.
        **{name: value for name, value in given.items() if value is not None},
    )
    _print_summary(startup_summary(config))
    from ..proxy.server import serve as run_server

    run_server(config)

"""`headroom serve`: build the proxy's config from flags and HEADROOM_* variables, print what it is
about to do (banner.py), and run it."""

import dataclasses
import enum
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..memory.errors import ConfigError
from ..memory.recall import PRESETS
from ..proxy.auth import AuthConfigError
from ..proxy.config import ProxyConfig
from .banner import print_summary, startup_summary
from .keys import KeyDbOpt
from .options import (
    DbOpt,
    EmbedOptions,
    UpstreamOptions,
    db_path,
    with_embedder_options,
    with_upstream_options,
)

__all__ = ["serve"]

_LIMITS = "Timeouts and limits"
_AUTH = "Auth"


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
KeepAliveOpt = _seconds(
    "--keep-alive-timeout", "HEADROOM_KEEP_ALIVE_TIMEOUT", "keep_alive_timeout_s",
    "Seconds an idle client connection stays open for its next request (keep it above the "
    "clients' own keep-alive expiry, 5 s in the OpenAI and Anthropic SDKs).",
)
DurableWaitOpt = _seconds(
    "--durable-wait", "HEADROOM_DURABLE_WAIT", "durable_wait_s",
    "Seconds the answer's last byte waits for its memory writes to be durably queued; past "
    "that the answer goes out and the writes stay queued in memory for retry.",
    zero_allowed=True,
)


class UpstreamTransport(enum.StrEnum):
    HTTP1 = "http1"
    HTTPX = "httpx"


UpstreamTransportOpt = Annotated[
    UpstreamTransport | None,
    typer.Option(
        "--upstream-transport", envvar="HEADROOM_UPSTREAM_TRANSPORT", case_sensitive=False,
        rich_help_panel=_LIMITS, show_default="http1",
        help="What sends to the upstream: http1, the proxy's lean HTTP/1.1 client, or httpx, "
        "httpx's own transport.",
    ),
]


def _preset(value: str) -> str:
    if value not in PRESETS:
        raise typer.BadParameter(f"{value!r} is not a preset; one of {', '.join(PRESETS)}")
    return value


RecallPresetOpt = Annotated[
    str,
    typer.Option(
        "--recall-preset", envvar="HEADROOM_RECALL_PRESET", callback=_preset,
        rich_help_panel=_LIMITS,
        help=f"How recall ranks memories: one of {', '.join(PRESETS)}.",
    ),
]


def _count(flag: str, env: str, text: str, panel: str = _LIMITS) -> Any:
    """A count of 0 or more, unset by default (the config's default applies)."""
    return Annotated[
        int | None,
        typer.Option(flag, envvar=env, min=0, rich_help_panel=panel, show_default=False,
                     help=text),
    ]


MaxMemoriesOpt = _count(
    "--max-memories-per-user", "HEADROOM_MAX_MEMORIES_PER_USER",
    "Current memories a user may hold; the model's adds past it are skipped. Default: 0, no "
    "limit.",
)
MaxNewUsersOpt = _count(
    "--max-new-users-per-minute", "HEADROOM_MAX_NEW_USERS_PER_MINUTE",
    "Users seen for the first time per minute whose memories are stored (each new user costs "
    "disk). Default: 0, no limit.",
)


class AuthMode(enum.StrEnum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


AuthOpt = Annotated[
    AuthMode,
    typer.Option(
        "--auth", envvar="HEADROOM_AUTH", case_sensitive=False, rich_help_panel=_AUTH,
        help="Require proxy keys: auto (when listening beyond loopback or holding an upstream "
        "key), on or off.",
    ),
]
AllowUnauthenticatedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-unauthenticated", envvar="HEADROOM_ALLOW_UNAUTHENTICATED",
        rich_help_panel=_AUTH,
        help="Let --auth off stand on a public bind or with an upstream key (logged loudly).",
    ),
]
CorsOriginOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--cors-origin", envvar="HEADROOM_CORS_ORIGINS", rich_help_panel=_AUTH,
        metavar="ORIGIN", show_default=False,
        help="A web origin allowed to call the proxy, e.g. https://app.example (repeatable; "
        "the variable takes several, space-separated). Default: none.",
    ),
]
AnthropicUpstreamOpt = Annotated[
    str | None,
    typer.Option(
        "--anthropic-upstream", envvar="HEADROOM_ANTHROPIC_UPSTREAM", metavar="URL",
        show_default=False,
        help="Where Anthropic's Messages API (POST /v1/messages) goes, e.g. "
        "https://api.anthropic.com. Default: the --upstream.",
    ),
]
UpstreamRoutesOpt = Annotated[
    str | None,
    typer.Option(
        "--upstream-routes", envvar="HEADROOM_UPSTREAM_ROUTES", rich_help_panel=_AUTH,
        metavar="ROUTES", show_default=False,
        help="Routes requests with the operator's key may take, comma-separated "
        "\"METHOD /v1/path\" (`*` is one segment). Default: chat completions, responses, "
        "messages, embeddings, models.",
    ),
]
TenantKeysOpt = Annotated[
    Path | None,
    typer.Option(
        "--tenant-upstream-keys-file", envvar="HEADROOM_TENANT_UPSTREAM_KEYS_FILE",
        exists=True, dir_okay=False, readable=True, rich_help_panel=_AUTH, metavar="PATH",
        show_default=False,
        help="A JSON object of tenant to upstream key: each tenant's requests use its own key.",
    ),
]


KeyRequestsOpt = _count(
    "--key-requests-per-minute", "HEADROOM_KEY_REQUESTS_PER_MINUTE",
    "Requests per minute per proxy key, unless the key sets its own. Default: no limit.",
    _AUTH,
)
KeyMemoriesOpt = _count(
    "--key-memories-per-minute", "HEADROOM_KEY_MEMORIES_PER_MINUTE",
    "New memories per minute per proxy key, unless the key sets its own. Default: no limit.",
    _AUTH,
)


WorkersOpt = Annotated[
    int,
    typer.Option(
        "--workers", envvar="HEADROOM_WORKERS", min=1,
        help="Proxy processes serving the port, each with its own model (~230 MB RSS per "
        "worker). Raise it to use more cores under concurrent load; needs a database file or a "
        "postgresql:// URL.",
    ),
]


def _routes(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    routes = tuple(r.strip() for r in text.split(",") if r.strip())
    if not routes:
        raise typer.BadParameter("no route given", param_hint="'--upstream-routes'")
    return {"upstream_routes": routes}


def _tenant_keys(path: Path | None) -> dict[str, str]:
    """Keys are secrets: they come from a file, never the command line."""
    if path is None:
        return {}
    hint = "'--tenant-upstream-keys-file'"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise typer.BadParameter(f"{path} is not JSON: {exc}", param_hint=hint) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in data.items()
    ):
        raise typer.BadParameter(
            f"{path} must hold a JSON object of tenant to key (non-empty strings)",
            param_hint=hint,
        )
    return data


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
    keep_alive_timeout: KeepAliveOpt = None,
    durable_wait: DurableWaitOpt = None,
    upstream_transport: UpstreamTransportOpt = None,
    recall_preset: RecallPresetOpt = "default",
    anthropic_upstream: AnthropicUpstreamOpt = None,
    max_memories_per_user: MaxMemoriesOpt = None,
    max_new_users_per_minute: MaxNewUsersOpt = None,
    auth: AuthOpt = AuthMode.AUTO,
    allow_unauthenticated: AllowUnauthenticatedOpt = False,
    key_db: KeyDbOpt = None,
    cors_origin: CorsOriginOpt = None,
    upstream_routes: UpstreamRoutesOpt = None,
    tenant_upstream_keys_file: TenantKeysOpt = None,
    key_requests_per_minute: KeyRequestsOpt = None,
    key_memories_per_minute: KeyMemoriesOpt = None,
    workers: WorkersOpt = 1,
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
        "keep_alive_timeout_s": keep_alive_timeout,
        "durable_wait_s": durable_wait,
    }
    config = ProxyConfig(
        host=host, port=port, upstream_url=upstream.url, upstream_key=upstream.key,
        db_path=db_path(db), embedder_backend=embed.backend, embedder_model=embed.model,
        openai_api_key=embed.openai_api_key, ollama_base_url=embed.ollama_url,
        torch_threads=embed.torch_threads, embedder_runtime=embed.runtime, top_k=top_k,
        token_budget=token_budget, log_level=log_level.value, recall_preset=recall_preset,
        anthropic_upstream_url=anthropic_upstream,
        memory_options={
            name: value for name, value in (
                ("max_memories_per_user", max_memories_per_user),
                ("max_new_users_per_minute", max_new_users_per_minute),
            ) if value is not None
        },
        auth=auth.value, allow_unauthenticated=allow_unauthenticated, key_db_path=key_db,
        cors_origins=tuple(cors_origin or ()),
        tenant_upstream_keys=_tenant_keys(tenant_upstream_keys_file),
        key_requests_per_minute=key_requests_per_minute,
        key_memories_per_minute=key_memories_per_minute, workers=workers,
        **({} if upstream_transport is None else {"upstream_transport": upstream_transport.value}),
        **_routes(upstream_routes),
        # Unset timeouts keep ProxyConfig's defaults, which are the one place they are written.
        **{name: value for name, value in given.items() if value is not None},
    )
    from ..proxy.workers import check_workers

    try:
        check_workers(config)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--workers'") from None
    try:
        summary = startup_summary(config)
    except AuthConfigError as exc:  # a setting the server would refuse: say so before starting
        raise typer.BadParameter(str(exc)) from None
    print_summary(summary)
    from ..proxy.server import serve as run_server

    run_server(config)

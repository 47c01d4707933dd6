"""`headroom memories add|update|forget|purge`: changing what the proxy remembers."""

from typing import Annotated

import typer

from ..memory.models import Memory, MemoryCategory, MemoryFilter
from . import output
from .engine import engine, resolve, run
from .options import (
    AgentOpt,
    DbOpt,
    EmbedOptions,
    JsonOpt,
    OptionalUserOpt,
    SessionOpt,
    UserOpt,
    db_path,
    parse_metadata,
    with_embedder_options,
)

__all__ = ["add", "forget", "purge", "update"]

MetadataOpt = Annotated[
    list[str] | None, typer.Option(metavar="KEY=VALUE", help="Metadata (repeatable).")
]


@with_embedder_options
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
    metadata: MetadataOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
    *,
    embed: EmbedOptions,
) -> None:
    """Add a memory (the same fact again reinforces the memory already there)."""
    meta = parse_metadata(metadata)

    async def go() -> Memory:
        async with engine(db_path(db), embed, create=True) as mem:
            return await mem.add(
                text, user, session, agent, category=category, importance=importance,
                metadata=meta,
            )

    with output.working("embedding (the first use loads the model)"):
        memory = run(go())
    if as_json:
        output.print_json(memory.to_dict())
        return
    # A new memory has never been accessed; one that was there already is reinforced.
    verb = "reinforced" if memory.access_count else "added"
    typer.echo(
        f"{verb} {memory.id} ({memory.category.value}, {memory.scope_level.value} scope, "
        f"importance {memory.importance:.2f})"
    )


@with_embedder_options
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
    *,
    embed: EmbedOptions,
) -> None:
    """Change a memory: supersede it with new TEXT, or change it in place.

    With TEXT the old version is superseded and kept in its history; without it, --importance
    and --metadata change the memory in place.
    """
    meta = parse_metadata(metadata)
    if text is None and category is not None:
        raise typer.BadParameter(
            "changes the fact: give the new TEXT too", param_hint="'--category'"
        )
    if text is None and importance is None and meta is None:
        raise typer.BadParameter("nothing to change: give TEXT, --importance or --metadata")

    async def go() -> tuple[Memory, Memory]:
        # Only new text is embedded: an in-place change loads no model.
        async with engine(db_path(db), None if text is None else embed) as mem:
            old = await resolve(mem, memory_id, user)
            if text is None:
                return old, await mem.update(old.id, metadata=meta, importance=importance)
            new = await mem.supersede(
                old.id, text, category=category, importance=importance, metadata=meta
            )
            return old, new

    if text is None:
        old, new = run(go())
    else:
        with output.working("embedding the new text (the first use loads the model)"):
            old, new = run(go())
    if as_json:
        output.print_json(new.to_dict())
    elif new.id == old.id:
        typer.echo(f"updated {new.id}")
    else:
        typer.echo(f"superseded {old.id} by {new.id}")


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
        async with engine(db_path(db)) as mem:
            memory = await resolve(mem, memory_id, user)
            return await mem.forget(memory.id, reason=reason)

    memory = run(go())
    if as_json:
        output.print_json(memory.to_dict())
    else:
        typer.echo(f"forgot {memory.id}")


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
        async with engine(db_path(db)) as mem:
            count = await mem.count(flt)
            if not yes:
                typer.confirm(
                    f"Permanently delete {count} memories of {where}, with their history and "
                    "audit trail?", abort=True, err=True,
                )
            with output.working(f"purging {count} memories and their traces"):
                return await mem.purge(user, session, agent)

    counts = run(go())
    if as_json:
        output.print_json(counts)
        return
    typer.echo(
        f"purged {where}: {counts.get('memories', 0)} memories, {counts.get('vectors', 0)} "
        f"vectors, {counts.get('fts', 0)} text-index rows, {counts.get('events', 0)} audit "
        f"events, {counts.get('outbox', 0)} queued writes, {counts.get('cache', 0)} cached"
    )

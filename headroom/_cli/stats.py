"""`headroom stats`: totals by user, scope and category, the indexes, the queued writes and the
dead letters, and the database's size."""

from typing import Any

from rich.markup import escape
from rich.table import Table

from . import output
from .engine import engine, run
from .options import AllUsersOpt, DbOpt, JsonOpt, db_path

__all__ = ["stats"]


def stats(
    user: AllUsersOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Totals by user, scope and category; queued writes and dead letters; database size."""

    async def go() -> dict[str, Any]:
        async with engine(db_path(db)) as mem:
            return await mem.stats(user)

    data = run(go())
    if as_json:
        output.print_json(data)
        return
    console = output.out()
    console.print(_summary_grid(data))
    if user is None:
        console.print(output.counts_table("by user", data["users"]))
    console.print(output.counts_table("by scope", data["scopes"]))
    console.print(output.counts_table("by category", data["categories"]))


def _summary_grid(data: dict[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("database", f"{escape(data['db_path'])} ({output.size(data['db_bytes'])})")
    grid.add_row("embedding model", escape(data["embedding_model"]))
    grid.add_row(
        "memories",
        f"{data['current']} current, {data['superseded']} superseded, "
        f"{data['forgotten']} forgotten ({data['rows']} rows)",
    )
    grid.add_row("indexes", f"{data['vectors']} vectors, {data['fts_rows']} text rows")
    grid.add_row("queued writes", str(data["outbox_pending"]))
    dead = data["outbox_dead"]
    grid.add_row(
        "dead letters",
        f"[red]{dead}[/red]: writes that kept failing; see `headroom outbox dead`"
        if dead else "0",
    )
    return grid

"""The `headroom outbox` group: the memory writes the proxy has queued, and the dead letters,
writes that kept failing and were parked so they would not hold the others back.

A dead letter keeps its whole payload; once its cause is fixed, `redrive` queues it again as a new
row and the server's writer applies it (at once if a server runs, else on its next start).
"""

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.markup import escape

from . import output
from .engine import engine, run
from .errors import CommandError
from .options import DbOpt, JsonOpt, db_path

__all__ = ["app"]

app = typer.Typer(
    help="Queued memory writes and dead letters: inspect them and queue them again.",
    epilog="Typical use: `headroom outbox dead` to see what failed and why, fix the cause, "
    "then `headroom outbox redrive --all`.",
    no_args_is_help=True,
)


def _count(value: int | None) -> str:
    return "unreadable" if value is None else str(value)


def _ops_summary(payload: dict[str, Any]) -> str:
    """`add 2, forget 1`: what the parked write would have done."""
    ops = payload.get("ops")
    if not isinstance(ops, dict):
        return "?"
    counts = [f"{name} {len(items)}" for name, items in ops.items()
              if isinstance(items, list) and items]
    return ", ".join(counts) or "nothing"


@app.command()
def status(db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """How many writes are queued and how many are parked as dead letters.

    The status is the engine's health as this process sees the file (degraded while storage
    fails); dead letters do not degrade it, they wait for an operator (see `headroom doctor`).
    """

    async def go() -> dict[str, Any]:
        async with engine(db_path(db)) as mem:
            return await mem.health()

    health = run(go())
    data = {key: health[key] for key in ("status", "reasons", "outbox_pending", "dead_letters")}
    if as_json:
        output.print_json(data)
        return
    console = output.out()
    colour = "green" if data["status"] == "ok" else "yellow"
    console.print(f"status         [{colour}]{data['status']}[/{colour}]")
    console.print(f"queued writes  {_count(data['outbox_pending'])}")
    console.print(f"dead letters   {_count(data['dead_letters'])}")
    for reason in data["reasons"]:
        console.print(f"  - {escape(str(reason))}")
    if data["dead_letters"]:
        console.print("inspect them with `headroom outbox dead`; queue them again with "
                      "`headroom outbox redrive --all`")


@app.command()
def dead(
    limit: Annotated[
        int, typer.Option(min=1, help="At most this many, oldest first.")
    ] = 100,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the dead letters, oldest first: who, what, how often it failed and why."""

    async def go() -> list[dict[str, Any]]:
        async with engine(db_path(db)) as mem:
            return await mem.dead_letters(limit)

    letters = run(go())
    if as_json:
        output.print_json(letters)
        return
    if not letters:
        output.err().print("no dead letters")
        return
    grid = output.table(None, "id")
    for name in ("user", "ops", "attempts", "parked (UTC)"):
        grid.add_column(name, no_wrap=True)
    grid.add_column("error", min_width=16, ratio=1)
    for letter in letters:
        grid.add_row(
            str(letter["id"]), escape(letter["user_id"]), _ops_summary(letter["payload"]),
            str(letter["attempts"]), output.when(datetime.fromisoformat(letter["dead_at"])),
            escape(output.short(letter["error"], 160)),
        )
    output.out().print(grid)
    if len(letters) == limit:
        output.err().print(f"showing the oldest {limit}; --limit shows more")


@app.command()
def redrive(
    ids: Annotated[
        list[int] | None,
        typer.Argument(metavar="IDS", show_default=False,
                       help="Dead letter ids, as `headroom outbox dead` lists them."),
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Queue every dead letter again.")
    ] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue dead letters again, as new writes with no failed attempts.

    Fix what made them fail first (see `headroom outbox dead`). A running server applies them at
    once; otherwise the next `headroom serve` does. Unknown ids are an error and nothing is queued.
    """
    if every == bool(ids):
        raise typer.BadParameter("give dead letter IDS or --all (one of them)")
    wanted = sorted(set(ids or ()))

    async def go() -> int:
        async with engine(db_path(db)) as mem:
            if every:
                return await mem.redrive_dead_letters(None)
            _check_known(wanted, await mem.dead_letters(_ALL))
            return await mem.redrive_dead_letters(wanted)

    moved = run(go())
    if as_json:
        output.print_json({"redriven": moved})
    else:
        typer.echo(f"queued {moved} dead letters again")


# Dead letters are few by nature (each is a write that failed repeatedly); listing all of them to
# validate ids is cheap.
_ALL = 1_000_000


def _check_known(wanted: Sequence[int], letters: Sequence[dict[str, Any]]) -> None:
    known = {letter["id"] for letter in letters}
    unknown = [i for i in wanted if i not in known]
    if unknown:
        listed = ", ".join(map(str, unknown))
        raise CommandError(f"no dead letter with id {listed} (see `headroom outbox dead`)")

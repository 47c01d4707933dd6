"""`headroom memories export|import`: memories in and out as JSONL, with a progress bar."""

import io
import json
import sys
from collections.abc import Callable
from typing import IO, Annotated

import typer

from ..memory import transfer
from ..memory.errors import ImportFormatError
from . import output
from .engine import engine, require_db, run
from .errors import CommandError
from .options import AllUsersOpt, DbOpt, EmbedOptions, JsonOpt, db_path, with_embedder_options

__all__ = ["export_memories", "import_memories"]

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


def export_memories(
    path: Annotated[
        str, typer.Argument(metavar="PATH", help="JSONL file to write; - for stdout.")
    ] = "-",
    user: AllUsersOpt = None,
    db: DbOpt = None,
) -> None:
    """Export memories, history included, as JSONL.

    The first line is a header naming the embedding model; each further line is one memory.
    """
    err = output.err()

    async def go(target: IO[str]) -> int:
        async with engine(db_path(db)) as mem:
            total = (await mem.stats(user))["rows"] + 1
            with output.progress(err, "exporting") as progress:
                task = progress.add_task("export", total=total)
                writer = _CountingWriter(target, lambda: progress.advance(task))
                return await mem.export_jsonl(writer, user)  # type: ignore[arg-type]

    if path == "-":
        count = run(go(sys.stdout))
        sys.stdout.flush()
    else:
        require_db(db_path(db))  # before the file is created
        with open(path, "w", encoding="utf-8") as fh:
            count = run(go(fh))
    err.print(f"exported {count} memories" + ("" if path == "-" else f" to {path}"))


@with_embedder_options
def import_memories(
    path: Annotated[
        str, typer.Argument(metavar="PATH", help="JSONL file from export; - for stdin.")
    ],
    db: DbOpt = None,
    as_json: JsonOpt = False,
    *,
    embed: EmbedOptions,
) -> None:
    """Import a JSONL export.

    Ids already present are skipped; memories embedded with another model are re-embedded. A bad
    line stops the import before anything is written.
    """
    source: IO[str] = (
        io.StringIO(sys.stdin.read()) if path == "-" else open(path, encoding="utf-8")
    )
    err = output.err()

    async def go() -> dict[str, int]:
        total = sum(1 for line in source if line.strip() and _HEADER not in line)
        source.seek(0)
        async with engine(db_path(db), embed, create=True) as mem:
            with output.progress(err, "importing") as progress:
                task = progress.add_task("import", total=total)
                return await mem.import_jsonl(
                    source, on_progress=lambda n: progress.advance(task, n)
                )

    with source:
        try:
            counts = run(go())
        except ImportFormatError as exc:
            raise CommandError(f"{'stdin' if path == '-' else path}: {exc}") from exc
    if as_json:
        output.print_json(counts)
    else:
        typer.echo(
            f"imported {counts['imported']}, skipped {counts['skipped']} already present, "
            f"re-embedded {counts['reembedded']}"
        )

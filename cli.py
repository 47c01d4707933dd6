"""`headroom`, the command line: start the proxy, and look into what it remembers.

    headroom serve                      the OpenAI-compatible memory proxy
    headroom memories list|search|show|history|add|update|forget|purge|export|import
    headroom outbox status|dead|redrive queued writes and dead letters
    headroom keys create|list|revoke    the proxy keys clients use as their api_key
    headroom stats                      totals by user, scope and category
    headroom doctor                     SQLite, sqlite-vec, FTS5, the outbox, the embedder, upstream

This module only assembles the app; each command group is a module of `headroom._cli` (its
docstring maps them). Commands parse arguments, call `HierarchicalMemory` and print: rich tables for
people, `--json` for scripts; no SQL. Library errors become one `error: ...` line on stderr and exit
code 1 (usage errors are typer's own, exit code 2); `--debug` or HEADROOM_DEBUG=1 shows the
traceback.
"""

from collections.abc import Sequence

import typer

from ._cli import doctor, keys, memories, outbox, root, serve, stats
from ._cli.banner import startup_summary
from ._cli.errors import RootGroup

__all__ = ["app", "main", "startup_summary"]

app = typer.Typer(
    cls=RootGroup,
    name="headroom",
    help="Headroom Memory: long-term memory for any OpenAI-compatible LLM app.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.callback()(root.root)
app.command("serve")(serve.serve)
app.add_typer(memories.app, name="memories")
app.add_typer(outbox.app, name="outbox")
app.add_typer(keys.app, name="keys")
app.command("stats")(stats.stats)
app.command("doctor")(doctor.doctor)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script `headroom`."""
    app(args=list(argv) if argv is not None else None, prog_name="headroom")


if __name__ == "__main__":
    main()

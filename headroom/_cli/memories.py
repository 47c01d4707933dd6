"""The `headroom memories` group: its commands live in memories_read, memories_write and
memories_transfer; this module only names them."""

import typer

from . import memories_read, memories_transfer, memories_write

__all__ = ["app"]

app = typer.Typer(
    help="Look into, change and move what the proxy remembers.",
    epilog="Tables show 8-character ids; with --user they are enough to name a memory "
    "(show, history, update, forget). Add --json for scripts.",
    no_args_is_help=True,
)
app.command("list")(memories_read.list_memories)
app.command("search")(memories_read.search)
app.command("show")(memories_read.show)
app.command("history")(memories_read.history)
app.command("add")(memories_write.add)
app.command("update")(memories_write.update)
app.command("forget")(memories_write.forget)
app.command("purge")(memories_write.purge)
app.command("export")(memories_transfer.export_memories)
app.command("import")(memories_transfer.import_memories)

"""Opening the engine for one command, and finding a memory by the short ids tables show.

Commands that never embed open the file on the model it records (`memory.inspect_db`), so they load
no model and work whichever embedder built the database; commands that embed wire the embedder the
options name, which loads on first use.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ..memory import embedders
from ..memory.errors import MemoryNotFoundError
from ..memory.hierarchical import HierarchicalMemory
from ..memory.inspect_db import open_without_model
from ..memory.models import Memory, MemoryFilter, is_database_url
from .errors import CommandError
from .options import EmbedOptions

__all__ = ["engine", "require_db", "resolve", "run"]

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def require_db(db: Path | str) -> None:
    # A postgresql:// URL is checked by connecting: the server says whether it is there.
    if not is_database_url(db) and not Path(db).exists():
        raise CommandError(
            f"no database at {db}: nothing has been stored there yet (check --db or HEADROOM_DB)"
        )


@contextlib.asynccontextmanager
async def engine(
    db: Path | str, embed: EmbedOptions | None = None, *, create: bool = False
) -> AsyncIterator[HierarchicalMemory]:
    """The engine on `db` (only `create` makes a new file). Without `embed` the command must not
    embed and nothing loads; with it, the embedder the options name is built here (it loads on
    first use) and handed to the engine through its port, so there is one place that builds it."""
    if not create:
        require_db(db)
    embedder: Any = None
    try:
        if embed is None:
            mem = await open_without_model(db)
        else:
            config = embed.memory_config(db)
            embedder = embedders.make_embedder(config)
            mem = await HierarchicalMemory.create(config, embedder=embedder)
        try:
            yield mem
        finally:
            await mem.close()
    finally:
        closer = getattr(embedder, "close", None)
        if callable(closer):
            closer()


async def resolve(mem: HierarchicalMemory, ident: str, user: str | None) -> Memory:
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

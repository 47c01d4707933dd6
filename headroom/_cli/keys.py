"""`headroom keys`: create, list and revoke the proxy keys clients use as their `api_key`.

Keys live in their own small file next to a SQLite database (`memory.db` → `memory.keys.db`),
in a PostgreSQL memory database itself (every replica reads them there), or at `--key-db` /
HEADROOM_KEY_DB (a file or a postgresql:// URL); the secret is printed once and only its hash is
stored.
"""

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..proxy.keys import (
    KeyStore,
    KeyStoreError,
    ProxyKey,
    default_key_db,
    open_key_store,
    parse_duration,
)
from .errors import CommandError
from .options import DbOpt, JsonOpt, db_path, path_or_url
from .output import out, print_json, table, when

__all__ = ["KeyDbOpt", "app", "key_db_path", "parse_key_db"]

app = typer.Typer(
    help="Proxy keys: each binds a client to a tenant (and optionally one user or a prefix).",
    no_args_is_help=True,
)



def parse_key_db(value: str) -> Path | str:
    return path_or_url(value, "key file")


KeyDbOpt = Annotated[
    Path | None,  # or a postgresql:// URL as a str: parse_key_db decides
    typer.Option(
        "--key-db", envvar="HEADROOM_KEY_DB", show_default=False, parser=parse_key_db,
        help="Where proxy keys live: a SQLite file or a postgresql://user@host/db URL. "
        "Default: beside a SQLite --db (memory.db -> memory.keys.db); in the database itself "
        "for a postgresql:// --db (every replica sees the same keys).",
    ),
]


def key_db_path(db: Path | str | None, key_db: Path | str | None) -> Path | str:
    return key_db if key_db is not None else default_key_db(db_path(db))


def _store(db: Path | str | None, key_db: Path | str | None) -> KeyStore:
    return open_key_store(key_db_path(db, key_db))


def _binding(key: ProxyKey) -> str:
    if key.user is not None:
        return f"user {key.user}"
    if key.user_prefix is not None:
        return f"users {key.user_prefix}*"
    return "any user"


@app.command("create")
def create(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The key's tenant (namespace).")],
    user: Annotated[
        str | None, typer.Option("--user", "-u", help="Only this user.")
    ] = None,
    user_prefix: Annotated[
        str | None, typer.Option("--user-prefix", help="Only users whose id starts with this.")
    ] = None,
    admin: Annotated[
        bool, typer.Option("--admin", help="May use the /admin/v1/ API for its tenant.")
    ] = False,
    expires: Annotated[
        str | None, typer.Option("--expires", metavar="DURATION", help="e.g. 12h, 30d, 2w.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="A label for lists.")] = None,
    requests_per_minute: Annotated[
        int | None, typer.Option("--requests-per-minute", min=0, help="Request limit.")
    ] = None,
    memories_per_minute: Annotated[
        int | None, typer.Option("--memories-per-minute", min=0, help="New-memory limit.")
    ] = None,
    db: DbOpt = None,
    key_db: KeyDbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key and print it once (it cannot be shown again)."""
    store = _store(db, key_db)
    try:
        key, secret = store.create(
            tenant, user=user, user_prefix=user_prefix, admin=admin,
            expires_in=parse_duration(expires) if expires else None, name=name,
            requests_per_minute=requests_per_minute, memories_per_minute=memories_per_minute,
        )
    except KeyStoreError as exc:
        raise CommandError(str(exc)) from None
    finally:
        store.close()
    if as_json:
        print_json({**key.to_dict(), "key": secret})
        return
    console = out()
    console.print(f"key {key.id} for tenant {escape(key.tenant)} ({escape(_binding(key))}"
                  f"{', admin' if key.admin else ''}"
                  f"{', expires ' + when(key.expires_at) if key.expires_at else ''})")
    console.print("Shown once; give it to the client as its api_key:")
    typer.echo(secret)


@app.command("list")
def list_keys(
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="Only this tenant's keys.")
    ] = None,
    db: DbOpt = None,
    key_db: KeyDbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List keys (ids and bindings, never secrets)."""
    store = _store(db, key_db)
    try:
        keys = store.list(tenant)
    finally:
        store.close()
    if as_json:
        print_json([k.to_dict() for k in keys])
        return
    grid = table()
    for column in ("id", "tenant", "binding", "admin", "status", "created", "expires", "name"):
        grid.add_column(column)
    for key in keys:
        grid.add_row(key.id, escape(key.tenant), escape(_binding(key)),
                     "yes" if key.admin else "", key.status(), when(key.created_at),
                     when(key.expires_at), escape(key.name or ""))
    out().print(grid if keys else "no keys")


@app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id (from `keys list`).")],
    db: DbOpt = None,
    key_db: KeyDbOpt = None,
) -> None:
    """Revoke a key: the next request made with it gets a 401."""
    store = _store(db, key_db)
    try:
        key = store.revoke(key_id)
    except KeyStoreError as exc:
        raise CommandError(str(exc)) from None
    finally:
        store.close()
    out().print(f"key {key.id} revoked at {when(key.revoked_at)}")


@app.command("copy")
def copy(
    to: Annotated[
        Path,  # or a postgresql:// URL as a str: parse_key_db decides
        typer.Option("--to", parser=parse_key_db, show_default=False,
                     help="The key store to copy into: a SQLite file or a postgresql:// URL."),
    ],
    db: DbOpt = None,
    key_db: KeyDbOpt = None,
) -> None:
    """Copy every key (hashes, bindings, limits, revocations) into another key store, e.g. from
    a SQLite deployment's key file into PostgreSQL: clients keep their keys. Keys already there
    are left as they are, so running it again is safe."""
    source, target = _store(db, key_db), open_key_store(to)
    try:
        if source.location == target.location:
            raise CommandError(f"{source.location} is both the source and the target")
        keys = source.export()
        added = target.restore(keys)
    except KeyStoreError as exc:
        raise CommandError(str(exc)) from None
    finally:
        source.close()
        target.close()
    out().print(f"copied {added} keys from {escape(source.location)} to "
                f"{escape(target.location)}"
                + (f" ({len(keys) - added} already there)" if len(keys) > added else ""))

"""The key stores and `headroom keys`, on both backends (SQLite file, PostgreSQL table): keys
shown once, stored as the same hashes, checked in constant time, revoked and expired for good,
seen at once by every other store on the same target (another replica, the CLI); durations; the
CLI's create, list and revoke, with its default key store for each kind of database."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from headroom.cli import app
from headroom.proxy.keys import (
    KeyStore,
    KeyStoreError,
    default_key_db,
    open_key_store,
    parse_duration,
)
from tests.backend_targets import key_target


@pytest.fixture
def target(request: pytest.FixtureRequest, engine_backend: str, tmp_path: Path) -> Path | str:
    """This leg's key store location (conftest runs this module on both backends)."""
    return key_target(request, engine_backend, tmp_path)


@pytest.fixture
def store(target: Path | str) -> Iterator[KeyStore]:
    opened = open_key_store(target)
    yield opened
    opened.close()


def _stored_rows(target: Path | str) -> list[tuple[object, ...]]:
    """Every stored row as the backend holds it, each column as text."""
    if isinstance(target, Path):
        with sqlite3.connect(target) as conn:
            rows = conn.execute("SELECT * FROM proxy_keys").fetchall()
    else:
        with psycopg.connect(target) as conn:
            rows = conn.execute("SELECT * FROM headroom_keys").fetchall()
    return [tuple(str(v) for v in row) for row in rows]


def test_a_key_is_stored_only_as_its_hash(target: Path | str, store: KeyStore) -> None:
    record, secret = store.create("acme", user="alice", name="web app")
    assert secret.startswith(f"hk_{record.id}_") and len(secret) > 50
    check = store.verify(secret)
    assert check.ok and check.key == record
    store.close()
    rows = _stored_rows(target)
    assert len(rows) == 1
    private = secret.split("_", 2)[2]
    assert not any(secret in col or private in col for col in rows[0])
    # The same digest on both backends: the SHA-256 of the whole key, nothing else.
    assert hashlib.sha256(secret.encode()).hexdigest() in rows[0]
    assert {"acme", "alice", "web app"} <= set(rows[0])
    if isinstance(target, Path):
        raw = target.read_bytes()
        assert secret.encode() not in raw and private.encode() not in raw
        assert target.stat().st_mode & 0o077 == 0  # owner only


def test_wrong_tampered_revoked_and_expired_keys_fail(store: KeyStore) -> None:
    record, secret = store.create("acme")
    other, _ = store.create("acme")
    swapped = f"hk_{other.id}_{secret.split('_', 2)[2]}"  # a real id with another key's secret
    for bad in ("", "hk_", "sk-abc", secret[:-1], secret + "x", swapped,
                "hk_zzzzzzzzzzzz_abc", secret.upper()):
        check = store.verify(bad)
        assert not check.ok and check.reason == "unknown", bad
    store.revoke(record.id)
    assert store.verify(secret).reason == "revoked"
    first = store.get(record.id).revoked_at
    assert store.revoke(record.id).revoked_at == first  # idempotent
    _, brief = store.create("acme", expires_in=timedelta(microseconds=1))
    assert store.verify(brief).reason == "expired"
    _, lasting = store.create("acme", expires_in=timedelta(days=1))
    assert store.verify(lasting).ok
    assert [k.status() for k in store.list("acme")] == ["revoked", "active", "expired", "active"]
    assert store.list("globex") == []


def test_bad_key_settings_are_refused(store: KeyStore) -> None:
    for kwargs in ({"tenant": "Acme"}, {"tenant": "a|b"}, {"tenant": ""},
                   {"tenant": "acme", "user": "a b"}, {"tenant": "acme", "user_prefix": "x|"},
                   {"tenant": "acme", "user": "a", "user_prefix": "b"},
                   {"tenant": "acme", "requests_per_minute": -1}):
        with pytest.raises(KeyStoreError):
            store.create(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(KeyStoreError):
        store.revoke("000000000000")
    with pytest.raises(KeyStoreError):
        store.get("000000000000")
    assert store.list() == []


def test_another_store_on_the_same_target_sees_creation_and_revocation_at_once(
    target: Path | str,
) -> None:
    """Two replicas (or a replica and `headroom keys`): no cache stands between them."""
    replica_a, replica_b = open_key_store(target), open_key_store(target)
    try:
        assert replica_b.verify("hk_000000000000_nothing-yet").reason == "unknown"
        record, secret = replica_a.create("acme", user="alice", requests_per_minute=5)
        seen = replica_b.verify(secret)
        assert seen.ok and seen.key == record
        replica_b.revoke(record.id)
        assert replica_a.verify(secret).reason == "revoked"
        assert replica_a.get(record.id).revoked_at == replica_b.get(record.id).revoked_at
    finally:
        replica_a.close()
        replica_b.close()


def test_stores_opening_at_once_on_a_new_target_all_work(target: Path | str) -> None:
    """Replicas starting together create the table once (PostgreSQL: under an advisory lock)."""
    stores = [open_key_store(target) for _ in range(4)]
    secrets: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def first_use(store: KeyStore) -> None:
        try:
            start.wait()
            secrets.append(store.create("acme")[1])
        except BaseException as exc:  # reported below, with the test's own assertion
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert errors == [] and len(secrets) == len(stores)
        assert all(stores[0].verify(secret).ok for secret in secrets)
        assert len(stores[-1].list()) == len(stores)
    finally:
        for store in stores:
            store.close()


def test_durations() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("1d12h") == timedelta(days=1, hours=12)
    assert parse_duration(" 90m ") == timedelta(minutes=90)
    assert parse_duration("2w") == timedelta(weeks=2)
    for bad in ("", "30", "d", "3y", "0d", "1d x"):
        with pytest.raises(KeyStoreError):
            parse_duration(bad)


def test_keys_live_next_to_a_sqlite_database_and_inside_a_postgresql_one() -> None:
    assert default_key_db("/data/memory.db") == Path("/data/memory.keys.db")
    url = "postgresql://headroom@db.internal:5432/headroom"
    assert default_key_db(url) == url


def _cli() -> CliRunner:
    return CliRunner()


def _hr(*args: str) -> str:
    result = _cli().invoke(app, [*args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_create_list_revoke(request: pytest.FixtureRequest, engine_backend: str,
                                tmp_path: Path) -> None:
    """With only `--db`, keys go where the server looks for them: beside a SQLite file, inside
    a PostgreSQL database."""
    memory_db: Path | str = tmp_path / "memory.db"
    if engine_backend == "postgres":
        memory_db = str(key_target(request, engine_backend, tmp_path))
    db = ["--db", str(memory_db)]

    created = _hr("keys", "create", "--tenant", "acme", "--user", "alice", "--expires", "30d",
                  *db)
    secret = created.strip().splitlines()[-1]
    assert secret.startswith("hk_") and "shown once" in created.lower()
    admin = json.loads(_hr("keys", "create", "--tenant", "acme", "--admin", "--json", *db))
    assert admin["admin"] and admin["key"].startswith("hk_")
    store = open_key_store(default_key_db(memory_db))
    try:
        assert store.verify(secret).ok and store.verify(admin["key"]).key is not None

        listed = json.loads(_hr("keys", "list", "--json", *db))
        assert [(k["tenant"], k["user"], k["admin"]) for k in listed] == [
            ("acme", "alice", False), ("acme", None, True)]
        assert secret not in _hr("keys", "list", *db) and "key" not in listed[0]
        key_id = secret.split("_")[1]
        assert "revoked" in _hr("keys", "revoke", key_id, *db)
        assert store.verify(secret).reason == "revoked"
        assert json.loads(_hr("keys", "list", "--json", *db))[0]["status"] == "revoked"
    finally:
        store.close()

    for args in (("keys", "create", "--tenant", "Bad Tenant"),
                 ("keys", "create", "--tenant", "acme", "--expires", "soon"),
                 ("keys", "revoke", "ffffffffffff")):
        result = _cli().invoke(app, [*args, *db])
        assert result.exit_code == 1 and result.output.startswith("error: "), result.output


def test_cli_key_db_takes_a_file_or_a_url(target: Path | str, tmp_path: Path) -> None:
    """`--key-db` wins over the default; a URL reaches the CLI intact (its `//` not folded)."""
    memory = ["--db", str(tmp_path / "memory.db")]
    made = json.loads(_hr("keys", "create", "--tenant", "acme", "--json", *memory,
                          "--key-db", str(target)))
    store = open_key_store(target)
    try:
        assert store.verify(made["key"]).ok
    finally:
        store.close()
    assert not (tmp_path / "memory.keys.db").exists()  # the default was not used
    env = _cli().invoke(app, ["keys", "list", "--json", *memory],
                        env={"HEADROOM_KEY_DB": str(target)}, catch_exceptions=False)
    assert [k["id"] for k in json.loads(env.output)] == [made["id"]]
    assert not Path("postgresql:").exists()


def test_cli_says_in_one_line_when_the_key_database_cannot_be_reached(tmp_path: Path) -> None:
    url = f"postgresql://nobody:s3cret@/headroom?host={tmp_path / 'no-server'}"
    result = _cli().invoke(app, ["keys", "list", "--key-db", url])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "s3cret" not in result.output and "no-server" in result.output


def test_keys_copied_to_another_store_keep_working_and_revocations_stay(
    target: Path | str, tmp_path: Path
) -> None:
    """SQLite → this leg's store: what `headroom keys copy` does when a deployment moves."""
    source = open_key_store(tmp_path / "old.keys.db")
    kept, kept_secret = source.create("acme", user="alice", requests_per_minute=7,
                                      expires_in=timedelta(days=3), name="web")
    gone, gone_secret = source.create("globex", admin=True)
    source.revoke(gone.id)
    exported = source.export()
    source.close()
    copy = open_key_store(target)
    try:
        assert copy.restore(exported) == 2
        assert copy.restore(exported) == 0  # again: nothing doubled, nothing changed
        assert copy.verify(kept_secret).key == kept
        assert copy.verify(gone_secret).reason == "revoked"
        assert [k.record for k in copy.export()] == [kept, copy.get(gone.id)]
        assert {k.digest for k in copy.export()} == {k.digest for k in exported}
    finally:
        copy.close()


def test_cli_copy(target: Path | str, tmp_path: Path) -> None:
    memory = ["--db", str(tmp_path / "memory.db")]
    made = json.loads(_hr("keys", "create", "--tenant", "acme", "--json", *memory))
    printed = _hr("keys", "copy", "--to", str(target), *memory)
    assert printed.startswith("copied 1 keys from ") and "already there" not in printed
    assert "1 already there" in _hr("keys", "copy", "--to", str(target), *memory)
    store = open_key_store(target)
    try:
        assert store.verify(made["key"]).ok
    finally:
        store.close()
    for args in (["--to", str(tmp_path / "memory.keys.db"), *memory],  # itself
                 ["--to", str(target), "--key-db", str(tmp_path / "typo.keys.db")]):
        result = _cli().invoke(app, ["keys", "copy", *args])
        assert result.exit_code == 1 and result.output.startswith("error: "), result.output
    assert not (tmp_path / "typo.keys.db").exists()

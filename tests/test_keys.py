"""The key store and `headroom keys`: keys shown once, stored as hashes, checked in constant time,
revoked and expired for good; durations; the CLI's create, list and revoke."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from headroom.cli import app
from headroom.proxy.keys import KeyStore, KeyStoreError, default_key_db_path, parse_duration


def test_a_key_is_stored_only_as_its_hash(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.db")
    record, secret = store.create("acme", user="alice", name="web app")
    assert secret.startswith(f"hk_{record.id}_") and len(secret) > 50
    check = store.verify(secret)
    assert check.ok and check.key == record
    store.close()
    raw = (tmp_path / "k.db").read_bytes()
    assert secret.encode() not in raw and secret.split("_", 2)[2].encode() not in raw
    row = sqlite3.connect(tmp_path / "k.db").execute(
        "SELECT secret_sha256, tenant, user_id FROM proxy_keys").fetchone()
    assert len(row[0]) == 64 and row[1:] == ("acme", "alice")
    assert (tmp_path / "k.db").stat().st_mode & 0o077 == 0  # owner only


def test_wrong_tampered_revoked_and_expired_keys_fail(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.db")
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


def test_bad_key_settings_are_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.db")
    for kwargs in ({"tenant": "Acme"}, {"tenant": "a|b"}, {"tenant": ""},
                   {"tenant": "acme", "user": "a b"}, {"tenant": "acme", "user_prefix": "x|"},
                   {"tenant": "acme", "user": "a", "user_prefix": "b"},
                   {"tenant": "acme", "requests_per_minute": -1}):
        with pytest.raises(KeyStoreError):
            store.create(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(KeyStoreError):
        store.revoke("000000000000")
    assert store.list() == []


def test_durations() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("1d12h") == timedelta(days=1, hours=12)
    assert parse_duration(" 90m ") == timedelta(minutes=90)
    assert parse_duration("2w") == timedelta(weeks=2)
    for bad in ("", "30", "d", "3y", "0d", "1d x"):
        with pytest.raises(KeyStoreError):
            parse_duration(bad)


def test_keys_live_next_to_the_database() -> None:
    assert default_key_db_path("/data/memory.db") == Path("/data/memory.keys.db")


def test_cli_create_list_revoke(tmp_path: Path) -> None:
    runner = CliRunner()
    db = ["--db", str(tmp_path / "memory.db")]

    def hr(*args: str) -> str:
        result = runner.invoke(app, [*args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    created = hr("keys", "create", "--tenant", "acme", "--user", "alice", "--expires", "30d",
                 *db)
    secret = created.strip().splitlines()[-1]
    assert secret.startswith("hk_") and "shown once" in created.lower()
    admin = json.loads(hr("keys", "create", "--tenant", "acme", "--admin", "--json", *db))
    assert admin["admin"] and admin["key"].startswith("hk_")
    store = KeyStore(tmp_path / "memory.keys.db")
    assert store.verify(secret).ok and store.verify(admin["key"]).key is not None

    listed = json.loads(hr("keys", "list", "--json", *db))
    assert [(k["tenant"], k["user"], k["admin"]) for k in listed] == [
        ("acme", "alice", False), ("acme", None, True)]
    assert secret not in hr("keys", "list", *db) and "key" not in listed[0]
    key_id = secret.split("_")[1]
    assert "revoked" in hr("keys", "revoke", key_id, *db)
    assert store.verify(secret).reason == "revoked"
    assert json.loads(hr("keys", "list", "--json", *db))[0]["status"] == "revoked"

    for args in (("keys", "create", "--tenant", "Bad Tenant"),
                 ("keys", "create", "--tenant", "acme", "--expires", "soon"),
                 ("keys", "revoke", "ffffffffffff")):
        result = runner.invoke(app, [*args, *db])
        assert result.exit_code == 1 and result.output.startswith("error: "), result.output

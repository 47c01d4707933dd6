"""The `headroom` command: through typer's CliRunner on a temp database, and as a real process.

CliRunner tests use the real MiniLM model, loaded once per session (conftest's `local_embedder`):
`memory.embedders.make_embedder` hands the CLI that one instance. The subprocess tests pay for a
model load only where a command embeds (one `add`, and `serve`'s background warm-up).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from headroom import cli
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import EmbedderBackend, MemoryConfig
from tests.cli_fixtures import Invoke
from tests.fakes import FakeEmbedder
from tests.servers import free_port, running_upstream

ROOT = Path(cli.__file__).resolve().parent



def add(hr: Invoke, text: str, user: str = "alice", *options: Any) -> str:
    result = hr("memories", "add", text, "--user", user, *options, "--json")
    return str(json.loads(result.stdout)["id"])


def as_json(result: Result) -> Any:
    return json.loads(result.stdout)


def assert_one_line_error(result: Result, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


# --- basics ------------------------------------------------------------------------------------


def test_version(hr: Invoke) -> None:
    result = hr("--version")
    assert result.stdout.startswith("headroom 0.")


def test_no_arguments_shows_help(hr: Invoke) -> None:
    result = CliRunner().invoke(cli.app, [])
    assert "memories" in result.output and "serve" in result.output


# --- add, list, show ---------------------------------------------------------------------------


def test_add_then_list_as_table_and_json(hr: Invoke) -> None:
    first = add(hr, "Works at Google")
    second = add(
        hr, "Prefers Go for performance work", "alice", "--session", "s1",
        "--category", "preference", "--importance", "0.7", "--metadata", "source=cli",
    )

    table = hr("memories", "list", "--user", "alice").stdout
    assert first[:8] in table and second[:8] in table
    assert "Works at Google" in table and "preference" in table
    assert "status" not in table  # only shown when some memory is not current

    rows = as_json(hr("memories", "list", "--user", "alice", "--json"))
    assert [r["id"] for r in rows] == [second, first]  # newest first
    pref = rows[0]
    assert pref["category"] == "preference" and pref["importance"] == 0.7
    assert pref["session_id"] == "s1" and pref["scope"] == "session"
    assert pref["metadata"] == {"source": "cli"}


def test_add_prints_the_id_and_a_repeat_reinforces(hr: Invoke) -> None:
    out = hr("memories", "add", "Lives in Lisbon", "--user", "alice").stdout
    assert out.startswith("added ")
    memory_id = out.split()[1]
    again = hr("memories", "add", "lives in lisbon.", "--user", "alice").stdout
    assert again.startswith(f"reinforced {memory_id}")
    assert len(as_json(hr("memories", "list", "--user", "alice", "--json"))) == 1


def test_list_filters(hr: Invoke) -> None:
    user_wide = add(hr, "Has a dog called Rex")
    s1 = add(hr, "Is planning a trip to Kyoto", "alice", "--session", "s1", "-c", "context")
    s2 = add(hr, "Is debugging a flaky CI job", "alice", "--session", "s2", "-c", "context")
    agent = add(hr, "Asked the coder agent for Go", "alice", "--session", "s1", "--agent", "coder")
    add(hr, "Bob drinks tea", "bob")

    def ids(*args: str) -> set[str]:
        rows = as_json(hr("memories", "list", "--user", "alice", *args, "--json"))
        return {r["id"] for r in rows}

    assert ids() == {user_wide, s1, s2, agent}  # every scope of the user by default
    assert ids("--session", "s1") == {s1, agent}  # exact match on the session
    assert ids("--session", "s1", "--agent", "coder") == {agent}
    assert ids("--session", "s1", "--visible") == {user_wide, s1}  # what a request sees
    assert ids("--category", "context") == {s1, s2}
    assert ids("-c", "context", "-c", "fact") == {user_wide, s1, s2, agent}
    assert as_json(hr("memories", "list", "--user", "carol", "--json")) == []

    limited = hr("memories", "list", "--user", "alice", "--limit", "2")
    assert "showing the newest 2" in limited.stderr
    assert len(as_json(hr("memories", "list", "--user", "alice", "--limit", "2", "--json"))) == 2


def test_bad_category_is_a_usage_error(hr: Invoke) -> None:
    add(hr, "Anything")
    result = hr("memories", "list", "--user", "alice", "--category", "gossip", expect=2)
    assert "gossip" in result.stderr


def test_show_prints_fields_and_audit_trail(hr: Invoke) -> None:
    memory_id = add(hr, "Works at Google", "alice", "--metadata", "team=search")
    table = hr("memories", "show", memory_id).stdout
    assert memory_id in table and "Works at Google" in table and "team" in table
    assert "audit trail" in table and "add" in table

    data = as_json(hr("memories", "show", memory_id, "--json"))
    assert data["memory"]["id"] == memory_id
    assert [e["op"] for e in data["events"]] == ["add"]
    datetime.fromisoformat(data["events"][0]["at"])


def test_short_ids_need_the_user_and_must_be_unique(hr: Invoke, tmp_path: Path) -> None:
    memory_id = add(hr, "Works at Google")
    shown = as_json(hr("memories", "show", memory_id[:8], "--user", "alice", "--json"))
    assert shown["memory"]["id"] == memory_id

    result = hr("memories", "show", memory_id[:8], expect=1)
    assert_one_line_error(result, "needs --user")
    other_user = hr("memories", "show", memory_id[:8], "--user", "bob", expect=1)
    assert_one_line_error(other_user, "no memory with id")

    twins = tmp_path / "twins.jsonl"
    twins.write_text("".join(
        json.dumps({"id": f"abcd{n:028d}", "content": f"Twin fact {n}", "user_id": "alice"}) + "\n"
        for n in (1, 2)
    ))
    hr("memories", "import", twins)
    ambiguous = hr("memories", "show", "abcd", "--user", "alice", expect=1)
    assert_one_line_error(ambiguous, "matches 2 memories")


# --- update, history, forget, purge ------------------------------------------------------------


def test_update_with_text_supersedes_and_history_shows_the_chain(hr: Invoke) -> None:
    old = add(hr, "Works at Google")
    before = datetime.now(UTC)
    time.sleep(0.01)
    out = hr("memories", "update", old, "Works at Anthropic", "--importance", "0.8").stdout
    assert out.startswith(f"superseded {old} by ")
    new = out.split()[-1]

    current = as_json(hr("memories", "list", "--user", "alice", "--json"))
    assert [m["id"] for m in current] == [new]
    everything = hr("memories", "list", "--user", "alice", "--include-superseded", "--json")
    assert {m["id"]: m["is_current"] for m in as_json(everything)} == {old: False, new: True}
    table = hr("memories", "list", "--user", "alice", "--include-superseded").stdout
    assert "superseded" in table and "current" in table
    then = as_json(hr("memories", "list", "--user", "alice", "--as-of", before.isoformat(),
                      "--json"))
    assert [m["id"] for m in then] == [old]

    timeline = hr("memories", "history", old).stdout
    assert "2 versions" in timeline and "● current" in timeline
    assert f"superseded by {new[:8]}" in timeline
    assert timeline.index("Works at Google") < timeline.index("Works at Anthropic")

    chain = as_json(hr("memories", "history", new, "--json"))
    assert [m["id"] for m in chain] == [old, new]
    assert chain[0]["superseded_by"] == new and chain[0]["valid_until"] is not None
    assert chain[1]["importance"] == 0.8


def test_update_in_place_changes_importance_and_metadata(hr: Invoke) -> None:
    memory_id = add(hr, "Works at Google")
    out = hr("memories", "update", memory_id, "--importance", "0.9", "--metadata", "k=v").stdout
    assert out.strip() == f"updated {memory_id}"
    data = as_json(hr("memories", "show", memory_id, "--json"))
    assert data["memory"]["importance"] == 0.9 and data["memory"]["metadata"] == {"k": "v"}
    assert [e["op"] for e in data["events"]] == ["add", "update"]
    assert "importance 0.5 → 0.9" in hr("memories", "show", memory_id).stdout


def test_update_usage_errors(hr: Invoke) -> None:
    memory_id = add(hr, "Works at Google")
    assert "nothing to change" in hr("memories", "update", memory_id, expect=2).stderr
    assert "TEXT" in hr("memories", "update", memory_id, "-c", "fact", expect=2).stderr
    assert "key=value" in hr(
        "memories", "update", memory_id, "--metadata", "novalue", expect=2
    ).stderr
    hr("memories", "update", memory_id, "--importance", "1.5", expect=2)


def test_forget(hr: Invoke) -> None:
    memory_id = add(hr, "Works at Google")
    out = hr("memories", "forget", memory_id, "--reason", "user asked").stdout
    assert out.strip() == f"forgot {memory_id}"
    assert as_json(hr("memories", "list", "--user", "alice", "--json")) == []
    assert "forgotten" in hr("memories", "list", "--user", "alice", "--include-superseded").stdout
    events = as_json(hr("memories", "show", memory_id, "--json"))["events"]
    assert events[-1]["op"] == "forget" and events[-1]["new"] == {"reason": "user asked"}
    assert "✗ forgotten" in hr("memories", "history", memory_id).stdout


def test_purge_asks_first_and_reports_what_it_removed(hr: Invoke) -> None:
    kept = add(hr, "Bob drinks tea", "bob")
    add(hr, "Works at Google")
    in_session = add(hr, "Is planning a trip to Kyoto", "alice", "--session", "s1")

    declined = hr("memories", "purge", "--user", "alice", input="n\n", expect=1)
    assert "Permanently delete 2 memories of user 'alice'" in declined.stderr
    assert len(as_json(hr("memories", "list", "--user", "alice", "--json"))) == 2

    counts = as_json(hr("memories", "purge", "--user", "alice", "--session", "s1", "--yes",
                        "--json"))
    assert counts["memories"] == 1 and counts["vectors"] == 1 and counts["events"] >= 1
    remaining = as_json(hr("memories", "list", "--user", "alice", "--json"))
    assert in_session not in {m["id"] for m in remaining} and len(remaining) == 1

    out = hr("memories", "purge", "--user", "alice", input="y\n").stdout
    assert "purged user 'alice': 1 memories" in out
    assert as_json(hr("memories", "list", "--user", "alice", "--json")) == []
    assert [m["id"] for m in as_json(hr("memories", "list", "--user", "bob", "--json"))] == [kept]


# --- search ------------------------------------------------------------------------------------


def test_search_modes_show_scores(hr: Invoke) -> None:
    python = add(hr, "Prefers Python for data analysis", "alice", "-c", "preference")
    add(hr, "Has a dog called Rex")
    add(hr, "Prefers Python for scripts", "bob")

    for mode in ("hybrid", "semantic", "text"):
        hits = as_json(hr("memories", "search", "python programming", "--user", "alice",
                          "--mode", mode, "--json"))
        assert hits[0]["memory"]["id"] == python, mode
        assert {h["memory"]["user_id"] for h in hits} == {"alice"}
        assert hits[0]["rank"] == 1 and hits[0]["score"] > 0
    text_hit = as_json(hr("memories", "search", "python", "--user", "alice", "--mode", "text",
                          "--json"))[0]
    assert text_hit["bm25"] is not None

    table = hr("memories", "search", "which language for data", "--user", "alice").stdout
    assert python[:8] in table and "score" in table
    only_facts = hr("memories", "search", "python", "--user", "alice", "-c", "fact", "--json")
    assert python not in {h["memory"]["id"] for h in as_json(only_facts)}


def test_semantic_search_can_read_history(hr: Invoke) -> None:
    old = add(hr, "Works at Google as a search engineer")
    hr("memories", "update", old, "Works at Anthropic on memory")
    hits = as_json(hr("memories", "search", "Google engineer", "--user", "alice", "--mode",
                      "semantic", "--include-superseded", "--json"))
    assert old in {h["memory"]["id"] for h in hits}
    current = as_json(hr("memories", "search", "Google engineer", "--user", "alice", "--json"))
    assert old not in {h["memory"]["id"] for h in current}
    result = hr("memories", "search", "x", "--user", "alice", "--include-superseded", expect=2)
    assert "--mode semantic" in result.stderr


# --- export and import -------------------------------------------------------------------------


def test_export_import_round_trip(hr: Invoke, tmp_path: Path) -> None:
    old = add(hr, "Works at Google")
    hr("memories", "update", old, "Works at Anthropic")
    add(hr, "Bob drinks tea", "bob")

    dump = tmp_path / "dump.jsonl"
    result = hr("memories", "export", dump)
    assert "exported 3 memories" in result.stderr
    lines = dump.read_text().splitlines()
    assert json.loads(lines[0])["format"] == "headroom-memory-export" and len(lines) == 4

    other = tmp_path / "other.db"
    counts = as_json(hr("memories", "import", dump, "--json", db_path=other))
    assert counts == {"imported": 3, "skipped": 0, "reembedded": 0}
    again = hr("memories", "import", dump, db_path=other).stdout
    assert "imported 0, skipped 3 already present, re-embedded 0" in again
    chain = as_json(hr("memories", "history", old, "--json", db_path=other))
    assert [m["content"] for m in chain] == ["Works at Google", "Works at Anthropic"]

    stdout_dump = hr("memories", "export", "-", "--user", "bob").stdout.splitlines()
    assert len(stdout_dump) == 2 and json.loads(stdout_dump[1])["user_id"] == "bob"


def test_import_reembeds_and_shows_progress(hr: Invoke, tmp_path: Path) -> None:
    source = tmp_path / "plain.jsonl"
    source.write_text(
        "\n".join(json.dumps({"content": f"Fact number {i}", "user_id": "alice"}) for i in range(5))
    )
    result = hr("memories", "import", source, env={"TTY_COMPATIBLE": "1"})
    assert "imported 5, skipped 0 already present, re-embedded 5" in result.stdout
    assert "importing" in result.stderr  # the progress bar, drawn when stderr is a terminal
    hits = as_json(hr("memories", "search", "fact number 3", "--user", "alice", "--json"))
    assert hits[0]["memory"]["content"] == "Fact number 3"


def test_slow_work_shows_a_spinner_on_a_terminal_only(hr: Invoke) -> None:
    on_terminal = hr("memories", "add", "Lives in Lisbon", "--user", "alice",
                     env={"TTY_COMPATIBLE": "1"})
    assert "embedding (the first use loads the model)" in on_terminal.stderr
    assert on_terminal.stdout.startswith("added ")
    piped = hr("memories", "add", "Works at Google", "--user", "alice")
    assert piped.stderr == "" and piped.stdout.startswith("added ")
    purged = hr("memories", "purge", "--user", "alice", "--yes", env={"TTY_COMPATIBLE": "1"})
    assert "purging 2 memories" in purged.stderr


def test_import_bad_line_names_it_and_imports_nothing(hr: Invoke, tmp_path: Path) -> None:
    add(hr, "Works at Google")
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"content": "A good line", "user_id": "alice"})
    bad.write_text(f"{good}\n\n{{not json\n")
    result = hr("memories", "import", bad, expect=1)
    assert_one_line_error(result, f"{bad}: line 3: not valid JSON")
    assert len(as_json(hr("memories", "list", "--user", "alice", "--json"))) == 1

    missing = hr("memories", "import", tmp_path / "nope.jsonl", expect=1)
    assert_one_line_error(missing, "No such file or directory", "nope.jsonl")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00junk\n")
    assert_one_line_error(hr("memories", "import", binary, expect=1), "not UTF-8")


# --- errors ------------------------------------------------------------------------------------


def test_errors_are_one_line_with_exit_code_1(hr: Invoke, db: Path, tmp_path: Path) -> None:
    missing = hr("memories", "list", "--user", "alice", expect=1)
    assert_one_line_error(missing, "no database at", str(db))

    add(hr, "Works at Google")
    unknown = hr("memories", "show", "f" * 32, expect=1)
    assert_one_line_error(unknown, "no memory with id")
    assert_one_line_error(hr("memories", "forget", "f" * 32, expect=1), "no memory with id")

    garbage = tmp_path / "garbage.db"
    garbage.write_text("this is not a database\n" * 100)
    for args in (("memories", "list", "--user", "alice"), ("stats",)):
        result = hr(*args, db_path=garbage, expect=1)
        assert_one_line_error(result, "garbage.db")

    unwritable = hr("memories", "export", tmp_path / "no-such-dir" / "x.jsonl", expect=1)
    assert_one_line_error(unwritable, "No such file or directory")


def test_embedder_trouble_is_one_line(
    hr: Invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_model = _db_of_another_model(tmp_path / "fake.db")
    result = hr("memories", "add", "Anything", "--user", "alice", db_path=other_model, expect=1)
    assert_one_line_error(result, "built with embedder fake:bow-64")

    import headroom.memory.embedders
    from headroom.memory.errors import EmbedderError

    broken = FakeEmbedder()
    broken.fail_with = EmbedderError("could not load the model\nCheck your internet connection")
    monkeypatch.setattr(headroom.memory.embedders, "make_embedder", lambda config: broken)
    failed = hr("memories", "add", "Anything", "--user", "alice", expect=1)
    assert_one_line_error(failed, "could not load the model Check your internet connection")


def test_debug_shows_the_traceback(hr: Invoke, db: Path) -> None:
    from headroom.memory.errors import MemoryNotFoundError

    add(hr, "Works at Google")
    runner = CliRunner()
    with pytest.raises(MemoryNotFoundError):
        runner.invoke(cli.app, ["--debug", "memories", "show", "f" * 32, "--db", str(db)],
                      catch_exceptions=False)
    with pytest.raises(MemoryNotFoundError):
        runner.invoke(cli.app, ["memories", "show", "f" * 32, "--db", str(db)],
                      env={"HEADROOM_DEBUG": "1"}, catch_exceptions=False)


def test_db_comes_from_the_environment(hr: Invoke, db: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    memory_id = add(hr, "Works at Google")
    runner = CliRunner()
    result = runner.invoke(cli.app, ["memories", "list", "--user", "alice", "--json"],
                           env={"HEADROOM_DB": str(db)}, catch_exceptions=False)
    assert result.exit_code == 0 and as_json(result)[0]["id"] == memory_id


# --- stats and doctor --------------------------------------------------------------------------


def test_stats(hr: Invoke) -> None:
    old = add(hr, "Works at Google")
    hr("memories", "update", old, "Works at Anthropic")
    add(hr, "Is planning a trip", "alice", "--session", "s1", "-c", "context")
    add(hr, "Bob drinks tea", "bob")

    data = as_json(hr("stats", "--json"))
    assert (data["current"], data["superseded"], data["forgotten"]) == (3, 1, 0)
    assert data["users"] == {"alice": 2, "bob": 1}
    assert data["scopes"]["session"] == 1 and data["categories"] == {"fact": 2, "context": 1}
    assert data["db_bytes"] > 0

    table = hr("stats").stdout
    for fragment in ("3 current, 1 superseded", "by user", "bob", "by scope", "by category"):
        assert fragment in table
    assert as_json(hr("stats", "--user", "bob", "--json"))["current"] == 1


def test_doctor_all_ok(hr: Invoke) -> None:
    add(hr, "Works at Google")
    with running_upstream() as (url, upstream):
        result = hr("doctor", "--upstream", url, "--upstream-key", "sk-test")
    lines = result.stdout.splitlines()
    for name in ("sqlite-vec", "fts5", "database", "outbox", "embedder", "upstream"):
        assert any(line.startswith("ok") and name in line for line in lines), result.stdout
    assert "1 models" in result.stdout
    assert upstream.received_headers[-1]["authorization"] == "Bearer sk-test"


def _db_of_another_model(path: Path) -> Path:
    async def build() -> None:
        mem = await HierarchicalMemory.create(MemoryConfig(db_path=path), embedder=FakeEmbedder())
        await mem.add("Built with another model", "alice")
        await mem.close()

    asyncio.run(build())
    return path


def test_doctor_reports_failures_with_fixes(hr: Invoke, tmp_path: Path) -> None:
    other_model = _db_of_another_model(tmp_path / "fake.db")
    dead = f"http://127.0.0.1:{free_port()}"
    result = hr("doctor", "--upstream", dead, db_path=other_model, expect=1)
    out = result.stdout
    assert "fail  upstream" in out and "fail  database" in out and "fake:bow-64" in out
    assert out.count("fix:") == 2
    assert "2 of 6 checks failed" in result.stderr  # the outbox, with no dead letters, is ok
    assert any(line.startswith("ok") and "outbox" in line for line in out.splitlines())


def test_doctor_on_an_unreachable_postgresql_url(hr: Invoke, tmp_path: Path) -> None:
    url = f"postgresql://nobody:hunter2@/db?host={tmp_path}&connect_timeout=2"
    with running_upstream() as (upstream_url, _):
        result = hr("doctor", "--upstream", upstream_url, "--db", url, expect=1)
    (line,) = [line for line in result.stdout.splitlines() if "database" in line
               and not line.lstrip().startswith("fix:")]
    assert line.startswith("fail  database")
    assert "hunter2" not in result.output and "Traceback" not in result.output
    assert "pgvector" in result.stdout  # the fix names what a server needs
    assert "1 of 5 checks failed: database" in result.stderr  # no outbox check without a db


# --- serve -------------------------------------------------------------------------------------


def test_serve_builds_its_config_from_flags_and_environment(
    hr: Invoke, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import headroom.proxy.server
    add(hr, "Works at Google")
    started: list[Any] = []
    monkeypatch.setattr(headroom.proxy.server, "serve", lambda config, **kw: started.append(config))
    env = {
        "HEADROOM_DB": str(db), "HEADROOM_TOP_K": "7", "HEADROOM_TOKEN_BUDGET": "300",
        "HEADROOM_UPSTREAM_KEY": "sk-server", "HEADROOM_LOG_LEVEL": "DEBUG",
        "HEADROOM_TORCH_THREADS": "2",
    }
    result = hr("serve", "--port", "9911", "--upstream", "http://up.example/v1", env=env)
    (config,) = started
    assert (config.port, config.host, config.upstream_url) == (9911, "127.0.0.1",
                                                               "http://up.example/v1")
    assert (config.top_k, config.token_budget, config.log_level) == (7, 300, "debug")
    assert config.upstream_key == "sk-server" and config.torch_threads == 2
    assert Path(config.db_path) == db

    out = result.stdout
    assert "listening  http://127.0.0.1:9911" in out
    assert "OPENAI_BASE_URL=http://127.0.0.1:9911/v1" in out
    assert "http://up.example (server key set)" in out
    assert "1 current" in out and "local:all-MiniLM-L6-v2" in out


def test_startup_summary(hr: Invoke, db: Path, tmp_path: Path) -> None:
    from headroom.proxy.config import ProxyConfig

    fresh = cli.startup_summary(ProxyConfig(host="0.0.0.0", port=9000, db_path=tmp_path / "n.db"))
    assert fresh["client_base_url"] == "http://127.0.0.1:9000/v1"
    assert fresh["db_exists"] is False and fresh["memories"]["current"] == 0
    assert not (tmp_path / "n.db").exists()

    old = add(hr, "Works at Google")
    hr("memories", "update", old, "Works at Anthropic")
    add(hr, "Bob drinks tea", "bob")
    summary = cli.startup_summary(ProxyConfig(db_path=db))
    assert summary["memories"] == {"current": 2, "superseded": 1, "forgotten": 0, "users": 2,
                                   "outbox_pending": 0}
    assert summary["embedder"] == "local:all-MiniLM-L6-v2" and summary["warnings"] == []

    other = cli.startup_summary(ProxyConfig(db_path=_db_of_another_model(tmp_path / "f.db")))
    (warning,) = other["warnings"]
    assert "built with fake:bow-64, not local:all-MiniLM-L6-v2" in warning


def test_startup_summary_warns_when_the_embedder_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from headroom.proxy.config import ProxyConfig

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = ProxyConfig(db_path=tmp_path / "m.db", embedder_backend=EmbedderBackend.OPENAI)
    (warning,) = cli.startup_summary(config)["warnings"]
    assert "the embedder cannot start" in warning and "OPENAI_API_KEY" in warning


# --- as a real process -------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **extra}


def headroom(*args: Any, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "headroom", *map(str, args)], cwd=ROOT, env=_env(),
        capture_output=True, text=True, timeout=timeout,
    )


def test_process_add_then_read_without_loading_the_model(db: Path) -> None:
    added = headroom("memories", "add", "Prefers Rust for systems work", "--user", "alice",
                     "--db", db, "--json")
    assert added.returncode == 0, added.stderr
    memory_id = json.loads(added.stdout)["id"]

    script = (
        "import sys\nfrom headroom import cli\n"
        "for argv in sys.argv[1:]:\n"
        "    try:\n"
        "        cli.main(argv.split('|'))\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, (argv, exc.code)\n"
        "heavy = ('torch', 'sentence_transformers')\n"
        "print('LOADED', sorted(m for m in heavy if m in sys.modules))\n"
    )
    commands = [
        f"memories|list|--user|alice|--db|{db}",
        f"memories|show|{memory_id}|--db|{db}",
        f"memories|history|{memory_id[:8]}|--user|alice|--db|{db}",
        f"memories|search|rust|--user|alice|--mode|text|--json|--db|{db}",
        f"stats|--db|{db}",
        f"memories|export|-|--db|{db}",
        f"memories|update|{memory_id}|--importance|0.9|--db|{db}",
        f"memories|forget|{memory_id}|--db|{db}",
        f"memories|purge|--user|alice|--yes|--db|{db}",
    ]
    done = subprocess.run(
        [sys.executable, "-c", script, *commands], cwd=ROOT, env=_env(), capture_output=True,
        text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout
    assert memory_id[:8] in done.stdout and "Prefers Rust" in done.stdout
    assert "purged user 'alice': 1 memories" in done.stdout


def test_process_error_is_one_line(db: Path, tmp_path: Path) -> None:
    missing = headroom("memories", "show", "f" * 32, "--db", db)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: no database at {db}: nothing has been stored " \
        "there yet (check --db or HEADROOM_DB)"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "ok", "user_id": "alice"}\n[1, 2]\n')
    result = headroom("memories", "import", bad, "--db", db)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {bad}: line 2: expected a JSON object"
    usage = headroom("memories", "list", "--db", db)
    assert usage.returncode == 2 and "--user" in usage.stderr


@pytest.fixture
def serve_process(db: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    with running_upstream() as (upstream_url, _):
        process = subprocess.Popen(
            [sys.executable, "-m", "headroom", "serve", "--port", str(port), "--db", str(db),
             "--upstream", upstream_url, "--log-level", "info"],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            yield process, f"http://127.0.0.1:{port}"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


def test_serve_answers_healthz_and_stops_cleanly_on_sigterm(
    serve_process: tuple[subprocess.Popen[str], str],
) -> None:
    process, url = serve_process
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.communicate()
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "serve did not answer /healthz within 60 s"
        time.sleep(0.2)
    models = httpx.get(f"{url}/v1/models", timeout=10)
    assert models.status_code == 200  # passed through to the upstream
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=90)
    # uvicorn shuts down gracefully, then re-raises the signal so the parent sees it.
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert "Application shutdown complete" in stderr and "Traceback" not in stderr
    assert f"OPENAI_BASE_URL={url}/v1" in stdout


def test_as_of_accepts_dates(hr: Invoke) -> None:
    add(hr, "Works at Google")
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert len(as_json(hr("memories", "list", "--user", "alice", "--as-of", tomorrow,
                          "--json"))) == 1
    assert as_json(hr("memories", "list", "--user", "alice", "--as-of", "2001-01-01",
                      "--json")) == []
    result = hr("memories", "list", "--user", "alice", "--as-of", "yesterday", expect=2)
    assert "not an ISO date" in result.stderr


@pytest.mark.parametrize("command", [
    ["list"], ["search", "tea"], ["export"], ["purge", "--yes"], ["add", "Likes tea"], ["history"],
])
@pytest.mark.parametrize("user", ["", "  "])
def test_every_command_refuses_an_empty_or_blank_user_the_same_way(
    tmp_path: Path, command: list[str], user: str
) -> None:
    result = CliRunner().invoke(cli.app, ["memories", *command, "--user", user,
                                      "--db", str(tmp_path / "m.db")])
    assert result.exit_code == 2, result.output
    assert "a user id cannot be empty or blank" in result.output
    assert not (tmp_path / "m.db").exists()  # refused before any database is opened

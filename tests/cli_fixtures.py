"""CLI fixtures more than one test module uses: `headroom` run in-process on a temp database with
the session's real embedder (`db`, `hr`), and `serve` stopped at the process boundary (`served`,
`invoke_serve`). Modules import the fixtures by name (`# noqa: F401`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from headroom import cli
from headroom.proxy.config import ProxyConfig

Invoke = Callable[..., Result]

# The commands that read the store: `hr` adds `--db <temp db>` to these unless given one.
_STORE_COMMANDS = ("memories", "stats", "doctor", "outbox")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "memory.db"


@pytest.fixture
def hr(monkeypatch: pytest.MonkeyPatch, local_embedder: Any, db: Path) -> Invoke:
    """Run `headroom ARGS [--db <temp db>]` in-process; `expect` is the exit code."""
    import headroom.memory.embedders

    monkeypatch.setattr(headroom.memory.embedders, "make_embedder", lambda config: local_embedder)
    monkeypatch.setenv("COLUMNS", "200")  # rich tables wide enough not to wrap ids
    runner = CliRunner()

    def invoke(*args: Any, input: str | None = None, expect: int = 0, db_path: Path = db,
               env: dict[str, str] | None = None) -> Result:
        argv = [str(a) for a in args]
        if argv and argv[0] in _STORE_COMMANDS and "--db" not in argv:
            argv += ["--db", str(db_path)]
        result = runner.invoke(cli.app, argv, input=input, env=env, catch_exceptions=False)
        assert result.exit_code == expect, (result.stdout, result.stderr)
        return result

    return invoke


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[ProxyConfig]:
    """`serve` builds its config and stops short of running the server (the process boundary)."""
    import headroom.proxy.server

    started: list[ProxyConfig] = []
    monkeypatch.setattr(headroom.proxy.server, "serve", lambda config, **kw: started.append(config))
    return started


def invoke_serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                 expect: int = 0) -> Result:
    """`headroom serve --db <tmp>/m.db ARGS`; with `served`, it returns once the config is built."""
    result = CliRunner().invoke(
        cli.app, ["serve", "--db", str(tmp_path / "m.db"), *args],
        env={"COLUMNS": "250", **(env or {})},  # usage errors' boxes wrap at the width
        catch_exceptions=False,
    )
    assert result.exit_code == expect, (result.stdout, result.stderr)
    return result

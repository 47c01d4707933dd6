"""The options commands share are declared once, and the flags reach what they configure: the
embedder family, the upstream family (key from the environment or a file, never needing the
command line) and serve's timeouts, which land on ProxyConfig."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
import typer
from typer.testing import CliRunner

from headroom import cli
from headroom._cli import options
from headroom.memory.models import EmbedderBackend, MemoryConfig
from headroom.proxy.config import ProxyConfig
from tests.cli_fixtures import invoke_serve as _serve
from tests.servers import running_upstream


def _walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        if hasattr(sub, "commands"):
            yield from _walk(sub, (*path, name))
        else:
            yield " ".join((*path, name)), sub


COMMANDS = dict(_walk(typer.main.get_command(cli.app)))
EMBEDDER_FLAGS = [p.name for p in options.EMBEDDER_PARAMETERS]
UPSTREAM_FLAGS = [p.name for p in options.UPSTREAM_PARAMETERS]


def _with(names: list[str]) -> set[str]:
    return {path for path, c in COMMANDS.items() if {p.name for p in c.params} & set(names)}


def test_the_embedding_commands_are_the_ones_that_embed() -> None:
    assert _with(EMBEDDER_FLAGS) == {
        "serve", "doctor", "memories search", "memories add", "memories update",
        "memories import",
    }
    assert _with(UPSTREAM_FLAGS) == {"serve", "doctor"}


@pytest.mark.parametrize("family", [options.EMBEDDER_PARAMETERS, options.UPSTREAM_PARAMETERS],
                         ids=["embedder", "upstream"])
def test_each_option_family_is_declared_once(family: tuple[inspect.Parameter, ...]) -> None:
    names = [p.name for p in family]
    users = _with(names)
    for path in users:
        callback = COMMANDS[path].callback
        parameters = inspect.signature(callback).parameters
        # The very objects of the one declaration, not look-alikes written out again.
        assert all(parameters[p.name] is p for p in family), path
        assert [n for n in parameters if n in names] == names, path
    # And what typer built from them is the same on every command.
    rendered = {
        path: [(p.opts, p.envvar, p.help, p.default) for p in COMMANDS[path].params
               if p.name in names]
        for path in users
    }
    assert len({repr(v) for v in rendered.values()}) == 1, rendered


def test_every_db_option_is_the_shared_one() -> None:
    shared = get_args(options.DbOpt)[1]
    with_db = [path for path, c in COMMANDS.items() if any(p.name == "db" for p in c.params)]
    assert len(with_db) >= 15  # every command that touches the store, and the key commands
    for path in with_db:
        annotation = inspect.signature(COMMANDS[path].callback).parameters["db"].annotation
        assert get_args(annotation)[1] is shared, path


# --- the flags reach their destination ---------------------------------------------------------




def test_serve_timeouts_from_flags_and_environment(
    tmp_path: Path, served: list[ProxyConfig]
) -> None:
    _serve(tmp_path, "--upstream-connect-timeout", "3", "--upstream-read-timeout", "45.5",
           "--upstream-total-timeout", "0", "--header-read-timeout", "4",
           "--body-read-timeout", "6", "--durable-wait", "0.25", "--keep-alive-timeout", "30")
    env = {
        "HEADROOM_UPSTREAM_CONNECT_TIMEOUT": "7", "HEADROOM_UPSTREAM_READ_TIMEOUT": "120",
        "HEADROOM_UPSTREAM_TOTAL_TIMEOUT": "900", "HEADROOM_HEADER_READ_TIMEOUT": "2",
        "HEADROOM_BODY_READ_TIMEOUT": "9", "HEADROOM_DURABLE_WAIT": "1.5",
        "HEADROOM_KEEP_ALIVE_TIMEOUT": "90",
    }
    _serve(tmp_path, env=env)
    _serve(tmp_path)
    flags, environment, defaults = served
    fields = ("upstream_connect_timeout_s", "upstream_read_timeout_s", "upstream_total_timeout_s",
              "header_read_timeout_s", "body_read_timeout_s", "durable_wait_s",
              "keep_alive_timeout_s")

    def values(config: ProxyConfig) -> tuple[float, ...]:
        return tuple(getattr(config, f) for f in fields)

    assert values(flags) == (3.0, 45.5, 0.0, 4.0, 6.0, 0.25, 30.0)
    assert values(environment) == (7.0, 120.0, 900.0, 2.0, 9.0, 1.5, 90.0)
    assert values(defaults) == values(ProxyConfig())  # unset: ProxyConfig's own defaults


def test_serve_timeout_help_shows_proxyconfig_defaults(tmp_path: Path) -> None:
    help_text = CliRunner().invoke(cli.app, ["serve", "--help"], env={"COLUMNS": "250"}).stdout
    default = {f.name: f.default for f in dataclasses.fields(ProxyConfig)}
    assert f"{default['upstream_read_timeout_s']:g} s" in help_text
    assert f"{default['body_read_timeout_s']:g} s" in help_text
    assert "HEADROOM_UPSTREAM_TOTAL_TIMEOUT" in help_text and "visible" in help_text


def test_a_timeout_of_zero_is_refused_where_it_would_mean_at_once(
    tmp_path: Path, served: list[ProxyConfig]
) -> None:
    for flag in ("--upstream-connect-timeout", "--upstream-read-timeout",
                 "--header-read-timeout", "--body-read-timeout", "--keep-alive-timeout"):
        result = _serve(tmp_path, flag, "0", expect=2)
        assert "more than 0" in result.stderr, flag
    assert "greater than or equal to 0" in _serve(tmp_path, "--durable-wait", "-1", expect=2).stderr
    assert served == []


def test_the_upstream_key_never_has_to_be_on_the_command_line(
    tmp_path: Path, served: list[ProxyConfig]
) -> None:
    key_file = tmp_path / "upstream.key"
    key_file.write_text("sk-from-file\n")
    _serve(tmp_path, "--upstream-key-file", str(key_file))
    _serve(tmp_path, env={"HEADROOM_UPSTREAM_KEY_FILE": str(key_file)})
    _serve(tmp_path, env={"HEADROOM_UPSTREAM_KEY": "sk-from-env"})
    out = _serve(tmp_path, "--upstream-key", "sk-on-the-command-line").stdout
    assert [c.upstream_key for c in served] == [
        "sk-from-file", "sk-from-file", "sk-from-env", "sk-on-the-command-line",
    ]
    assert "server key set" in out and "sk-on-the-command-line" not in out


def test_upstream_key_file_mistakes_are_usage_errors(
    tmp_path: Path, served: list[ProxyConfig]
) -> None:
    key_file = tmp_path / "upstream.key"
    key_file.write_text("sk-from-file")
    twice = _serve(tmp_path, "--upstream-key-file", str(key_file), expect=2,
                   env={"HEADROOM_UPSTREAM_KEY": "sk-from-env"})
    assert "give the key once" in twice.stderr
    empty = tmp_path / "empty.key"
    empty.write_text(" \n")
    assert "is empty" in _serve(tmp_path, "--upstream-key-file", str(empty), expect=2).stderr
    missing = _serve(tmp_path, "--upstream-key-file", str(tmp_path / "nope"), expect=2)
    assert "does not exist" in missing.stderr
    assert served == []


def test_doctor_sends_the_key_from_the_file(tmp_path: Path, local_embedder: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import headroom.memory.embedders

    monkeypatch.setattr(headroom.memory.embedders, "make_embedder", lambda config: local_embedder)
    key_file = tmp_path / "upstream.key"
    key_file.write_text("sk-doctor-file\n")
    with running_upstream() as (url, upstream):
        result = CliRunner().invoke(
            cli.app, ["doctor", "--db", str(tmp_path / "m.db"), "--upstream", url,
                      "--upstream-key-file", str(key_file)],
            catch_exceptions=False,
        )
    assert result.exit_code == 0, result.stdout
    assert upstream.received_headers[-1]["authorization"] == "Bearer sk-doctor-file"


def test_embedder_flags_and_environment_reach_the_engine_config(
    tmp_path: Path, local_embedder: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import headroom.memory.embedders

    configs: list[Any] = []

    def make_embedder(config: Any) -> Any:
        configs.append(config)
        return local_embedder

    monkeypatch.setattr(headroom.memory.embedders, "make_embedder", make_embedder)
    db = str(tmp_path / "m.db")
    runner = CliRunner()
    added = runner.invoke(
        cli.app, ["memories", "add", "Prefers tea", "--user", "alice", "--db", db,
                  "--torch-threads", "3", "--embedder-runtime", "torch",
                  "--ollama-url", "http://ollama.test:1"],
        catch_exceptions=False,
    )
    assert added.exit_code == 0, added.stderr
    searched = runner.invoke(
        cli.app, ["memories", "search", "tea", "--user", "alice", "--db", db, "--json"],
        env={"HEADROOM_TORCH_THREADS": "2", "HEADROOM_EMBEDDER_RUNTIME": "onnx",
             "HEADROOM_EMBEDDER": "local"},
        catch_exceptions=False,
    )
    assert searched.exit_code == 0, searched.stderr
    first, second = configs
    assert (first.torch_threads, first.embedder_runtime, first.ollama_base_url) == (
        3, "torch", "http://ollama.test:1")
    assert (second.torch_threads, second.embedder_runtime) == (2, "onnx")
    assert first.embedder_backend is second.embedder_backend is EmbedderBackend.LOCAL
    assert str(first.db_path) == db


def test_a_decorated_command_must_take_the_family_value() -> None:
    def no_embed_parameter(user: str) -> None:
        pass

    with pytest.raises(TypeError, match="no 'embed' parameter"):
        options.with_embedder_options(no_embed_parameter)


def test_db_must_not_be_a_directory(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.app, ["stats", "--db", str(tmp_path)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "is a directory" in result.stderr
    assert options.parse_db("postgresql://me@db.example//memories") == (
        "postgresql://me@db.example//memories")  # a URL keeps its slashes


def test_serve_recall_preset_and_operator_limits_reach_the_engine_config(
    tmp_path: Path, served: list[ProxyConfig]
) -> None:
    _serve(tmp_path, "--recall-preset", "common", "--max-memories-per-user", "500",
           "--max-new-users-per-minute", "30")
    _serve(tmp_path, env={"HEADROOM_RECALL_PRESET": "dated",
                          "HEADROOM_MAX_MEMORIES_PER_USER": "7"})
    _serve(tmp_path)
    flags, environment, defaults = (c.memory_config() for c in served)
    assert (flags.recall_preset, flags.max_memories_per_user,
            flags.max_new_users_per_minute) == ("common", 500, 30)
    assert (environment.recall_preset, environment.max_memories_per_user,
            environment.max_new_users_per_minute) == ("dated", 7, 0)
    engine_default = MemoryConfig()
    assert (defaults.recall_preset, defaults.max_memories_per_user,
            defaults.max_new_users_per_minute) == (
        engine_default.recall_preset, engine_default.max_memories_per_user,
        engine_default.max_new_users_per_minute)
    unknown = _serve(tmp_path, "--recall-preset", "psychic", expect=2)
    assert "not a preset" in unknown.stderr and "default" in unknown.stderr
    assert len(served) == 3


def test_serve_anthropic_upstream_from_flag_and_environment(
    tmp_path: Path, served: list[ProxyConfig]
) -> None:
    _serve(tmp_path, "--anthropic-upstream", "https://anthropic.example")
    _serve(tmp_path, env={"HEADROOM_ANTHROPIC_UPSTREAM": "http://127.0.0.1:9/"})
    _serve(tmp_path)
    assert [c.anthropic_upstream_url for c in served] == [
        "https://anthropic.example", "http://127.0.0.1:9/", None]

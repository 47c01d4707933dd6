"""`headroom serve`'s auth flags: they land on ProxyConfig, the banner says which mode is on and
why, a setting the server would refuse is refused before it starts, and no secret is printed."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import Result

from headroom import cli
from headroom.proxy.config import ProxyConfig
from tests.cli_fixtures import invoke_serve as _serve


def _auth_line(result: Result) -> str:
    return next(line for line in result.stdout.splitlines() if line.startswith("  auth"))


def test_the_banner_says_which_auth_mode_is_on_and_why(
    tmp_path: Path, served: list[ProxyConfig]
) -> None:
    keyless = _auth_line(_serve(tmp_path))
    assert "off (loopback bind without an upstream key)" in keyless
    with_key = _auth_line(_serve(tmp_path, env={"HEADROOM_UPSTREAM_KEY": "sk-operator"}))
    assert "on (an upstream key is configured)" in with_key
    assert "headroom keys create" in with_key
    public = _auth_line(_serve(tmp_path, "--host", "0.0.0.0"))
    assert "on (listening on 0.0.0.0, not loopback)" in public
    forced = _auth_line(_serve(tmp_path, "--auth", "on"))
    assert "on (--auth on)" in forced
    assert [c.auth for c in served] == ["auto", "auto", "auto", "on"]


def test_auth_off_on_a_public_bind_needs_the_explicit_flag(
    tmp_path: Path, served: list[ProxyConfig]
) -> None:
    refused = _serve(tmp_path, "--host", "0.0.0.0", "--auth", "off", expect=2)
    assert "--allow-unauthenticated" in refused.stderr
    assert served == []  # refused before the server starts

    allowed = _serve(tmp_path, "--host", "0.0.0.0", "--auth", "off", "--allow-unauthenticated",
                     env={"HEADROOM_UPSTREAM_KEY": "sk-operator"})
    (config,) = served
    assert config.auth == "off" and config.allow_unauthenticated is True
    assert "auth is off: anyone who can connect" in allowed.stdout
    assert "spend the upstream key" in allowed.stdout


def test_auth_settings_reach_proxyconfig(tmp_path: Path, served: list[ProxyConfig]) -> None:
    tenant_keys = tmp_path / "tenants.json"
    tenant_keys.write_text(json.dumps({"acme": "sk-acme-secret", "globex": "sk-globex-secret"}))
    out = _serve(
        tmp_path, "--cors-origin", "https://app.example", "--cors-origin", "https://b.example",
        "--key-db", str(tmp_path / "keys.db"),
        "--upstream-routes", "POST /v1/chat/completions, GET /v1/models",
        "--tenant-upstream-keys-file", str(tenant_keys),
        "--key-requests-per-minute", "60", "--key-memories-per-minute", "5",
    ).stdout
    _serve(tmp_path, env={
        "HEADROOM_CORS_ORIGINS": "https://c.example https://d.example",
        "HEADROOM_KEY_DB": str(tmp_path / "env-keys.db"), "HEADROOM_AUTH": "on",
    })
    _serve(tmp_path)
    flags, environment, defaults = served
    assert flags.cors_origins == ("https://app.example", "https://b.example")
    assert Path(flags.key_db_path) == tmp_path / "keys.db"  # type: ignore[arg-type]
    assert flags.upstream_routes == ("POST /v1/chat/completions", "GET /v1/models")
    assert dict(flags.tenant_upstream_keys) == {"acme": "sk-acme-secret",
                                                "globex": "sk-globex-secret"}
    assert (flags.key_requests_per_minute, flags.key_memories_per_minute) == (60, 5)
    assert "keys of 2 tenants" in out and "sk-acme-secret" not in out

    assert environment.cors_origins == ("https://c.example", "https://d.example")
    assert Path(environment.key_db_path) == tmp_path / "env-keys.db"  # type: ignore[arg-type]
    assert environment.auth == "on"

    default = ProxyConfig()
    assert (defaults.cors_origins, defaults.upstream_routes, defaults.key_db_path) == (
        default.cors_origins, default.upstream_routes, default.key_db_path)
    assert dict(defaults.tenant_upstream_keys) == {}


def test_bad_auth_settings_are_usage_errors(tmp_path: Path, served: list[ProxyConfig]) -> None:
    bad_route = _serve(tmp_path, "--upstream-routes", "POST /admin", expect=2)
    assert "starts with /v1/" in bad_route.stderr
    not_json = tmp_path / "tenants.json"
    not_json.write_text("acme=sk-1")
    assert "is not JSON" in _serve(tmp_path, "--tenant-upstream-keys-file", str(not_json),
                                   expect=2).stderr
    a_list = tmp_path / "list.json"
    a_list.write_text('["sk-1"]')
    assert "JSON object of tenant to key" in _serve(
        tmp_path, "--tenant-upstream-keys-file", str(a_list), expect=2).stderr
    assert "'sideways'" in _serve(tmp_path, "--auth", "sideways", expect=2).stderr
    assert served == []


def test_secrets_are_not_printed(tmp_path: Path, served: list[ProxyConfig]) -> None:
    key_file = tmp_path / "upstream.key"
    key_file.write_text("sk-very-secret-operator-key\n")
    result = _serve(tmp_path, "--upstream-key-file", str(key_file),
                    "--openai-api-key", "sk-embedder-secret")
    assert served[0].upstream_key == "sk-very-secret-operator-key"
    assert "sk-very-secret" not in result.output and "sk-embedder-secret" not in result.output


def test_every_serve_flag_and_variable_is_in_the_readme() -> None:
    import typer

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    serve = typer.main.get_command(cli.app).commands["serve"]  # type: ignore[attr-defined]
    rows = [line for line in readme.splitlines() if line.startswith("| `--")]
    for param in serve.params:
        if param.name == "help":
            continue
        flag = max(param.opts, key=len)
        row = next((r for r in rows if r.startswith(f"| `{flag}`")), None)
        assert row is not None, f"README's serve table has no row for {flag}"
        assert param.envvar is None or f"`{param.envvar}`" in row, (flag, param.envvar)

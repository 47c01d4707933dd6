"""`headroom memories search --recall-preset`: the CLI ranks as the named preset does, the same
name `headroom serve --recall-preset` takes (and the same HEADROOM_RECALL_PRESET)."""

from __future__ import annotations

import json
from typing import Any

from tests.cli_fixtures import Invoke


def _add(hr: Invoke, text: str) -> str:
    return str(json.loads(hr("memories", "add", text, "--user", "alice", "--json").stdout)["id"])


def _hits(hr: Invoke, *options: Any, env: dict[str, str] | None = None) -> list[str]:
    result = hr("memories", "search", "pasta for dinner", "--user", "alice", "--json", *options,
                env=env)
    return [h["memory"]["id"] for h in json.loads(result.stdout)]


def test_search_ranks_with_the_named_preset(hr: Invoke) -> None:
    # Shares no word with the query: only a preset that reads vectors finds it.
    italian = _add(hr, "Loves Italian cooking, especially spaghetti carbonara")
    _add(hr, "Works as a nurse on night shifts")

    assert italian in _hits(hr)  # the default reads vectors and BM25
    assert italian in _hits(hr, "--recall-preset", "vector")
    assert italian not in _hits(hr, "--recall-preset", "bm25")
    assert italian not in _hits(hr, env={"HEADROOM_RECALL_PRESET": "bm25"})
    # The flag wins over the environment, as for `serve`.
    assert italian in _hits(hr, "--recall-preset", "default",
                            env={"HEADROOM_RECALL_PRESET": "bm25"})


def test_an_unknown_preset_is_a_usage_error(hr: Invoke) -> None:
    result = hr("memories", "search", "x", "--user", "alice", "--recall-preset", "nope",
                expect=2)
    assert "'nope' is not a preset" in result.stderr
    assert "learned-turns" in result.stderr  # it lists the choices

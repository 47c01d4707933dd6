"""The proxy's edge: what a request body may be (`parse_json_body`), read timeouts, headers, the
process (SIGTERM, logging) and readiness, each against a real server where it matters."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from headroom.proxy.body import MAX_DEPTH, parse_json_body
from headroom.proxy.errors import BadRequestError, error_response


def _nested(depth: int) -> bytes:
    """An object whose innermost value sits `depth` containers deep (the object counts as 1)."""
    return b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def _rejected(raw: bytes) -> dict[str, Any]:
    with pytest.raises(BadRequestError) as caught:
        parse_json_body(raw)
    body = json.loads(error_response(caught.value).body)
    assert caught.value.status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    return dict(body["error"])


# --- parse_json_body ---------------------------------------------------------------------------


def test_an_object_is_returned_as_parsed() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo 你好"}], "stream": True}
    assert parse_json_body(orjson.dumps(body)) == body
    assert parse_json_body(b'{"stream": false}') == {"stream": False}
    assert parse_json_body(b'{"stream": null}') == {"stream": None}  # OpenAI's "not set"


@pytest.mark.parametrize("raw", [b'{"model": ', b"\xff\xfe not utf-8", b"", b"NaN",
                                 b'{"a": 1} trailing', b'["a", "list"]', b'"text"', b"42"])
def test_not_a_json_object_is_invalid_json(raw: bytes) -> None:
    assert _rejected(raw)["code"] == "invalid_json"


@pytest.mark.parametrize("stream", ['"true"', '"false"', "1", "0", "[]", "{}", '"yes"'])
def test_a_stream_that_is_not_a_boolean_is_rejected(stream: str) -> None:
    error = _rejected(f'{{"model": "m", "stream": {stream}}}'.encode())
    assert (error["code"], error["param"]) == ("invalid_type", "stream")


def test_nesting_up_to_the_bound_passes_and_beyond_is_rejected() -> None:
    assert parse_json_body(_nested(MAX_DEPTH))["a"] is not None
    assert _rejected(_nested(MAX_DEPTH + 1))["code"] == "json_too_deep"


@pytest.mark.parametrize("depth", [300, 1023, 1025, 100_000])
def test_deep_nesting_never_escapes_as_another_error(depth: int) -> None:
    # 300: parses, but orjson cannot serialise it again; 1025+: past orjson's own limit.
    assert _rejected(_nested(depth))["code"] == "json_too_deep"


def test_deep_nesting_with_a_lone_surrogate_is_still_too_deep() -> None:
    # The stdlib fallback (for surrogates) has its own recursion limit to stay inside.
    raw = b'{"s": "\\ud800", "a":' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert _rejected(raw)["code"] == "json_too_deep"


def test_lone_surrogates_are_replaced_so_the_body_can_be_encoded() -> None:
    raw = b'{"messages": [{"content": "poison \\ud800 tok", "\\udfff": ["\\ud83d"]}]}'
    body = parse_json_body(raw)
    assert body == {"messages": [{"content": "poison \ufffd tok", "\ufffd": ["\ufffd"]}]}
    assert orjson.loads(orjson.dumps(body)) == body
    # A proper pair is one character, untouched.
    assert parse_json_body(b'{"e": "\\ud83d\\ude00"}') == {"e": "\U0001f600"}

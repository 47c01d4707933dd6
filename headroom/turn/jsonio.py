"""JSON on the proxy's hot path: orjson (about 3x the stdlib's speed, and non-ASCII text stays
UTF-8 instead of growing into `\\u` escapes), with the stdlib as the fallback for what orjson
refuses — lone surrogate escapes and integers past 64 bits — so such a body is still relayed and
stripped rather than passed on untouched."""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["dumps", "loads"]


def loads(data: bytes | str) -> Any:
    """Raises ValueError (both parsers' errors derive from it) when `data` is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON."""
    try:
        return orjson.dumps(value)
    except TypeError:
        # ASCII escapes, so that lone surrogates survive as the escapes they came as.
        return json.dumps(value, separators=(",", ":")).encode()

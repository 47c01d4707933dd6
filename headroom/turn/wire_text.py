"""Reading the conversation of a dict wire format (Messages, Responses): where the latest user
entry is, and the text of a content that is a string or a list of typed parts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["joined_text", "last_index"]


def last_index(items: Sequence[Any], accepts: Callable[[Any], bool]) -> int:
    """The index of the last item `accepts` is true for; `len(items)` when there is none."""
    for i in range(len(items) - 1, -1, -1):
        if accepts(items[i]):
            return i
    return len(items)


def joined_text(content: Any, is_text: Callable[[Mapping[str, Any]], bool]) -> str:
    """A string content itself; of a list of parts, the non-empty string `text`s of the parts
    `is_text` accepts, one per line; "" for anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, Mapping) and is_text(p)]
        return "\n".join(p for p in parts if isinstance(p, str) and p)
    return ""

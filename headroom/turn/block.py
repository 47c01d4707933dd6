"""The `<memory>` block's JSON parsed into `MemoryOps`. Pure.

Models write imperfect JSON, so parsing is tolerant and never raises: code fences, text around
the object, trailing commas, single items instead of lists, `forget` items as strings or
`{"id": ...}`, key case, and a block cut off by max_tokens (complete items are kept, a half-written
item is dropped) all work. Whatever cannot be used is dropped or defaulted with a warning the
caller may log:

- unknown category -> "fact" (the memory's text is the valuable part; a wrong label is cheap);
- importance missing -> 0.5, not a number -> 0.5 with a warning, out of range -> clamped to 0..1;
- unknown scope -> "user" (the engine later clamps it to the scopes the request has);
- empty text, over-long text, and update/forget on an alias that was not shown in this request
  are dropped: the proxy accepts ops only on memories the model was shown;
- text is made valid first (`headroom.memory.text.clean_text`: lone surrogates such as JSON's
  `"\\ud800"` become U+FFFD, control characters go), so no op carries text that cannot be
  encoded, embedded or stored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..memory.models import AddOp, ForgetOp, MemoryCategory, MemoryOps, ScopeLevel, UpdateOp
from ..memory.text import clean_text

__all__ = ["MAX_ITEMS", "MAX_TEXT_CHARS", "ParsedBlock", "parse_ops"]

MAX_ITEMS = 50  # per op kind; a block asking for more is runaway generation, not memory
MAX_TEXT_CHARS = 2000
_MAX_BODY_CHARS = 64_000  # the repair loop is quadratic in the worst case
_DEFAULT_IMPORTANCE = 0.5
_FORGET_SYNONYMS = ("forget", "delete", "remove")
# strict=False: models put raw newlines and tabs inside strings.
_DECODER = json.JSONDecoder(strict=False)


@dataclass(frozen=True)
class ParsedBlock:
    ops: MemoryOps
    warnings: tuple[str, ...] = ()


def parse_ops(
    body: str | None, *, truncated: bool = False, aliases: Mapping[str, str]
) -> ParsedBlock:
    """Ops from a block body, aliases (m1, m2, ...) resolved to memory ids via `aliases`."""
    warnings: list[str] = []
    if body is None:
        return ParsedBlock(MemoryOps())
    fields: dict[str, Any] = {}
    for value in _load_all(body, truncated=truncated, warnings=warnings):
        if isinstance(value, list):
            warnings.append("block is a bare list; read as 'add' items")
            value = {"add": value}
        if not isinstance(value, dict):
            if value is not None:
                warnings.append(f"block is a JSON {type(value).__name__}, not an object; ignored")
            continue
        for key, item in value.items():
            name = str(key).strip().lower()
            if name in _FORGET_SYNONYMS:
                fields.setdefault("forget", []).extend(_as_list(item))
            elif name in ("add", "update"):
                fields.setdefault(name, []).extend(_as_list(item))
            else:
                warnings.append(f"unknown key {key!r} ignored")

    adds = [op for op in (_add(i, warnings) for i in _capped(fields, "add", warnings)) if op]
    updates: dict[str, UpdateOp] = {}
    for item in _capped(fields, "update", warnings):
        op = _update(item, aliases, warnings)
        if op is None:
            continue
        if op.id in updates:
            warnings.append(f"second update of the same memory ({op.id}) ignored")
        else:
            updates[op.id] = op
    forgets: dict[str, ForgetOp] = {}
    for item in _capped(fields, "forget", warnings):
        memory_id = _resolve(_id_of(item), aliases, "forget", warnings)
        if memory_id is None or memory_id in forgets:
            continue
        if memory_id in updates:
            # The update already retires the old text; keep the newer information.
            warnings.append(f"memory {memory_id} both updated and forgotten; kept the update")
            continue
        forgets[memory_id] = ForgetOp(memory_id)
    ops = MemoryOps(tuple(adds), tuple(updates.values()), tuple(forgets.values()))
    return ParsedBlock(ops, tuple(warnings))


# --- loading tolerant JSON -----------------------------------------------------------------------


def _first_bracket(text: str, start: int = 0) -> int:
    return min((i for i in (text.find("{", start), text.find("[", start)) if i >= 0), default=-1)


def _load_all(body: str, *, truncated: bool, warnings: list[str]) -> list[Any]:
    """Every JSON value in the body, in order: the stripper joins the bodies of several blocks
    with newlines. A value that needs repair is the last one read."""
    if not body.strip():
        warnings.append("truncated block is empty" if truncated else "empty block")
        return []
    if len(body) > _MAX_BODY_CHARS:
        warnings.append(f"block longer than {_MAX_BODY_CHARS} characters ignored")
        return []
    # Fences and any prose around the JSON fall away: parsing starts at a bracket and
    # raw_decode stops at the end of each value.
    start = _first_bracket(body)
    if start < 0:
        warnings.append("block holds no JSON object")
        return []
    values: list[Any] = []
    while start >= 0:
        # After the first value, only another clean one (a further block) or a cut-off last
        # block is read: prose with brackets after the object stays ignored, as it always was.
        repair = not values or truncated
        value, end = _load(body[start:], truncated=truncated, warnings=warnings, repair=repair)
        if value is None and values:
            break
        values.append(value)
        if end is None:
            break
        start = _first_bracket(body, start + end)
    return values


def _load(
    text: str, *, truncated: bool, warnings: list[str], repair: bool = True
) -> tuple[Any, int | None]:
    """The JSON value `text` starts with, and where it ends (None: repaired, or nothing)."""
    for candidate in (text, _drop_trailing_commas(text)):
        try:
            value, end = _DECODER.raw_decode(candidate)
        except (ValueError, RecursionError):  # deep nesting raises RecursionError
            continue
        # Dropped commas shift the text: the end only counts when nothing was dropped.
        return value, end if candidate is text else None
    if not repair:
        return None, None
    value = _repair(text)
    if value is None:
        warnings.append("block is not valid JSON and could not be repaired; ignored")
    elif truncated:
        warnings.append("block was cut off; kept the items that were complete")
    else:
        warnings.append("block was malformed; kept the items that were complete")
    return value, None


def _scan(text: str) -> Iterator[tuple[int, str, bool]]:
    """Each character of JSON-ish text, with True where it is structure (outside strings)."""
    in_str = escaped = False
    for i, ch in enumerate(text):
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
            yield i, ch, False
        elif ch == '"':
            in_str = True
            yield i, ch, False
        else:
            yield i, ch, True


def _drop_trailing_commas(text: str) -> str:
    """Remove commas followed (after whitespace) by a closing bracket, outside strings."""
    out: list[str] = []
    for i, ch, structural in _scan(text):
        if structural and ch == ",":
            rest = text[i + 1 :].lstrip()
            if not rest or rest[0] in "}]":
                continue
        out.append(ch)
    return "".join(out)


def _repair(text: str) -> Any:
    """Best effort for a cut-off or broken value: cut at an item boundary (before a comma or
    after a closing bracket, at most two levels deep, so a half-written item never survives),
    close what is open, and take the longest such prefix that parses."""
    cuts: list[tuple[int, str]] = []
    stack: list[str] = []
    for i, ch, structural in _scan(text):
        if not structural:
            continue
        if ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack or stack[-1] != ch:
                break  # mismatched bracket: nothing after this point can be trusted
            stack.pop()
            if not stack:
                break
            if len(stack) <= 2:
                cuts.append((i + 1, "".join(reversed(stack))))
        elif ch == "," and 1 <= len(stack) <= 2:
            cuts.append((i, "".join(reversed(stack))))
    for end, closers in reversed(cuts):
        try:
            return _DECODER.decode(_drop_trailing_commas(text[:end] + closers))
        except (ValueError, RecursionError):
            continue
    return None


# --- items ---------------------------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _capped(fields: Mapping[str, list[Any]], name: str, warnings: list[str]) -> list[Any]:
    items = fields.get(name, [])
    if len(items) > MAX_ITEMS:
        warnings.append(f"{len(items)} '{name}' items; only the first {MAX_ITEMS} kept")
    return items[:MAX_ITEMS]


def _lower_keys(item: Mapping[Any, Any]) -> dict[str, Any]:
    return {str(k).strip().lower(): v for k, v in item.items()}


def _text(value: Any, kind: str, warnings: list[str]) -> str | None:
    if not isinstance(value, str):
        warnings.append(f"{kind} without a text string dropped")
        return None
    text = " ".join(clean_text(value).split())
    if not text:
        warnings.append(f"{kind} with empty text dropped")
        return None
    if len(text) > MAX_TEXT_CHARS:
        warnings.append(f"{kind} text longer than {MAX_TEXT_CHARS} characters dropped")
        return None
    return text


def _add(item: Any, warnings: list[str]) -> AddOp | None:
    if isinstance(item, str):
        text = _text(item, "add", warnings)
        return AddOp(text) if text else None
    if not isinstance(item, dict):
        warnings.append(f"add item {item!r:.60} is not an object; dropped")
        return None
    fields = _lower_keys(item)
    raw_text = next((fields[k] for k in ("text", "content", "memory") if k in fields), None)
    text = _text(raw_text, "add", warnings)
    if text is None:
        return None
    category = _category(fields.get("category"), "used 'fact'", warnings) or MemoryCategory.FACT
    importance = _importance(fields.get("importance"), warnings)
    return AddOp(
        text=text,
        category=category,
        importance=_DEFAULT_IMPORTANCE if importance is None else importance,
        scope=_scope(fields.get("scope"), warnings),
        entity_refs=_entities(fields.get("entity_refs", fields.get("entities"))),
    )


def _update(item: Any, aliases: Mapping[str, str], warnings: list[str]) -> UpdateOp | None:
    if not isinstance(item, dict):
        warnings.append(f"update item {item!r:.60} is not an object; dropped")
        return None
    fields = _lower_keys(item)
    memory_id = _resolve(_id_of(fields), aliases, "update", warnings)
    if memory_id is None:
        return None
    raw_text = next((fields[k] for k in ("text", "content", "memory") if k in fields), None)
    text = _text(raw_text, "update", warnings)
    if text is None:
        return None
    return UpdateOp(
        id=memory_id,
        text=text,
        category=_category(fields.get("category"), "kept the memory's category", warnings),
        importance=_importance(fields.get("importance"), warnings),
    )


def _id_of(item: Any) -> Any:
    if isinstance(item, dict):
        fields = _lower_keys(item)
        return fields.get("id", fields.get("alias"))
    return item


def _resolve(alias: Any, aliases: Mapping[str, str], kind: str, warnings: list[str]) -> str | None:
    if not isinstance(alias, str) or not alias.strip():
        warnings.append(f"{kind} without an alias string ({alias!r:.40}) dropped")
        return None
    key = alias.strip().strip("[]").strip()
    memory_id = aliases.get(key, aliases.get(key.lower()))
    if memory_id is None:
        warnings.append(f"{kind} of {alias!r:.40}: not a memory shown in this request; dropped")
    return memory_id


def _category(value: Any, fallback: str, warnings: list[str]) -> MemoryCategory | None:
    if value is None:
        return None
    name = str(value).strip().lower()
    for candidate in (name, name.removesuffix("s")):
        try:
            return MemoryCategory(candidate)
        except ValueError:
            continue
    warnings.append(f"unknown category {value!r:.40}; {fallback}")
    return None


def _importance(value: Any, warnings: list[str]) -> float | None:
    if value is None:
        return None
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        warnings.append(f"importance {value!r:.40} is not a number; used the default")
        return None
    return min(1.0, max(0.0, number))


def _scope(value: Any, warnings: list[str]) -> ScopeLevel:
    if value is None:
        return ScopeLevel.USER
    try:
        return ScopeLevel(str(value).strip().lower())
    except ValueError:
        warnings.append(f"unknown scope {value!r:.40}; used 'user'")
        return ScopeLevel.USER


def _entities(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    names = (" ".join(clean_text(i).split()) for i in items if isinstance(i, str))
    return tuple(dict.fromkeys(name for name in names if name))

"""The Responses API wire format (`POST /v1/responses`) as a turn sees it, over plain dicts.

- The conversation: `input`, a string or a list of items. With `previous_response_id` the earlier
  turns live upstream, so recall searches the new input only (which is all the body carries).
- Injection: the extraction instruction goes first in `instructions` (the same bytes on every
  request, ahead of the client's own instructions, so providers' prompt caches keep matching);
  the memories go as a system message item right before the latest user input.
- Extraction is off with `text.format` JSON (a block would break the JSON) and with output
  logprobs (they would carry the block's tokens past the stripper).
- The answer: every `output_text` part of every `message` item runs through its own
  `BlockStripper`; the block stored is the one of the last part that wrote one (the answer's end).
  Streaming (`ResponsesStreamStripper`) strips `response.output_text.delta` and rewrites every
  event that repeats the text (`…output_text.done`, `…content_part.done`, `…output_item.done`,
  and the final `response.completed` / `incomplete` / `failed` with its `output` array), so for
  every chunking the client sees exactly the non-streamed answer's text.
- A part the upstream closed (`…output_text.done`, or a part in a whole response) counts as
  complete; only a stream that ends before a part's `done` is cut off. An unclosed JSON block is
  stripped as truncated either way.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from ..memory.models import Memory
from .format import Injected
from .inject import EXTRACTION_INSTRUCTION, render_memories
from .stripper import Block, BlockStripper, split_block
from .wire_text import joined_text, last_index

__all__ = ["RESPONSES", "Responses", "ResponsesStreamStripper", "strip_response"]

_JSON_FORMATS = frozenset({"json_object", "json_schema"})
_LOGPROBS_INCLUDE = "message.output_text.logprobs"
_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_PartKey = tuple[int, int]  # (output_index, content_index)


def _is_user_item(item: Any) -> bool:
    return (isinstance(item, Mapping) and item.get("role") == "user"
            and item.get("type", "message") == "message")


def _last_user_index(items: Sequence[Any]) -> int:
    return last_index(items, _is_user_item)


def _item_text(item: Mapping[str, Any]) -> str:
    return joined_text(
        item.get("content"),
        lambda part: part.get("type", "input_text") in ("input_text", "text", "output_text"),
    )


class Responses:
    """The `WireFormat` of the Responses API."""

    name = "responses"

    def user(self, body: Mapping[str, Any]) -> Any:
        return body.get("user")

    def has_conversation(self, body: Mapping[str, Any]) -> bool:
        return isinstance(body.get("input"), (str, list))

    def streams(self, body: Mapping[str, Any]) -> bool:
        return body.get("stream") is True

    def query_text(self, body: Mapping[str, Any]) -> str:
        given = body["input"]
        if isinstance(given, str):
            return given
        index = _last_user_index(given)
        return _item_text(given[index]) if index < len(given) else ""

    def extraction_blockers(self, body: Mapping[str, Any]) -> list[str]:
        notes = []
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, Mapping) else None
        if isinstance(fmt, Mapping) and fmt.get("type") in _JSON_FORMATS:
            notes.append("extraction off: text.format asks for JSON")
        include = body.get("include")
        if body.get("top_logprobs") or (
            isinstance(include, list) and _LOGPROBS_INCLUDE in include
        ):
            notes.append("extraction off: logprobs requested")
        return notes

    def inject(
        self, body: Mapping[str, Any], memories: Sequence[Memory], *, extraction: bool,
        budget_tokens: int,
    ) -> Injected:
        out = dict(body)
        rendered = render_memories(memories, budget_tokens)
        if rendered.content is not None:
            given = body["input"]
            items: list[Any] = (
                [{"role": "user", "content": given}] if isinstance(given, str) else list(given)
            )
            memory_item = {"type": "message", "role": "system", "content": rendered.content}
            items.insert(_last_user_index(items), memory_item)
            out["input"] = items
        if extraction:
            own = body.get("instructions")
            out["instructions"] = (
                f"{EXTRACTION_INSTRUCTION}\n\n{own}" if isinstance(own, str) and own
                else EXTRACTION_INSTRUCTION
            )
        return Injected(out, rendered.aliases, rendered.count)

    def strip_answer(self, answer: Any) -> tuple[Any, Block | None]:
        if not isinstance(answer, Mapping):
            return answer, None
        return strip_response(answer)

    def stream_stripper(self) -> ResponsesStreamStripper:
        return ResponsesStreamStripper()


RESPONSES = Responses()


def _text_parts(output: Any) -> list[tuple[_PartKey, dict[str, Any]]]:
    """The `output_text` parts of an `output` array (dicts of the given structure), by key."""
    found = []
    for o, item in enumerate(output if isinstance(output, list) else []):
        if not isinstance(item, dict) or item.get("type") != "message":
            continue
        content = item.get("content")
        for c, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") == "output_text" and isinstance(
                part.get("text"), str
            ):
                found.append(((o, c), part))
    return found


def _visible_output_text(response: dict[str, Any]) -> None:
    """Some servers add the SDK's `output_text` convenience field: keep it in step."""
    if isinstance(response.get("output_text"), str):
        response["output_text"] = "".join(p["text"] for _, p in _text_parts(response["output"]))


def strip_response(response: Mapping[str, Any]) -> tuple[dict[str, Any], Block | None]:
    """A copy of a whole response with the block removed from every `output_text` part, and the
    block of the last part that wrote one."""
    out = copy.deepcopy(dict(response))
    block: Block | None = None
    for (o, _), part in _text_parts(out.get("output")):
        part["text"], body, truncated = split_block(part["text"])
        if body is not None:
            block = Block(o, body, truncated)
    if block is not None or isinstance(out.get("output_text"), str):
        _visible_output_text(out)
    return out, block


class ResponsesStreamStripper:
    """Responses stream events (dicts) in, the events the client may see out. An event nobody
    changed is returned as the same object; a changed one is a new dict (the input is never
    modified). An output_text delta left empty is dropped; text held back at a part's end goes
    out as an extra delta (the envelope of the part's `done` event) just before it."""

    def __init__(self) -> None:
        self._parts: dict[_PartKey, BlockStripper] = {}
        self._visible: dict[_PartKey, str] = {}
        self._blocks: dict[_PartKey, Block] = {}
        self._last: dict[str, Any] | None = None  # the latest delta, template for a flush

    @property
    def chosen_block(self) -> Block | None:
        return self._blocks[max(self._blocks)] if self._blocks else None

    @property
    def in_block(self) -> bool:
        return any(s.in_block for s in self._parts.values())

    def ends_answer(self, event: Any) -> bool:
        return isinstance(event, Mapping) and event.get("type") in _FINAL_EVENTS

    def feed(self, event: Any) -> list[Any]:
        if not isinstance(event, dict):
            return [event]
        kind = event.get("type")
        if kind == "response.output_text.delta":
            return self._delta(event)
        if kind == "response.output_text.done":
            return self._text_done(event)
        if kind == "response.content_part.done":
            return [self._with_part(event, "part", self._key(event))]
        if kind == "response.output_item.done":
            return [self._with_item(event)]
        if kind in _FINAL_EVENTS:
            return [*self.finish(), self._with_response(event)]
        return [event]

    def finish(self) -> list[Any]:
        """Parts that never got their `done`: cut off; their held text as extra deltas."""
        out = []
        for key, stripper in sorted(self._parts.items()):
            if not stripper.finished:
                rest = self._close(key, cut_off=True)
                if rest and self._last is not None:
                    out.append(self._extra_delta(self._last, key, rest))
        return out

    @staticmethod
    def _key(event: Mapping[str, Any]) -> _PartKey | None:
        o, c = event.get("output_index"), event.get("content_index")
        return (o, c) if isinstance(o, int) and isinstance(c, int) else None

    def _stripper(self, key: _PartKey) -> BlockStripper:
        if key not in self._parts:
            self._parts[key] = BlockStripper()
            self._visible[key] = ""
        return self._parts[key]

    def _close(self, key: _PartKey, *, cut_off: bool) -> str:
        stripper = self._parts[key]
        rest = stripper.finish(cut_off=cut_off)
        self._visible[key] += rest
        if stripper.block is not None:
            self._blocks[key] = Block(key[0], stripper.block, stripper.truncated)
        return rest

    def _delta(self, event: dict[str, Any]) -> list[Any]:
        key = self._key(event)
        delta = event.get("delta")
        if key is None or not isinstance(delta, str) or self._stripper(key).finished:
            return [event]
        self._last = event
        visible = self._parts[key].feed(delta)
        self._visible[key] += visible
        if visible == delta:
            return [event]
        return [{**event, "delta": visible}] if visible else []

    def _text_done(self, event: dict[str, Any]) -> list[Any]:
        key = self._key(event)
        if key is None or not isinstance(event.get("text"), str):
            return [event]
        if key not in self._parts:
            # A part whose text came only here: stripped as a whole.
            self._stripper(key).feed(event["text"])
        out: list[Any] = []
        if not self._parts[key].finished:
            rest = self._close(key, cut_off=False)
            if rest:
                out.append(self._extra_delta(event, key, rest))
        visible = self._visible[key]
        out.append(event if visible == event["text"] else {**event, "text": visible})
        return out

    @staticmethod
    def _extra_delta(like: Mapping[str, Any], key: _PartKey, text: str) -> dict[str, Any]:
        extra = {k: v for k, v in like.items()
                 if k in ("item_id", "sequence_number")}
        return {"type": "response.output_text.delta", **extra, "output_index": key[0],
                "content_index": key[1], "delta": text, "logprobs": []}

    def _visible_for(self, key: _PartKey | None, text: Any) -> str | None:
        """The visible text of a part this stream stripped, when it differs from `text`."""
        if key is None or not isinstance(text, str):
            return None
        if key not in self._visible:
            self._stripper(key).feed(text)  # text seen only here: stripped as a whole
        if not self._parts[key].finished:
            self._close(key, cut_off=False)
        visible = self._visible[key]
        return visible if visible != text else None

    def _with_part(self, event: dict[str, Any], field: str, key: _PartKey | None) -> Any:
        part = event.get(field)
        if not isinstance(part, dict) or part.get("type") != "output_text":
            return event
        visible = self._visible_for(key, part.get("text"))
        return event if visible is None else {**event, field: {**part, "text": visible}}

    def _rewrite_output(self, output: Any, first_index: int | None = None) -> Any:
        """`output` (a list of items, or one item at `first_index`) with stripped texts, or the
        same object when nothing changed."""
        items = [output] if first_index is not None else output
        if not isinstance(items, list):
            return output
        changed = False
        new_items = list(items)
        for position, item in enumerate(items):
            o = first_index if first_index is not None else position
            if not isinstance(item, dict) or not isinstance(item.get("content"), list):
                continue
            content = list(item["content"])
            touched = False
            for c, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "output_text":
                    visible = self._visible_for((o, c), part.get("text"))
                    if visible is not None:
                        content[c] = {**part, "text": visible}
                        touched = True
            if touched:
                new_items[position] = {**item, "content": content}
                changed = True
        if not changed:
            return output
        return new_items[0] if first_index is not None else new_items

    def _with_item(self, event: dict[str, Any]) -> Any:
        o = event.get("output_index")
        if not isinstance(o, int):
            return event
        item = self._rewrite_output(event.get("item"), o)
        return event if item is event.get("item") else {**event, "item": item}

    def _with_response(self, event: dict[str, Any]) -> Any:
        response = event.get("response")
        if not isinstance(response, dict):
            return event
        output = self._rewrite_output(response.get("output"))
        if output is response.get("output"):
            return event
        new = {**response, "output": output}
        _visible_output_text(new)
        return {**event, "response": new}

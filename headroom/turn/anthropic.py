"""Anthropic's Messages wire format (`POST /v1/messages`) as a turn sees it, over plain dicts.

- The conversation: `messages` (content a string or blocks); the user id is `metadata.user_id`.
  Recall searches with the latest user text (a turn of only `tool_result`s has none).
- Injection: the extraction instruction is the first `system` text block (the same bytes on every
  request, ahead of the client's own system prompt: a stable prefix for prompt caching). The
  memories go as a text block at the start of the latest user message (after its `tool_result`
  blocks, which the API wants first): Messages has no system role inside `messages`, and a
  separate user message would make two user turns in a row, which some compatible servers refuse.
- Extraction is off when the answer must be JSON: a `tool_choice` forcing a tool (the answer is
  the tool call), or an assistant prefill starting with `{` or `[`.
- The answer: each `text` content block runs through its own `BlockStripper`; `tool_use`,
  `thinking` and every other block pass untouched. The block stored is the last text block's.
  Streaming (`MessagesStreamStripper`) strips `content_block_delta` `text_delta`s; text held back
  at a block's end goes out as an extra `text_delta` just before its `content_block_stop`. A
  block the upstream closed counts as complete (an unclosed JSON memory block is stripped as
  truncated either way); only a stream that ends first is cut off.
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

__all__ = ["MESSAGES", "Messages", "MessagesStreamStripper", "strip_message"]


def _is_user(message: Any) -> bool:
    return isinstance(message, Mapping) and message.get("role") == "user"


def _last_user_index(messages: Sequence[Any]) -> int:
    return last_index(messages, _is_user)


def _text_of(content: Any) -> str:
    return joined_text(content, lambda block: block.get("type") == "text")


def _as_blocks(content: Any) -> list[Any]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


class Messages:
    """The `WireFormat` of Anthropic's Messages API."""

    name = "messages"

    def user(self, body: Mapping[str, Any]) -> Any:
        metadata = body.get("metadata")
        return metadata.get("user_id") if isinstance(metadata, Mapping) else None

    def has_conversation(self, body: Mapping[str, Any]) -> bool:
        return isinstance(body.get("messages"), list)

    def streams(self, body: Mapping[str, Any]) -> bool:
        return body.get("stream") is True

    def query_text(self, body: Mapping[str, Any]) -> str:
        """The latest user text: a user turn of only `tool_result`s continues the request of
        the user turn before it, so that one's text is what recall searches with."""
        for message in reversed(body["messages"]):
            if _is_user(message):
                text = _text_of(message.get("content"))
                if text:
                    return text
        return ""

    def extraction_blockers(self, body: Mapping[str, Any]) -> list[str]:
        notes = []
        choice = body.get("tool_choice")
        if isinstance(choice, Mapping) and choice.get("type") in ("tool", "any"):
            notes.append("extraction off: tool_choice forces a tool call")
        messages = body.get("messages") or []
        last = messages[-1] if messages else None
        if isinstance(last, Mapping) and last.get("role") == "assistant":
            prefill = _text_of(last.get("content")).lstrip()
            if prefill[:1] in ("{", "["):
                notes.append("extraction off: the assistant prefill starts JSON")
        return notes

    def inject(
        self, body: Mapping[str, Any], memories: Sequence[Memory], *, extraction: bool,
        budget_tokens: int,
    ) -> Injected:
        out = dict(body)
        rendered = render_memories(memories, budget_tokens)
        if rendered.content is not None:
            messages = list(body["messages"])
            index = _last_user_index(messages)
            memory_block = {"type": "text", "text": rendered.content}
            if index < len(messages) and isinstance(messages[index], Mapping):
                blocks = _as_blocks(messages[index].get("content") or [])
                at = 0
                while at < len(blocks) and isinstance(blocks[at], Mapping) and (
                    blocks[at].get("type") == "tool_result"
                ):
                    at += 1
                blocks.insert(at, memory_block)
                messages[index] = {**messages[index], "content": blocks}
            else:
                messages.append({"role": "user", "content": [memory_block]})
            out["messages"] = messages
        if extraction:
            system = body.get("system")
            instruction = {"type": "text", "text": EXTRACTION_INSTRUCTION}
            if isinstance(system, list):
                out["system"] = [instruction, *system]
            elif isinstance(system, str) and system:
                out["system"] = [instruction, {"type": "text", "text": system}]
            else:
                out["system"] = EXTRACTION_INSTRUCTION
        return Injected(out, rendered.aliases, rendered.count)

    def strip_answer(self, answer: Any) -> tuple[Any, Block | None]:
        if not isinstance(answer, Mapping):
            return answer, None
        return strip_message(answer)

    def stream_stripper(self) -> MessagesStreamStripper:
        return MessagesStreamStripper()


MESSAGES = Messages()


def strip_message(message: Mapping[str, Any]) -> tuple[dict[str, Any], Block | None]:
    """A copy of a whole message with the block removed from every text block, and the block
    of the last text block that wrote one."""
    out = copy.deepcopy(dict(message))
    block: Block | None = None
    content = out.get("content")
    for index, part in enumerate(content if isinstance(content, list) else []):
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(
            part.get("text"), str
        ):
            part["text"], body, truncated = split_block(part["text"])
            if body is not None:
                block = Block(index, body, truncated)
    return out, block


class MessagesStreamStripper:
    """Messages stream events (dicts) in, the events the client may see out; an unchanged event
    is the same object, a changed one a new dict (the input is never modified). A text delta
    left empty is dropped."""

    def __init__(self) -> None:
        self._blocks: dict[int, BlockStripper] = {}
        self._found: dict[int, Block] = {}

    @property
    def chosen_block(self) -> Block | None:
        return self._found[max(self._found)] if self._found else None

    @property
    def in_block(self) -> bool:
        return any(s.in_block for s in self._blocks.values())

    def ends_answer(self, event: Any) -> bool:
        return isinstance(event, Mapping) and event.get("type") == "message_stop"

    def feed(self, event: Any) -> list[Any]:
        if not isinstance(event, dict):
            return [event]
        kind = event.get("type")
        index = event.get("index")
        if kind == "content_block_start" and isinstance(index, int):
            block = event.get("content_block")
            if isinstance(block, dict) and block.get("type") == "text":
                stripper = self._blocks[index] = BlockStripper()
                text = block.get("text")
                if isinstance(text, str) and text:
                    visible = stripper.feed(text)
                    if visible != text:
                        return [{**event, "content_block": {**block, "text": visible}}]
            return [event]
        if kind == "content_block_delta" and index in self._blocks:
            delta = event.get("delta")
            stripper = self._blocks[index]
            if (not isinstance(delta, dict) or delta.get("type") != "text_delta"
                    or not isinstance(delta.get("text"), str) or stripper.finished):
                return [event]
            visible = stripper.feed(delta["text"])
            if visible == delta["text"]:
                return [event]
            return [{**event, "delta": {**delta, "text": visible}}] if visible else []
        if kind == "content_block_stop" and index in self._blocks:
            rest = self._close(index, cut_off=False)
            return [*self._extra(index, rest), event]
        if kind == "message_stop":
            return [*self.finish(), event]
        return [event]

    def finish(self) -> list[Any]:
        out = []
        for index, stripper in sorted(self._blocks.items()):
            if not stripper.finished:
                out.extend(self._extra(index, self._close(index, cut_off=True)))
        return out

    def _close(self, index: int, *, cut_off: bool) -> str:
        stripper = self._blocks[index]
        if stripper.finished:
            return ""
        rest = stripper.finish(cut_off=cut_off)
        if stripper.block is not None:
            self._found[index] = Block(index, stripper.block, stripper.truncated)
        return rest

    @staticmethod
    def _extra(index: int, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        return [{"type": "content_block_delta", "index": index,
                 "delta": {"type": "text_delta", "text": text}}]

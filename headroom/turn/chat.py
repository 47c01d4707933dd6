"""The chat completions wire format (`POST /v1/chat/completions`) as a turn sees it, over plain
dicts: where the conversation is, when extraction must stay off, where the injected messages go,
and how the block leaves a completion or a stream of `chat.completion.chunk` dicts.

Streaming (`ChunkRewriter`) and non-streaming (`strip_completion`) run the same per-choice
`BlockStripper`, so for every chunking of an answer the client sees the same visible text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..memory.models import Memory
from .format import Injected
from .inject import inject, query_text
from .stripper import Block, BlockStripper, pick_block, split_block

__all__ = ["CHAT_COMPLETIONS", "ChatCompletions", "ChunkRewriter", "is_cut_off", "strip_completion"]

_JSON_FORMATS = frozenset({"json_object", "json_schema"})

# finish_reasons after which the answer is complete; anything else (length, content_filter, a
# stream that ended without one, vendor extensions) may have cut a block in the middle.
_COMPLETE_REASONS = frozenset({"stop", "tool_calls", "function_call"})


def is_cut_off(finish_reason: object) -> bool:
    return finish_reason not in _COMPLETE_REASONS


class ChatCompletions:
    """The `WireFormat` of chat completions."""

    name = "chat.completions"

    def user(self, body: Mapping[str, Any]) -> Any:
        return body.get("user")

    def has_conversation(self, body: Mapping[str, Any]) -> bool:
        return isinstance(body.get("messages"), list)

    def streams(self, body: Mapping[str, Any]) -> bool:
        return body.get("stream") is True

    def query_text(self, body: Mapping[str, Any]) -> str:
        return query_text(body["messages"])

    def extraction_blockers(self, body: Mapping[str, Any]) -> list[str]:
        notes = []
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") in _JSON_FORMATS:
            # A <memory> block would break the JSON the client asked for.
            notes.append("extraction off: response_format asks for JSON")
        if body.get("logprobs") or body.get("top_logprobs"):
            # Token logprobs would carry the block's tokens past the stripper to the client.
            notes.append("extraction off: logprobs requested")
        return notes

    def inject(
        self, body: Mapping[str, Any], memories: Sequence[Memory], *, extraction: bool,
        budget_tokens: int,
    ) -> Injected:
        injection = inject(
            body["messages"], memories, extraction=extraction, budget_tokens=budget_tokens
        )
        return Injected({**body, "messages": injection.messages}, injection.aliases,
                        injection.injected)

    def strip_answer(self, answer: Any) -> tuple[Any, Block | None]:
        if not isinstance(answer, Mapping):
            return answer, None
        clean, blocks = strip_completion(answer)
        return clean, pick_block(blocks)

    def stream_stripper(self) -> ChunkRewriter:
        return ChunkRewriter()


CHAT_COMPLETIONS = ChatCompletions()


def strip_completion(completion: Mapping[str, Any]) -> tuple[dict[str, Any], dict[int, Block]]:
    """The non-streaming path: a copy of a chat.completion with every choice's block removed,
    and the blocks by choice index. Non-string content (None with tool calls) is left alone.

    Only what changes is copied (the top level, `choices`, each choice and its message): the
    rest is shared with the input, which is never modified. A deep copy of the whole answer
    was most of the proxy's own work on a long one."""
    out = dict(completion)
    blocks: dict[int, Block] = {}
    choices = out.get("choices")
    if not isinstance(choices, list):
        return out, blocks
    out["choices"] = choices = list(choices)
    for position, choice in enumerate(choices):
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            continue
        index = choice.get("index", position)
        content, body, truncated = split_block(
            message["content"], cut_off=is_cut_off(choice.get("finish_reason"))
        )
        choices[position] = {**choice, "message": {**message, "content": content}}
        if body is not None and isinstance(index, int):
            blocks[index] = Block(index, body, truncated)
    return out, blocks


# Top-level chunk keys that carry nothing of their own. OpenAI's "obfuscation" is random padding
# against length side channels, so a chunk with only that left has nothing to deliver.
_ENVELOPE = frozenset({"id", "object", "created", "model", "system_fingerprint", "service_tier"})
_NOTHING_ELSE = _ENVELOPE | {"choices", "usage", "obfuscation"}


def _carries_nothing(chunk: Mapping[str, Any]) -> bool:
    """True when a rewritten chunk has no content left and nothing else worth delivering."""
    if any(v is not None for k, v in chunk.items() if k not in _NOTHING_ELSE):
        return False
    if chunk.get("usage") is not None:
        return False
    for choice in chunk["choices"]:
        if not isinstance(choice, dict):
            return False
        if any(v is not None for k, v in choice.items() if k not in ("index", "delta")):
            return False  # finish_reason, logprobs, unknown fields
        delta = choice.get("delta")
        if not isinstance(delta, dict) or delta.get("content") not in ("", None):
            return False
        if any(v is not None for k, v in delta.items() if k != "content"):
            return False  # role, tool_calls, refusal, unknown fields
    return True


class ChunkRewriter:
    """Chunk dicts in, chunk dicts out: each choice's `delta.content` runs through its own
    `BlockStripper`.

    - A chunk nobody changed is returned as the very same object (so a caller holding its wire
      bytes may forward them untouched); a changed one is a new dict keeping every other field.
      The input is never modified.
    - A rewritten chunk whose content became "" is dropped when it carries nothing else (see
      `_carries_nothing`); one with a role, tool_calls, finish_reason, logprobs, usage or an
      unknown field is kept with `"content": ""`.
    - When a choice finishes, its held text goes out before the finish: inside the finish chunk's
      own content when that chunk has a content string, else as an extra chunk (same envelope,
      usage null) just before it.
    - `finish()` (at `[DONE]` or the stream's end) flushes choices that never finished, as cut
      off; afterwards every chunk passes unchanged, as does content for a choice after its
      finish_reason.
    """

    def __init__(self) -> None:
        self._strippers: dict[int, BlockStripper] = {}
        self._envelope: dict[str, Any] = {"object": "chat.completion.chunk"}
        self.finished = False
        self.blocks: dict[int, Block] = {}

    @property
    def chosen_block(self) -> Block | None:
        return pick_block(self.blocks)

    @property
    def in_block(self) -> bool:
        """True while some choice is in the middle of writing what may be its memory block."""
        return any(s.in_block for s in self._strippers.values())

    def feed(self, chunk: Any) -> list[Any]:
        if self.finished or not isinstance(chunk, dict):
            return [chunk]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return [chunk]
        self._envelope = {k: v for k, v in chunk.items() if k in _ENVELOPE}
        before: list[dict[str, Any]] = []
        rewritten: list[Any] | None = None
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            content = self._rewrite_choice(choice, before)
            if content is not None:
                if rewritten is None:
                    rewritten = list(choices)
                rewritten[position] = {**choice, "delta": {**choice["delta"], "content": content}}
        out: list[Any] = [self._extra(before, like=chunk)] if before else []
        if rewritten is None:
            out.append(chunk)
        else:
            changed = {**chunk, "choices": rewritten}
            if not _carries_nothing(changed):
                out.append(changed)
        return out

    def finish(self) -> list[dict[str, Any]]:
        """Flush every choice that has not finished (a stream that ended early is cut off)."""
        if self.finished:
            return []
        self.finished = True
        out = []
        for index, stripper in sorted(self._strippers.items()):
            if not stripper.finished:
                rest = stripper.finish(cut_off=True)
                self._record(index, stripper)
                if rest:
                    choice = {"index": index, "delta": {"content": rest}, "finish_reason": None}
                    out.append(self._extra([choice], like=self._envelope))
        return out

    def ends_answer(self, event: Any) -> bool:
        return False  # a chat stream ends with `[DONE]`

    def _rewrite_choice(self, choice: dict[str, Any], before: list[dict[str, Any]]) -> str | None:
        """The choice's new content when it differs from what came, else None."""
        index = choice.get("index", 0)
        if not isinstance(index, int):
            return None
        stripper = self._strippers.setdefault(index, BlockStripper())
        if stripper.finished:
            return None
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        out = stripper.feed(content) if isinstance(content, str) else ""
        reason = choice.get("finish_reason")
        if reason is not None:
            rest = stripper.finish(cut_off=is_cut_off(reason))
            self._record(index, stripper)
            if isinstance(content, str):
                out += rest
            elif rest:
                extra: dict[str, Any] = {"index": index, "delta": {"content": rest}}
                if "logprobs" in choice:
                    extra["logprobs"] = None
                extra["finish_reason"] = None
                before.append(extra)
        return out if isinstance(content, str) and out != content else None

    def _record(self, index: int, stripper: BlockStripper) -> None:
        if stripper.block is not None:
            self.blocks[index] = Block(index, stripper.block, stripper.truncated)

    @staticmethod
    def _extra(choices: list[dict[str, Any]], *, like: Mapping[str, Any]) -> dict[str, Any]:
        chunk = {k: v for k, v in like.items() if k in _ENVELOPE}
        chunk["choices"] = choices
        if "usage" in like:
            chunk["usage"] = None
        return chunk

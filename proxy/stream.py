"""The I/O-free SSE event reader and the per-choice `<memory>` stripper (feed/finish).

Three layers, each usable alone:

- `SSEDecoder` (in `proxy/sse.py`, re-exported here): bytes in, complete `SSEEvent`s out.
- `BlockStripper`: one per choice. Text deltas in, the text the client may see now out; the
  trailing `<memory>` block is held back and never emitted. `split_block` in `proxy/block.py` and
  `strip_completion` below run the same machine, so streaming and non-streaming cannot disagree.
- `ChunkRewriter` routes `chat.completion.chunk` events through one stripper per choice;
  `StreamStripper` glues decoder and rewriter into bytes in, bytes out.

What counts as the block (the stripper's rules, in one place):
- A candidate starts at `<memory>`. Its first visible character (after an optional ``` fence
  line) decides how it reads: `{` or `[` make it JSON, anything else makes it prose.
- It ends at the first `</memory>` after it, except that in JSON the tags inside strings do not
  count, so a memory whose text mentions the tag cannot end the block early and leak its tail.
- It is the block only if nothing but whitespace follows; otherwise the held text is released as
  ordinary answer text. Another `<memory>` (outside JSON strings) starts a new candidate and
  releases the old one, so the LAST opening tag that begins a message-ending block wins.
- An unclosed candidate at the end of the message is stripped as a truncated block when the
  answer was cut off (`cut_off=True`: finish_reason "length", or no finish at all) or when it is
  not prose (JSON, a fence, or empty); an unclosed `<memory>` in prose that ended normally stays
  in the answer. With `cut_off`, a dangling partial tag (`<mem`) is stripped too.
- Whitespace right before the block is not part of the visible text.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .sse import SSEDecoder, SSEEvent

__all__ = [
    "CLOSE_TAG",
    "OPEN_TAG",
    "Block",
    "BlockStripper",
    "ChunkRewriter",
    "SSEDecoder",
    "SSEEvent",
    "StreamStripper",
    "is_cut_off",
    "pick_block",
    "strip_completion",
]

OPEN_TAG = "<memory>"
CLOSE_TAG = "</memory>"

# finish_reasons after which the answer is complete; anything else (length, content_filter, a
# stream that ended without one, vendor extensions) may have cut a block in the middle.
_COMPLETE_REASONS = frozenset({"stop", "tool_calls", "function_call"})


def is_cut_off(finish_reason: object) -> bool:
    return finish_reason not in _COMPLETE_REASONS


# --- the per-choice stripper ---------------------------------------------------------------------

_OUTSIDE, _INSIDE, _AFTER = "outside", "inside", "after"
_UNDECIDED, _JSON, _PROSE = "undecided", "json", "prose"
_NO_FENCE, _FENCE_LINE, _AFTER_FENCE = 0, 1, 2


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of OPEN_TAG."""
    for n in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1):
        if text.endswith(OPEN_TAG[:n]):
            return n
    return 0


def _split_trailing_space(text: str) -> tuple[str, str]:
    kept = text.rstrip()
    return kept, text[len(kept) :]


class BlockStripper:
    """Text deltas of one choice in; visible text out. See the module docstring for the rules.

    For any text and any split of it into deltas, `"".join(feed(d) for d in deltas) + finish()`
    is the same string, and `block`/`truncated` are the same.
    """

    def __init__(self) -> None:
        self.block: str | None = None
        self.truncated = False
        self.finished = False
        self._state = _OUTSIDE
        self._pending = ""  # OUTSIDE: trailing whitespace and a possible start of OPEN_TAG
        self._lead = ""  # whitespace before the candidate's opening tag
        self._body: list[str] = []  # after the opening tag (closing tag included once seen)
        self._trail = ""  # AFTER: whitespace after the closing tag
        self._new_candidate()

    def _new_candidate(self) -> None:
        # How the body reads is decided by its first visible character: "{" or "[" (a ``` fence
        # line may come first) makes it JSON, whose strings may hold tags; anything else is
        # prose, where the first closing tag ends it and any opening tag starts over.
        self._mode, self._fence = _UNDECIDED, _NO_FENCE
        self._in_str = self._escaped = False

    def feed(self, text: str) -> str:
        if self.finished:
            raise RuntimeError("BlockStripper.feed() after finish()")
        out: list[str] = []
        while text:
            if self._state == _OUTSIDE:
                emitted, text = self._outside(text)
            elif self._state == _INSIDE:
                emitted, text = self._inside(text)
            else:
                emitted, text = self._after(text)
            out.append(emitted)
        return "".join(out)

    def finish(self, *, cut_off: bool = False) -> str:
        """The rest of the visible text. `cut_off`: the answer did not end normally."""
        if self.finished:
            return ""
        self.finished = True
        out = ""
        if self._state == _OUTSIDE:
            if cut_off and _partial_tag(self._pending):
                self.block, self.truncated = "", True
            else:
                out = self._pending
        elif self._state == _INSIDE:
            body = "".join(self._body)
            if cut_off or self._mode != _PROSE:
                self.block, self.truncated = body, True
            else:
                out = self._lead + OPEN_TAG + body
        else:
            self.block = "".join(self._body)[: -len(CLOSE_TAG)]
        self._pending, self._body = "", []
        return out

    def _outside(self, text: str) -> tuple[str, str]:
        buf = self._pending + text
        at = buf.find(OPEN_TAG)
        if at >= 0:
            emitted, self._lead = _split_trailing_space(buf[:at])
            self._pending, self._body, self._state = "", [], _INSIDE
            self._new_candidate()
            return emitted, buf[at + len(OPEN_TAG) :]
        partial = _partial_tag(buf)
        emitted, space = _split_trailing_space(buf[: len(buf) - partial])
        self._pending = space + buf[len(buf) - partial :]
        return emitted, ""

    def _inside(self, text: str) -> tuple[str, str]:
        body = self._body
        for i, ch in enumerate(text):
            body.append(ch)
            if self._in_str:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_str = False
                continue
            if self._mode == _UNDECIDED:
                self._decide(ch)  # never on ">", so the tag check below cannot be skipped
            elif self._mode == _JSON and ch == '"':
                self._in_str = True
                continue
            if ch == ">":
                tail = "".join(body[-len(CLOSE_TAG) :])
                if tail == CLOSE_TAG:
                    self._state, self._trail = _AFTER, ""
                    return "", text[i + 1 :]
                if tail.endswith(OPEN_TAG):
                    # A new opening tag outside any string: the old candidate was answer text.
                    released = self._lead + OPEN_TAG + "".join(body[: -len(OPEN_TAG)])
                    emitted, self._lead = _split_trailing_space(released)
                    self._body = []
                    self._new_candidate()
                    return emitted, text[i + 1 :]
        return "", ""

    def _decide(self, ch: str) -> None:
        if ch in "{[":
            self._mode = _JSON
        elif ch == "\n" and self._fence == _FENCE_LINE:
            self._fence = _AFTER_FENCE
        elif ch.isspace():
            pass
        elif self._fence == _AFTER_FENCE or not (ch == "`" or (ch.isalnum() and self._fence)):
            self._mode = _PROSE
        else:
            self._fence = _FENCE_LINE  # backticks, then a language name like "json"

    def _after(self, text: str) -> tuple[str, str]:
        for i, ch in enumerate(text):
            if not ch.isspace():
                # Text after the closing tag: the candidate was part of the answer.
                emitted = self._lead + OPEN_TAG + "".join(self._body)
                self._pending, self._body, self._state = self._trail, [], _OUTSIDE
                return emitted, text[i:]
            self._trail += ch
        return "", ""


# --- chunk rewriting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    choice: int
    body: str
    truncated: bool


def pick_block(blocks: Mapping[int, Block]) -> Block | None:
    """The block to store: choice 0's, else the lowest-numbered choice that wrote one."""
    return blocks[min(blocks)] if blocks else None


# Top-level chunk keys that carry nothing of their own. OpenAI's "obfuscation" is random padding
# against length side channels, so a chunk with only that left has nothing to deliver.
_ENVELOPE = frozenset({"id", "object", "created", "model", "system_fingerprint", "service_tier"})
_NOTHING_ELSE = _ENVELOPE | {"choices", "usage", "obfuscation"}


def _carries_nothing(chunk: dict[str, Any]) -> bool:
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


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class ChunkRewriter:
    """Routes each choice's `delta.content` through its own `BlockStripper`.

    - An event nobody changed is returned as the same object (its raw bytes untouched); only
      chunks whose content changed are re-serialized, keeping every other field.
    - A rewritten chunk whose content became "" is dropped when it carries nothing else (see
      `_carries_nothing`); one with a role, tool_calls, finish_reason, logprobs, usage or an
      unknown field is forwarded with `"content": ""`.
    - When a choice finishes, its held text goes out before the finish: inside the finish chunk's
      own content when that chunk has a content string, else as an extra chunk (same envelope,
      usage null) just before it.
    - On `[DONE]` and on `finish()`, choices that never finished are flushed as cut off.
    - Content arriving for a choice after its finish_reason is forwarded unchanged.
    """

    def __init__(self) -> None:
        self._strippers: dict[int, BlockStripper] = {}
        self._envelope: dict[str, Any] = {"object": "chat.completion.chunk"}
        self._done = False
        self.blocks: dict[int, Block] = {}

    @property
    def chosen_block(self) -> Block | None:
        return pick_block(self.blocks)

    def feed(self, event: SSEEvent) -> list[SSEEvent]:
        data = event.data
        if self._done or data is None:
            return [event]
        if data.strip() == "[DONE]":
            return [*self.finish(), event]
        try:
            chunk = json.loads(data)
        except ValueError:
            return [event]
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            return [event]
        self._envelope = {k: v for k, v in chunk.items() if k in _ENVELOPE}
        changed = False
        before: list[dict[str, Any]] = []
        for choice in chunk["choices"]:
            if isinstance(choice, dict):
                changed |= self._rewrite_choice(choice, chunk, before)
        out = [self._extra(before, like=chunk)] if before else []
        if not changed:
            out.append(event)
        elif not _carries_nothing(chunk):
            out.append(event.with_data(_dumps(chunk)))
        return out

    def finish(self) -> list[SSEEvent]:
        """Flush every choice that has not finished (a stream that ended early is cut off)."""
        if self._done:
            return []
        self._done = True
        out = []
        for index, stripper in sorted(self._strippers.items()):
            if not stripper.finished:
                rest = stripper.finish(cut_off=True)
                self._record(index, stripper)
                if rest:
                    choice = {"index": index, "delta": {"content": rest}, "finish_reason": None}
                    out.append(self._extra([choice], like=self._envelope))
        return out

    def _rewrite_choice(
        self, choice: dict[str, Any], chunk: dict[str, Any], before: list[dict[str, Any]]
    ) -> bool:
        index = choice.get("index", 0)
        if not isinstance(index, int):
            return False
        stripper = self._strippers.setdefault(index, BlockStripper())
        if stripper.finished:
            return False
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
        if isinstance(content, str) and out != content:
            assert isinstance(delta, dict)
            delta["content"] = out
            return True
        return False

    def _record(self, index: int, stripper: BlockStripper) -> None:
        if stripper.block is not None:
            self.blocks[index] = Block(index, stripper.block, stripper.truncated)

    @staticmethod
    def _extra(choices: list[dict[str, Any]], *, like: dict[str, Any]) -> SSEEvent:
        chunk = {k: v for k, v in like.items() if k in _ENVELOPE}
        chunk["choices"] = choices
        if "usage" in like:
            chunk["usage"] = None
        return SSEEvent.from_data(_dumps(chunk))


class StreamStripper:
    """Upstream SSE bytes in, client bytes out: `SSEDecoder` + `ChunkRewriter`."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self.rewriter = ChunkRewriter()

    def feed(self, chunk: bytes) -> bytes:
        return self._emit(self._decoder.feed(chunk))

    def finish(self) -> bytes:
        return self._emit(self._decoder.flush()) + self._join(self.rewriter.finish())

    @property
    def chosen_block(self) -> Block | None:
        return self.rewriter.chosen_block

    def _emit(self, events: list[SSEEvent]) -> bytes:
        return b"".join(self._join(self.rewriter.feed(e)) for e in events)

    @staticmethod
    def _join(events: list[SSEEvent]) -> bytes:
        return b"".join(e.raw for e in events)


def strip_completion(completion: Mapping[str, Any]) -> tuple[dict[str, Any], dict[int, Block]]:
    """The non-streaming path: a copy of a chat.completion with every choice's block removed,
    and the blocks by choice index. Non-string content (None with tool calls) is left alone."""
    out = copy.deepcopy(dict(completion))
    blocks: dict[int, Block] = {}
    choices = out.get("choices")
    for position, choice in enumerate(choices if isinstance(choices, list) else []):
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            continue
        index = choice.get("index", position)
        stripper = BlockStripper()
        visible = stripper.feed(message["content"])
        visible += stripper.finish(cut_off=is_cut_off(choice.get("finish_reason")))
        message["content"] = visible
        if stripper.block is not None and isinstance(index, int):
            blocks[index] = Block(index, stripper.block, stripper.truncated)
    return out, blocks

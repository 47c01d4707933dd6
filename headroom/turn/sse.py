"""The I/O-free server-sent-events reader: bytes in, complete events out. Each event keeps its
exact raw bytes, so an event nobody changes is forwarded byte for byte."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent"]

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class SSEEvent:
    """One event: its exact bytes (blank line included) and its decoded lines (no terminators)."""

    raw: bytes
    lines: tuple[str, ...]

    @property
    def data(self) -> str | None:
        """The data lines joined with newlines, or None for comments and data-less events."""
        parts = [value for name, value in map(_field, self.lines) if name == "data"]
        return "\n".join(parts) if parts else None

    @classmethod
    def from_data(cls, data: str) -> SSEEvent:
        lines = tuple(f"data: {part}" for part in data.split("\n"))
        return cls(_encode(lines), lines)

    def with_data(self, data: str) -> SSEEvent:
        """The same event (comments, event:, id: lines kept in place) carrying new data."""
        out: list[str] = []
        placed = False
        for line in self.lines:
            if _field(line)[0] != "data":
                out.append(line)
            elif not placed:
                out.extend(f"data: {part}" for part in data.split("\n"))
                placed = True
        if not placed:
            out.extend(f"data: {part}" for part in data.split("\n"))
        return SSEEvent(_encode(tuple(out)), tuple(out))


def _field(line: str) -> tuple[str, str]:
    if line.startswith(":"):
        return "", line
    name, _, value = line.partition(":")
    return name, value[1:] if value.startswith(" ") else value


def _encode(lines: tuple[str, ...]) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode() + b"\n"


class SSEDecoder:
    """Bytes in any chunking -> complete events. Lines are split on bytes before decoding (CR and
    LF never occur inside a UTF-8 sequence), so a character split across chunks is harmless."""

    def __init__(self) -> None:
        self._buf = b""
        self._raw: list[bytes] = []
        self._lines: list[str] = []
        self._first = True

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        events: list[SSEEvent] = []
        pos = 0
        while (m := _LINE_END.search(self._buf, pos)) is not None:
            # A CR as the last byte may be the first half of CRLF: wait for the next byte.
            if m.group() == b"\r" and m.end() == len(self._buf):
                break
            line = self._buf[pos : m.start()]
            self._raw.append(self._buf[pos : m.end()])
            pos = m.end()
            if line:
                self._lines.append(self._decode(line))
            else:
                events.append(self._take())
        self._buf = self._buf[pos:]
        return events

    def flush(self) -> list[SSEEvent]:
        """The unterminated rest, as one event (an upstream may omit the final blank line)."""
        if self._buf:
            line = self._buf.rstrip(b"\r")
            self._raw.append(self._buf)
            if line:
                self._lines.append(self._decode(line))
            self._buf = b""
        return [self._take()] if self._raw else []

    def _decode(self, line: bytes) -> str:
        text = line.decode("utf-8", errors="replace")
        if self._first:
            self._first = False
            text = text.removeprefix("\ufeff")
        return text

    def _take(self) -> SSEEvent:
        event = SSEEvent(b"".join(self._raw), tuple(self._lines))
        self._raw, self._lines = [], []
        return event

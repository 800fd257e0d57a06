"""Observe an SSE stream on its way through without rewriting it.

Bytes are passed on up to the last complete event boundary, unchanged. Only the events the API's
:class:`.endpoints.StreamReader` marks are parsed (those that carry usage or a response id, to bill
them once validated); the usage-only chunk of chat (``"choices": []``) is dropped when the proxy asked for
usage on the client's behalf. Everything else is never decoded, so tool-call argument deltas and vendor
fields reach the client exactly as the backend sent them.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from .endpoints import CHAT_STREAM, StreamReader

MAX_PENDING = 4 * 1024 * 1024  # a single event larger than this is not SSE we can relay
_EVENT = re.compile(rb"(.*?)(\r\n\r\n|\n\n)", re.DOTALL)


class StreamTooLarge(Exception):
    """An event without a boundary grew past MAX_PENDING."""


def _last_boundary(buf: bytes | bytearray) -> int:
    """Index just past the last complete event in ``buf``, or -1."""
    lf = buf.rfind(b"\n\n")
    crlf = buf.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1)


def _event_json(event: bytes) -> Any:
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        return orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None


class SseScanner:
    """Feed upstream chunks; get back the bytes to send on, with usage noted on the side."""

    def __init__(self, *, drop_usage_chunk: bool, reader: StreamReader = CHAT_STREAM) -> None:
        self.drop_usage_chunk = drop_usage_chunk
        self.reader = reader
        self.usage: Any = None  # the usage the reader found, whatever its type: validated when billed
        self.response_id: str | None = None
        self.events = 0
        self.done = False
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        if not self._pending and chunk.endswith(b"\n\n"):
            return self._observe(chunk)  # the usual case, whole events per read: no copies
        self._pending += chunk
        end = _last_boundary(self._pending)
        if end < 0:
            if len(self._pending) > MAX_PENDING:
                raise StreamTooLarge(f"SSE event larger than {MAX_PENDING} bytes")
            return b""
        ready = bytes(self._pending[:end])
        del self._pending[:end]
        return self._observe(ready)

    def finish(self) -> bytes:
        """Whatever trails the last boundary (a backend that ends without a blank line): sent as is."""
        rest, self._pending = bytes(self._pending), bytearray()
        self.events += rest.count(b"data:")
        if self.reader.marker.search(rest):
            self._take(rest)
        return rest

    def _observe(self, ready: bytes) -> bytes:
        """``ready`` ends on an event boundary; pass it on, minus a usage-only chunk we asked for."""
        self.events += ready.count(b"data:")
        done = self.reader.done_marker
        if done is not None and done in ready:
            self.done = True
        marker = self.reader.marker
        if not marker.search(ready):
            return ready
        kept = [event for event in (m.group(0) for m in _EVENT.finditer(ready))
                if not (marker.search(event) and self._take(event))]
        return b"".join(kept)

    def _take(self, event: bytes) -> bool:
        """Let the reader see ``event``; True if the event must be dropped."""
        data = _event_json(event)
        return isinstance(data, dict) and self.reader.take(data, self)

"""A fake OpenAI upstream fast enough to never be the bottleneck of a Python proxy.

A raw asyncio Protocol on uvloop, no framework. It owns one invariant: every response is
deterministic (fixed ids, fixed timestamps, fixed token counts), so the bytes a proxy relays can be
compared with the bytes a client gets straight from here.

HTTP/1.1 keep-alive with pipelining and partial reads: requests are parsed from a per-connection
buffer and answered strictly in order; while a stream is being sent, later pipelined requests wait.
Request bodies may use Content-Length or chunked transfer encoding.

    POST /v1/chat/completions            fixed chat.completion JSON (usage 20 + 10 tokens)
    POST /v1/chat/completions "stream"   text/event-stream, chunked: 50 content chunks 5 ms apart,
                                         a usage chunk if stream_options.include_usage, then [DONE]
    GET  /v1/models                      a one-model list

Run it as its own process so its CPU is not the proxy's:  python bench/upstream.py --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
from typing import cast

CREATED = 1700000000
MODEL = "gpt-4o"
STREAM_CHUNKS = 50
CHUNK_INTERVAL = 0.005
USAGE = {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}
STREAM_USAGE = {"prompt_tokens": 20, "completion_tokens": STREAM_CHUNKS, "total_tokens": 20 + STREAM_CHUNKS}

IS_STREAM = re.compile(rb'"stream"\s*:\s*true')
WANTS_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
MAX_HEAD = 64 * 1024


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk carrying ``payload``."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(obj: object) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _completion_body() -> bytes:
    return _dumps({
        "id": "chatcmpl-bench-0001",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! This is a fixed benchmark answer."},
            "logprobs": None,
            "finish_reason": "stop",
        }],
        "usage": USAGE,
    })


def _stream_events(with_usage: bool) -> list[bytes]:
    """The SSE events of one stream, each already framed as an HTTP chunk; the last one ends the body."""
    events = []
    for i in range(STREAM_CHUNKS):
        event: dict[str, object] = {
            "id": "chatcmpl-bench-0002",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
        }
        if with_usage:
            event["usage"] = None
        events.append(_chunk(_sse(event)))
    tail = b""
    if with_usage:
        tail += _chunk(_sse({
            "id": "chatcmpl-bench-0002",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "choices": [],
            "usage": STREAM_USAGE,
        }))
    tail += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    events[-1] += tail
    return events


COMPLETION = _response("200 OK", "application/json", _completion_body())
MODELS = _response("200 OK", "application/json", _dumps({
    "object": "list",
    "data": [{"id": MODEL, "object": "model", "created": CREATED, "owned_by": "bench"}],
}))
NOT_FOUND = _response("404 Not Found", "application/json", _dumps({
    "error": {"message": "not found", "type": "invalid_request_error", "param": None, "code": None},
}))
BAD_REQUEST = _response("400 Bad Request", "text/plain", b"bad request")
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
STREAM_EVENTS = {True: _stream_events(True), False: _stream_events(False)}


def _decode_chunked(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """Decode a chunked body at ``buf[start:]``; return (body, end offset) or None while incomplete."""
    body = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)  # no trailers expected: the empty line ends the body
            return (bytes(body), end + 4) if end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos:pos + size]
        pos += size + 2


def _content_length(head: bytes) -> int | None:
    """The Content-Length of a lower-cased request head (0 when absent, None when malformed)."""
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    eol = head.find(b"\r\n", at + 2)
    try:
        return int(head[at + 17:eol if eol > 0 else len(head)])
    except ValueError:
        return None


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive connection: parse requests from the buffer, answer them in order."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming: asyncio.TimerHandle | None = None
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()
            self.streaming = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._serve_buffered()

    def _serve_buffered(self) -> None:
        while self.streaming is None and self.transport is not None:
            request = self._next_request()
            if request is None:
                return
            self._answer(*request)

    def _next_request(self) -> tuple[bytes, bytes, bytes] | None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._fail()
            return None
        head = bytes(self.buf[:end]).lower()
        try:
            method, path, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
        except ValueError:
            self._fail()
            return None
        self.close_after = b"\r\nconnection: close" in head
        if b"\r\ntransfer-encoding: chunked" in head:
            try:
                decoded = _decode_chunked(self.buf, end + 4)
            except ValueError:
                self._fail()
                return None
            if decoded is None:
                return None
            body, total = decoded
        else:
            length = _content_length(head)
            if length is None:
                self._fail()
                return None
            total = end + 4 + length
            if len(self.buf) < total:
                return None
            body = bytes(self.buf[end + 4:total])
        del self.buf[:total]
        return method, path.split(b"?", 1)[0], body

    def _answer(self, method: bytes, path: bytes, body: bytes) -> None:
        assert self.transport is not None
        if method == b"post" and path == b"/v1/chat/completions":
            if IS_STREAM.search(body):
                self._start_stream(WANTS_USAGE.search(body) is not None)
                return
            self.transport.write(COMPLETION)
        elif method == b"get" and path == b"/v1/models":
            self.transport.write(MODELS)
        else:
            self.transport.write(NOT_FOUND)
        if self.close_after:
            self.transport.close()

    def _start_stream(self, with_usage: bool) -> None:
        assert self.transport is not None
        events = STREAM_EVENTS[with_usage]
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.transport.write(STREAM_HEAD + events[0])

        def send(i: int) -> None:
            if self.transport is None:
                return
            self.transport.write(events[i])
            if i + 1 < len(events):
                # scheduled against the stream's start, so a late tick does not shift the rest
                self.streaming = loop.call_at(start + (i + 1) * CHUNK_INTERVAL, send, i + 1)
                return
            self.streaming = None
            if self.close_after:
                self.transport.close()
                return
            self._serve_buffered()

        self.streaming = loop.call_at(start + CHUNK_INTERVAL, send, 1)

    def _fail(self) -> None:
        assert self.transport is not None
        self.transport.write(BAD_REQUEST)
        self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # still correct on the stdlib loop, only slower
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()

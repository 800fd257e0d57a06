"""Load generator for streams: N keep-alive connections, each running streams back to back.

A raw asyncio Protocol on uvloop (an aiohttp client would spend more CPU than the proxy under test at
256 streams). For every stream it records the time to the first content chunk (from writing the request
to the first byte of the first ``"content"`` event), the total time to the end of the body, and the
SHA-256 of the de-chunked body (the SSE payload), so a proxied stream can be compared with a direct one
whatever chunk framing the proxy chose.

Prints one JSON object on stdout. Run by bench/run.py in its own process:

    python bench/stream_client.py --port 9100 --concurrency 16 --streams 12 [--key KEY] [--include-usage]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

CONTENT = b'"content"'


class StreamError(Exception):
    """A stream that did not end with a complete 200 response."""


@dataclass
class Outcome:
    ttfb: float
    total: float
    digest: str
    payload: bytes


def decode_chunked(body: bytes | bytearray) -> bytes | None:
    """The payload of a complete chunked body, or None if it is not complete yet."""
    out = bytearray()
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(body[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            return bytes(out) if body[pos:].endswith(b"\r\n") else None
        if len(body) < pos + size + 2:
            return None
        out += body[pos:pos + size]
        pos += size + 2


@dataclass
class Pending:
    started: float
    future: asyncio.Future[Outcome]
    buf: bytearray = field(default_factory=bytearray)
    body_at: int = -1
    status: int = 0
    length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    ttfb: float | None = None


class StreamConnection(asyncio.Protocol):
    """One keep-alive connection carrying one stream at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: Pending | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        pending, self.pending = self.pending, None
        if pending is None or pending.future.done():
            return
        if pending.body_at >= 0 and pending.length is None and not pending.chunked and pending.status == 200:
            self._finish(pending, bytes(pending.buf[pending.body_at:]), time.perf_counter())
            return
        pending.future.set_exception(StreamError(f"connection lost: {exc or 'closed by peer'}"))

    def send(self, request: bytes) -> asyncio.Future[Outcome]:
        if self.transport is None:
            raise StreamError("connection closed")
        future = asyncio.get_running_loop().create_future()
        self.pending = Pending(time.perf_counter(), future)
        self.transport.write(request)
        return future

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        pending = self.pending
        if pending is None:
            return
        scan_from = max(len(pending.buf) - len(CONTENT), 0)
        pending.buf += data
        if pending.body_at < 0 and not self._parse_head(pending):
            return
        if pending.ttfb is None and pending.buf.find(CONTENT, max(scan_from, pending.body_at)) >= 0:
            pending.ttfb = now - pending.started
        body = pending.buf[pending.body_at:]
        if pending.chunked:
            if body.endswith(b"0\r\n\r\n"):
                payload = decode_chunked(body)
                if payload is not None:
                    self._finish(pending, payload, now)
        elif pending.length is not None and len(body) >= pending.length:
            self._finish(pending, bytes(body[:pending.length]), now)

    def _parse_head(self, pending: Pending) -> bool:
        end = pending.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(pending.buf[:end]).lower()
        pending.body_at = end + 4
        pending.status = int(head[9:12])
        pending.chunked = b"\r\ntransfer-encoding: chunked" in head
        pending.keep_alive = b"\r\nconnection: close" not in head and not head.startswith(b"http/1.0")
        at = head.find(b"\r\ncontent-length:")
        if at >= 0 and not pending.chunked:
            eol = head.find(b"\r\n", at + 2)
            pending.length = int(head[at + 17:eol if eol > 0 else len(head)])
        return True

    def _finish(self, pending: Pending, payload: bytes, now: float) -> None:
        self.pending = None
        if pending.status != 200:
            pending.future.set_exception(StreamError(f"status {pending.status}"))
        elif pending.ttfb is None:
            pending.future.set_exception(StreamError("no content event"))
        else:
            digest = hashlib.sha256(payload).hexdigest()
            pending.future.set_result(Outcome(pending.ttfb, now - pending.started, digest, payload))
        if not pending.keep_alive and self.transport is not None:
            self.transport.close()


def build_request(host: str, port: int, path: str, key: str, include_usage: bool) -> bytes:
    body: dict[str, object] = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Count to fifty"}],
        "stream": True,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    raw = json.dumps(body, separators=(",", ":")).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            "Accept: text/event-stream", f"Content-Length: {len(raw)}"]
    if key:
        head.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + raw


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    warmup_ok: int = 0


async def run_connection(args: argparse.Namespace, request: bytes, delay: float, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    connection: StreamConnection | None = None
    await asyncio.sleep(delay)
    for i in range(args.warmup + args.streams):
        try:
            if connection is None or connection.transport is None:
                _, connection = await loop.create_connection(StreamConnection, args.host, args.port)
            outcome = await asyncio.wait_for(connection.send(request), args.timeout)
        except (OSError, StreamError, TimeoutError) as exc:
            if i >= args.warmup:
                tally.errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
            if connection is not None and connection.transport is not None:
                connection.transport.close()
            connection = None
            continue
        if i < args.warmup:
            tally.warmup_ok += 1
        else:
            tally.outcomes.append(outcome)
    if connection is not None and connection.transport is not None:
        connection.transport.close()
        await connection.closed


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``values`` (which need not be sorted)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summarize(tally: Tally, elapsed: float, dump_dir: Path | None) -> dict[str, object]:
    ttfb = [o.ttfb * 1000 for o in tally.outcomes]
    total = [o.total * 1000 for o in tally.outcomes]
    digests = Counter(o.digest for o in tally.outcomes)
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        for outcome in {o.digest: o for o in tally.outcomes}.values():
            (dump_dir / f"{outcome.digest[:16]}.sse").write_bytes(outcome.payload)
    return {
        "ok": len(tally.outcomes),
        "warmup_ok": tally.warmup_ok,
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors.most_common(5)),
        "elapsed_s": round(elapsed, 3),
        "ttfb_ms": {"p50": percentile(ttfb, 50), "p99": percentile(ttfb, 99), "max": max(ttfb, default=0.0)},
        "total_ms": {"p50": percentile(total, 50), "p99": percentile(total, 99), "max": max(total, default=0.0)},
        "digests": dict(digests),
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    request = build_request(args.host, args.port, args.path, args.key, args.include_usage)
    tally = Tally()
    # Connections start spread over --stagger seconds, like independent clients: started together, the
    # streams would stay in lock-step and every TTFB would include queueing behind the whole burst.
    step = args.stagger / args.concurrency
    began = time.perf_counter()
    await asyncio.gather(*(run_connection(args, request, i * step, tally) for i in range(args.concurrency)))
    return summarize(tally, time.perf_counter() - began, args.dump_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--key", default="")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--streams", type=int, default=10, help="measured streams per connection")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured streams per connection first")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--stagger", type=float, default=0.25, help="spread connection starts over this")
    parser.add_argument("--include-usage", action="store_true")
    parser.add_argument("--dump-dir", type=Path, default=None, help="write one payload per distinct digest")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

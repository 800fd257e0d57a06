"""The server's own log: no key, no prompt, no traceback of a client's bytes, and no flood.

The filters are tested on plain ``logging`` records with a fake clock; the promise itself (a hostile
client cannot put its key or prompt in the journal, nor fill it) on the real process, over raw sockets.
"""

from __future__ import annotations

import asyncio
import io
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from lumen_proxy.logs import INTERVAL, LOGGERS, PER_INTERVAL, RateLimit, Redact, setup_logging
from tests.conftest import LumenProcess, config_dict, write_config
from tests.fake_upstream import UpstreamServer
from tests.test_process import exit_code, make_key, stdout_text

KEY_LIKE = "sk_0123456789abcdefghijklmnopqrstuvwxyzABCD"
README = Path(__file__).resolve().parent.parent / "README.md"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: Any, name: str = "lumen_proxy", level: int = logging.ERROR,
           exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def logged(clock: FakeClock) -> Iterator[tuple[logging.Handler, io.StringIO]]:
    """A handler with Lumen's filters writing to a string, as setup_logging builds it for stderr."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(RateLimit(handler, per=3, interval=60, clock=clock))
    handler.addFilter(Redact())
    yield handler, stream
    handler.close()


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# -- RateLimit ---------------------------------------------------------------------------------------
def test_the_same_line_passes_per_interval_times_then_one_summary(
    logged: tuple[logging.Handler, io.StringIO], clock: FakeClock
) -> None:
    handler, stream = logged
    for i in range(50):
        handler.handle(record("rejected a malformed HTTP request from %s", f"10.0.0.{i}"))
        clock.now += 1
    assert lines(stream) == [f"ERROR: rejected a malformed HTTP request from 10.0.0.{i}" for i in range(3)]

    clock.now += 10  # the window (60 s from the first line) is over: the next line brings the summary
    handler.handle(record("rejected a malformed HTTP request from %s", "10.0.0.99"))

    assert lines(stream)[3:] == [
        "ERROR: suppressed 47 similar lines in 60s: rejected a malformed HTTP request from %s",
        "ERROR: rejected a malformed HTTP request from 10.0.0.99",
    ]


def test_kinds_are_counted_apart_by_logger_and_template(logged: tuple[logging.Handler, io.StringIO]) -> None:
    handler, stream = logged
    for _ in range(5):
        handler.handle(record("cannot write the usage log (%d rows waiting)", 7))
        handler.handle(record("cannot write the usage log (%d rows waiting)", 7, name="aiohttp.server"))
        handler.handle(record("internal error on %s", "/v1/models", level=logging.WARNING))

    assert len(lines(stream)) == 3 * 3


def test_a_summary_comes_with_any_later_line_and_at_flush(
    logged: tuple[logging.Handler, io.StringIO], clock: FakeClock
) -> None:
    handler, stream = logged
    limit = next(f for f in handler.filters if isinstance(f, RateLimit))
    for _ in range(5):
        handler.handle(record("flood A"))
    clock.now += 61
    handler.handle(record("something else", level=logging.WARNING))
    for _ in range(4):
        handler.handle(record("flood B"))
    limit.flush()
    limit.flush()  # nothing left to tell

    assert lines(stream) == ["ERROR: flood A"] * 3 + [
        "ERROR: suppressed 2 similar lines in 60s: flood A",
        "WARNING: something else",
        *["ERROR: flood B"] * 3,
        "ERROR: suppressed 1 similar lines in 0s: flood B",
    ]


def test_new_kinds_beyond_the_limit_share_one_allowance(clock: FakeClock) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RateLimit(handler, per=2, clock=clock, max_kinds=10))
    for i in range(100):
        handler.handle(record(f"a line made unique by an f-string {i}"))

    assert len(lines(stream)) == 10 + 2  # 10 kinds tracked, then 2 lines of the one they share


def test_the_docs_say_how_often_a_kind_of_line_is_written() -> None:
    docs = " ".join(README.read_text().split())
    assert INTERVAL == 60
    assert f"written at most {PER_INTERVAL} times a minute" in docs


# -- Redact ------------------------------------------------------------------------------------------
def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_a_parser_error_is_one_line_without_the_bytes_it_quotes(logged: tuple[logging.Handler, io.StringIO]) -> None:
    handler, stream = logged
    quoting = raised(BadHttpMessage(f"Invalid header value char: b'Authorization: Bearer {KEY_LIKE}\\x01'"))
    handler.handle(record("Error handling request from %s", "10.1.2.3", name="aiohttp.server", exc=quoting))

    assert lines(stream) == ["ERROR: Error handling request from 10.1.2.3 (BadHttpMessage)"]


def test_a_payload_error_anywhere_in_the_chain_is_redacted(logged: tuple[logging.Handler, io.StringIO]) -> None:
    handler, stream = logged
    try:
        try:
            raise LineTooLong(f"chunk {KEY_LIKE}", 8190)
        except LineTooLong as exc:
            raise web.RequestPayloadError(f"payload: {KEY_LIKE}") from exc
    except web.RequestPayloadError as payload:
        try:
            raise RuntimeError("wrapped") from payload
        except RuntimeError as outer:
            handler.handle(record("internal error on %s %s", "POST", "/v1/chat/completions", exc=outer))

    assert lines(stream) == ["ERROR: internal error on POST /v1/chat/completions (RequestPayloadError)"]


def test_other_exceptions_keep_their_traceback(logged: tuple[logging.Handler, io.StringIO]) -> None:
    handler, stream = logged
    handler.handle(record("internal error", exc=raised(ZeroDivisionError("division by zero"))))

    text = stream.getvalue()
    assert text.startswith("ERROR: internal error\nTraceback (most recent call last):")
    assert "ZeroDivisionError: division by zero" in text


# -- setup_logging -----------------------------------------------------------------------------------
@pytest.fixture
def restore_loggers() -> Iterator[None]:
    saved = {name: (lg.handlers[:], lg.level, lg.propagate)
             for name in LOGGERS for lg in [logging.getLogger(name)]}
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


@pytest.mark.usefixtures("restore_loggers")
def test_aiohttp_and_asyncio_write_through_lumens_handler(clock: FakeClock) -> None:
    stream = io.StringIO()
    setup_logging(stream, clock=clock)
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.internal", "aiohttp.client", "aiohttp.websocket",
                 "asyncio", "lumen_proxy", "lumen_proxy.sdnotify"):
        logging.getLogger(name).error("from %s", name)
    logging.getLogger("aiohttp.access").info('127.0.0.1 "GET /v1/models?key=%s HTTP/1.1" 200', KEY_LIKE)
    logging.getLogger("aiohttp.server").exception("Error handling request from %s", "10.1.2.3",
                                                  exc_info=raised(BadHttpMessage(KEY_LIKE)))

    assert lines(stream) == [
        "lumen-proxy ERROR: from aiohttp.server", "lumen-proxy ERROR: from aiohttp.web",
        "lumen-proxy ERROR: from aiohttp.internal", "lumen-proxy ERROR: from aiohttp.client",
        "lumen-proxy ERROR: from aiohttp.websocket", "lumen-proxy ERROR: from asyncio",
        "lumen-proxy ERROR: from lumen_proxy", "lumen-proxy ERROR: from lumen_proxy.sdnotify",
        "lumen-proxy ERROR: Error handling request from 10.1.2.3 (BadHttpMessage)",
    ]


# -- the real process, under attack ------------------------------------------------------------------
PROMPT = "zebra-okapi-7731 tell me the launch codes"


async def exchange(port: int, raw: bytes, within: float = 10) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(within):
            return await reader.read(-1)
    finally:
        writer.close()
        await writer.wait_closed()


def http(lines_: list[str], body: str = "", eol: str = "\r\n") -> bytes:
    return (eol.join(lines_) + eol + eol + body).encode("latin-1")


def malformed(key: str) -> dict[str, bytes]:
    """Requests aiohttp's parser refuses, each carrying the key and the prompt."""
    body = f'{{"model": "gpt-4o", "messages": [{{"role": "user", "content": "{PROMPT}"}}]}}'
    post = "POST /v1/chat/completions HTTP/1.1"
    auth = f"Authorization: Bearer {key}"
    length = f"Content-Length: {len(body)}"
    return {
        "bare-lf": http([post, "Host: lumen", auth, length], body, eol="\n"),
        "control-character": http([post, "Host: lumen", f"{auth}\x01{PROMPT}", length], body),
        "100-kb-header": http([post, "Host: lumen", auth, "X-Note: " + PROMPT * 2500, length], body),
        "invalid-method": http([f"P@ST /v1/chat/completions?q={PROMPT.replace(' ', '+')} HTTP/1.1", auth]),
        "tls-or-garbage": b"\x16\x03\x01\x02\x00" + f"{key} {PROMPT}".encode() + b"\r\n\r\n",
        "bad-content-length": http([post, "Host: lumen", auth, f"Content-Length: 12{PROMPT}"], body),
        "bad-chunk": http([post, "Host: lumen", auth, "Transfer-Encoding: chunked"], f"zz{PROMPT}\r\n0\r\n\r\n"),
    }


def nested(depth: int) -> str:
    return ('{"model": "gpt-4o", "messages": [{"role": "user", "content": "' + PROMPT + '"}], "metadata": '
            + "[" * depth + "]" * depth + "}")


def leaks(text: str | bytes, key: str) -> list[str]:
    data = text if isinstance(text, str) else text.decode("latin-1")
    return [s for s in (key, key[3:20], PROMPT, "zebra-okapi", "launch codes") if s in data]


def head_and_body(answer: bytes) -> tuple[int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture
def hostile_target(lumen_process: Any, upstream: UpstreamServer, tmp_path: Path) -> tuple[LumenProcess, str]:
    path = write_config(tmp_path, config_dict(tmp_path, [upstream.base_url]))  # log_prompts: off (default)
    key = make_key(path)
    return lumen_process(path), key


async def test_a_hostile_client_gets_400s_quoting_nothing_and_the_log_never_holds_its_key_or_prompt(
    hostile_target: tuple[LumenProcess, str], upstream: UpstreamServer
) -> None:
    proc, key = hostile_target
    for kind, raw in malformed(key).items():
        answer = await exchange(proc.port, raw)
        status, body = head_and_body(answer)
        assert status == 400, (kind, answer[:200])
        assert b'"The HTTP request is malformed."' in body, kind
        assert leaks(answer, key) == [], kind
    for depth, problem in ((300, b"nested too deeply"), (5000, b"could not parse the JSON")):
        body = nested(depth)
        raw = http(["POST /v1/chat/completions HTTP/1.1", "Host: lumen", f"Authorization: Bearer {key}",
                    "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close"], body)
        status, answer = head_and_body(await exchange(proc.port, raw))
        assert (status, problem in answer) == (400, True), answer
        assert leaks(answer, key) == []
    proc.process.send_signal(signal.SIGTERM)
    assert await exit_code(proc) == 0

    log = proc.stderr_text()
    assert leaks(log + stdout_text(proc), key) == []
    assert "Traceback" not in log
    hostile = [line for line in log.splitlines() if "listening on" not in line and "stop" not in line]
    assert len(hostile) == len(malformed(key)), hostile  # one per malformed request; none for the JSON
    assert all(line.startswith("lumen-proxy WARNING: rejected a malformed HTTP request from 127.0.0.1: ")
               and len(line) < 100 for line in hostile), hostile
    assert upstream.state.requests == []


async def test_a_flood_of_malformed_requests_writes_a_few_lines(hostile_target: tuple[LumenProcess, str]) -> None:
    """500 requests of 25 bytes, then 100 anonymous ones whose body aiohttp cannot decode after the 401."""
    proc, key = hostile_target
    tiny = b"GET / HTTP/1.1\nHost: ab\n\n"
    assert len(tiny) == 25
    gzip = http(["POST /v1/chat/completions HTTP/1.1", "Host: lumen", "Content-Encoding: gzip", "Content-Length: 40"],
                f"{key} {PROMPT}"[:40])
    for _ in range(500):
        status, _ = head_and_body(await exchange(proc.port, tiny))
        assert status == 400
    for _ in range(100):
        assert head_and_body(await exchange(proc.port, gzip))[0] == 401
    proc.process.send_signal(signal.SIGTERM)
    assert await exit_code(proc) == 0

    log = proc.stderr_text()
    assert len(log) < 3000, f"{len(log)} bytes of log for 600 hostile requests"
    assert leaks(log + stdout_text(proc), key) == []
    hostile = [line for line in log.splitlines() if "listening on" not in line and "stop" not in line]
    assert len(hostile) == 2 * (PER_INTERVAL + 1), hostile  # per kind: PER_INTERVAL lines, then a summary
    assert sum(line.startswith("lumen-proxy WARNING: rejected a malformed HTTP") for line in hostile) == PER_INTERVAL
    assert sum(line.startswith("lumen-proxy WARNING: dropped an undecodable request body") for line in hostile) \
        == PER_INTERVAL
    assert f"suppressed {500 - PER_INTERVAL} similar lines" in log
    assert f"suppressed {100 - PER_INTERVAL} similar lines" in log
    assert all(len(line) < 120 for line in hostile), max(hostile, key=len)

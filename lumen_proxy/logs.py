"""The server's own log (stderr): one format for every logger it runs, no request content, no floods.

Lumen's loggers, aiohttp's (``aiohttp.access``, ``.server``, ``.web``, ``.internal``, ``.client``,
``.websocket``: all under ``aiohttp``) and asyncio's write through one handler, as
``lumen-proxy LEVEL: message``. Two filters on it keep what a client sends out of the journal:

- :class:`Redact`: the exceptions of aiohttp's HTTP parser quote the request they reject (the request
  line, a header with its ``Bearer sk_...`` key, the body). A record carrying one keeps its message and
  the exception's class name, and loses the traceback.
- :class:`RateLimit`: at most ``per`` lines of one kind (logger and message template, not its
  arguments) every ``interval`` seconds; the rest are counted and told in one ``suppressed N similar
  lines`` summary once the interval is over (with the next line logged, or at stop). No client, with
  or without a key, can write more than a few lines a minute whatever its request rate.

:class:`QuietRequestHandler` is aiohttp's connection with the same rule for what goes back to the
client: a request its parser rejects gets a 400 that quotes nothing (aiohttp's answer is the parser's
message, with the offending bytes) and one short line.

The request log (one JSON line per request, on stdout) is :mod:`.usagelog`'s, and passes neither.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .errors import BadRequest

log = logging.getLogger("lumen_proxy")
FORMAT = "lumen-proxy %(levelname)s: %(message)s"
LOGGERS = {"lumen_proxy": logging.INFO, "aiohttp": logging.WARNING, "asyncio": logging.WARNING}
"""Every logger the server writes through, and its level. aiohttp's access log (INFO, with the request
line) stays off: the JSON lines on stdout are the request log."""
PER_INTERVAL = 10
INTERVAL = 60.0
MAX_KINDS = 1000  # kinds tracked at once; beyond that, the new ones share one allowance
_OVERFLOW = ("lumen_proxy", "(other lines)")
_SUMMARY = "lumen_summary"  # a record attribute: the summary itself, never limited
_QUOTING = (HttpProcessingError, web.RequestPayloadError)


def setup_logging(stream: TextIO = sys.stderr, *, clock: Callable[[], float] = time.monotonic) -> RateLimit:
    """Send every logger of :data:`LOGGERS` through one redacting, rate-limited handler on ``stream``."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    limit = RateLimit(handler, clock=clock)
    handler.addFilter(limit)  # first: it counts by the template, before Redact rewrites it
    handler.addFilter(Redact())
    for name, level in LOGGERS.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    return limit


def quoting_error(exc: object) -> BaseException | None:
    """The exception in ``exc``'s chain whose message may quote a client's request, if any."""
    seen: set[int] = set()
    while isinstance(exc, BaseException) and id(exc) not in seen:
        if isinstance(exc, _QUOTING):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class Redact(logging.Filter):
    """A record whose exception quotes the request becomes one line: its message and the class name."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None or record.exc_info[1] is None:
            return True
        quoting = quoting_error(record.exc_info[1])
        if quoting is not None:
            record.msg = f"{record.getMessage()} ({type(quoting).__name__})"
            record.args = None
            record.exc_info = record.exc_text = record.stack_info = None
        return True


@dataclass(slots=True)
class _Window:
    start: float
    level: int
    seen: int = 0


class RateLimit(logging.Filter):
    """At most ``per`` lines of each kind per ``interval`` seconds on ``handler``; then one summary line."""

    def __init__(self, handler: logging.Handler, *, per: int = PER_INTERVAL, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic, max_kinds: int = MAX_KINDS) -> None:
        super().__init__()
        self.handler, self.per, self.interval, self.clock, self.max_kinds = handler, per, interval, clock, max_kinds
        self._windows: dict[tuple[str, str], _Window] = {}
        self._next_end = float("inf")
        self._lock = threading.Lock()  # records may come from threads (aiosqlite, executors)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SUMMARY, False):
            return True
        now = self.clock()
        with self._lock:
            ended = self._end_windows(now) if now >= self._next_end else []
            window = self._window(record, now)
            window.seen += 1
            window.level = max(window.level, record.levelno)
            passes = window.seen <= self.per
        self._emit(ended)
        return passes

    def flush(self) -> None:
        """Write the summaries of every window, over or not (the server is stopping)."""
        with self._lock:
            ended = self._end_windows(self.clock(), everything=True)
        self._emit(ended)

    def _window(self, record: logging.LogRecord, now: float) -> _Window:
        key = (record.name, str(record.msg))
        if key not in self._windows and len(self._windows) >= self.max_kinds:
            key = _OVERFLOW
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window(now, record.levelno)
            self._next_end = min(self._next_end, now + self.interval)
        return window

    def _end_windows(self, now: float, everything: bool = False) -> list[logging.LogRecord]:
        """Drop the windows that are over; the summaries of those that suppressed lines."""
        ended = [key for key, w in self._windows.items() if everything or now >= w.start + self.interval]
        summaries = [self._summary(key, self._windows.pop(key), now) for key in ended]
        self._next_end = min((w.start + self.interval for w in self._windows.values()), default=float("inf"))
        return [s for s in summaries if s is not None]

    def _summary(self, key: tuple[str, str], window: _Window, now: float) -> logging.LogRecord | None:
        suppressed = window.seen - self.per
        if suppressed <= 0:
            return None
        template = key[1] if len(key[1]) <= 120 else key[1][:120] + "..."
        seconds = min(now - window.start, self.interval)
        record = logging.LogRecord(key[0], window.level, __file__, 0, "suppressed %d similar lines in %.0fs: %s",
                                   (suppressed, seconds, template), None)
        setattr(record, _SUMMARY, True)
        return record

    def _emit(self, summaries: list[logging.LogRecord]) -> None:
        for summary in summaries:
            self.handler.handle(summary)


class QuietRequestHandler(web.RequestHandler):
    """aiohttp's HTTP/1 connection, except that what a client sent never goes back out or into the log.

    A request the parser rejects gets a fixed 400 and one line naming the peer and the error's class; a
    body that turns out undecodable while aiohttp drains it after the response gets one line too.
    """

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != 400:  # 500 and 504: aiohttp's fixed texts (debug is off)
            return super().handle_error(request, status, exc, message)
        log.warning("rejected a malformed HTTP request from %s: %s", request.remote, type(exc).__name__)
        response = web.Response(status=400, body=BadRequest("The HTTP request is malformed.").body(),
                                content_type="application/json")
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        quoting = quoting_error(kw.get("exc_info"))
        if quoting is None:
            super().log_exception(*args, **kw)
        else:
            peer = self.peername[0] if isinstance(self.peername, tuple) else "a client"
            log.warning("dropped an undecodable request body from %s: %s", peer, type(quoting).__name__)

"""Client connections: a cap on how many are open, and deadlines for the idle and the slow.

aiohttp alone keeps a connection that never finishes its request head for the whole keep-alive
timeout, and accepts connections without limit, so a few thousand slow or idle sockets could hold
the process's file descriptors and memory. Here:

- an idle keep-alive connection is closed after ``timeouts.keepalive`` (aiohttp's own timer);
- a request head (request line and headers) must be complete within ``timeouts.request_headers`` of
  its first byte, or the connection is closed (slowloris); bodies have their own deadline in the relay;
- at most ``max_connections`` are open: a new connection over the cap first evicts the idle connection
  (keep-alive, or a head still arriving) that sent nothing for longest, so idle and slow sockets can
  never lock real clients out; only when every connection is busy with a request is the new one
  answered ``503`` and closed.

:class:`GuardedSite` replaces ``web.TCPSite``; its connections are :class:`.logs.QuietRequestHandler` with
two more hooks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from .config import Config
from .logs import QuietRequestHandler

log = logging.getLogger("lumen_proxy")
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        b"Connection: close\r\nContent-Length: 113\r\n\r\n"
        b'{"error": {"message": "Too many open connections. Retry shortly.", "type": "server_error", '
        b'"param": null, "code": null}}')


class Guard:
    """The open connections of one listening socket, oldest idle first."""

    def __init__(self, server: web.Server, *, max_connections: int, head_timeout: float,
                 kwargs: dict[str, Any]) -> None:
        self.server, self.max_connections, self.head_timeout = server, max_connections, head_timeout
        self.kwargs = kwargs
        self.open: set[GuardedHandler] = set()
        self.refused = 0
        self.evicted = 0

    def __call__(self) -> GuardedHandler:
        """The protocol factory ``loop.create_server`` calls for each accepted connection."""
        return GuardedHandler(self, self.server, loop=asyncio.get_running_loop(), **self.kwargs)

    def admit(self, handler: GuardedHandler) -> bool:
        """Make room for ``handler``: evict the longest-idle connection, or refuse when all are busy."""
        if len(self.open) >= self.max_connections:  # rare: a linear look is fine
            idle = min((h for h in self.open if h.is_idle()), key=GuardedHandler.last_active, default=None)
            if idle is None:
                self.refused += 1
                return False
            self.evicted += 1
            self.open.discard(idle)
            idle.force_close()
        self.open.add(handler)
        return True

    def forget(self, handler: GuardedHandler) -> None:
        self.open.discard(handler)


class GuardedHandler(QuietRequestHandler):
    """Lumen's request handler (malformed requests get a 400 that quotes nothing), plus the head deadline
    and the guard's bookkeeping."""

    __slots__ = ("_guard", "_head_timer", "_active_at")

    def __init__(self, guard: Guard, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self._active_at = time.monotonic()

    def last_active(self) -> float:
        """When bytes last arrived (or the connection opened)."""
        return self._active_at

    def is_idle(self) -> bool:
        """Waiting for a request (keep-alive, or a head still arriving), not working on one."""
        return not self._request_in_progress and not self._messages

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard.admit(self):
            transport.write(BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.forget(self)
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._active_at = time.monotonic()
        idle = self.is_idle()
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self._disarm()
        elif idle and self._head_timer is None and not self._force_close:
            self._head_timer = self._loop.call_later(self._guard.head_timeout, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.is_idle():
            log.info("closed a connection whose request head took longer than %ss", self._guard.head_timeout)
            self.force_close()

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


class GuardedSite(web.TCPSite):
    """``web.TCPSite`` whose connections go through a :class:`Guard`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, max_connections: int,
                 head_timeout: float, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self.max_connections, self.head_timeout = max_connections, head_timeout
        self.guard: Guard | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        if server is None:
            raise RuntimeError("call runner.setup() before starting a site")
        self.guard = Guard(server, max_connections=self.max_connections, head_timeout=self.head_timeout,
                           kwargs=server._kwargs)
        self._server = await asyncio.get_running_loop().create_server(
            self.guard, self._host, self._port, backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port)


def site_for(runner: web.AppRunner, config: Config, host: str, port: int) -> GuardedSite:
    """The listening site for ``config``; make the runner with ``keepalive_timeout=config.timeouts.keepalive``."""
    return GuardedSite(runner, host, port, max_connections=config.max_connections,
                       head_timeout=config.timeouts.request_headers, reuse_address=True)

"""Everything a running server holds, built and torn down in one place.

``open_runtime`` is used as an aiohttp cleanup context: it takes the one-server-per-database lock,
opens and migrates the store, proves the database can be written (a committed heartbeat: a database
that cannot be written refuses the start with one line, as :class:`StoreError`), replays the usage
rows a previous stop spilled, loads the key/account view, and starts the background tasks (view
refresh, usage writer, limiter sweep, active health checks). Nothing is served before those rows are
billed. On the way out it stops the tasks and flushes the usage log; the rows it could not write
are spilled for the next start (``UsageLog.spilled``) or, if even that fails, lost
(``UsageLog.unwritten``); either way the server then exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from .auth import AccessView
from .backends import BackendPool, HttpClient, check_backends
from .billing import Coins, Wallets
from .config import Config
from .metrics import Metrics
from .ratelimit import Limiter, MemoryLimiter
from .store import Store, StoreError
from .usagelog import UsageLog

log = logging.getLogger("lumen_proxy")
SWEEP_EVERY = 30.0
START_CHECK_WITHIN = 2.0  # seconds the start's write check waits for another connection's write lock


class ServerLocked(Exception):
    """Another lumen-proxy server already serves this database."""


@dataclass
class Runtime:
    config: Config
    store: Store
    view: AccessView
    wallets: Coins
    usage: UsageLog
    limiter: Limiter[Any]
    pool: BackendPool
    client: HttpClient
    metrics: Metrics
    started: float = field(default_factory=time.time)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def apply(self, config: Config) -> None:
        """Take a reloaded config; limiter windows, breakers and holds carry over.

        The listen address and the database need a restart; they keep their running values.
        """
        old = self.config
        if (config.database, config.host, config.port) != (old.database, old.host, old.port):
            log.warning("listen address or database changed in %s: restart the service to apply that part",
                        config.source)
        self.config = replace(config, database=old.database, host=old.host, port=old.port)
        self.pool.breaker = config.breaker
        self.pool.timeouts = config.timeouts
        self.client.timeouts = config.timeouts
        self.usage.backlog = config.usage_backlog

    def backend_states(self) -> dict[tuple[str, str], bool]:
        return {(m.name, b.label): self.pool.state(b).up for m in self.config.models for b in m.backends}


RUNTIME = web.AppKey("runtime", Runtime)


def lock_database(path: Path) -> IO[str]:
    """Hold an exclusive lock on ``<database>.lock`` for the life of the server (CLI commands skip it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(f"{path}.lock", "a+")  # noqa: SIM115 - held open until the server stops
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ServerLocked(
            f"another lumen-proxy server is already running on {path}: limits and coin holds live in "
            "one process's memory, so only one server may serve a database"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _spawn(rt: Runtime, coro: Coroutine[Any, Any, None]) -> None:
    rt.tasks.append(asyncio.get_running_loop().create_task(coro))


async def _sweep(limiter: Limiter[Any]) -> None:
    while True:
        await asyncio.sleep(SWEEP_EVERY)
        limiter.sweep()


async def _health_loop(rt: Runtime) -> None:
    while True:
        interval = rt.config.health_check_interval
        await asyncio.sleep(interval if interval > 0 else 5.0)  # off: look again later (a reload may turn it on)
        if interval > 0:
            await check_backends(rt.pool, rt.client, rt.config)


def make_context(config: Config, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 usage_interval: float = 0.1, access_log: Any = None,
                 on_ready: Callable[[Runtime], Coroutine[Any, Any, None]] | None = None,
                 ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def open_runtime(app: web.Application) -> AsyncIterator[None]:
        lock = lock_database(config.database)
        try:
            store = await Store.open(config.database)
        except StoreError:
            lock.close()
            raise
        try:
            rt = await _start(store)
        except BaseException:
            await store.close()
            lock.close()
            raise
        app[RUNTIME] = rt
        try:
            for coro in (rt.view.run(), rt.usage.run(), _sweep(rt.limiter), _health_loop(rt)):
                _spawn(rt, coro)
            yield
        finally:
            for task in rt.tasks:
                task.cancel()
            for task in rt.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await rt.usage.close()
            await rt.client.close()
            await store.close()
            lock.close()

    async def _start(store: Store) -> Runtime:
        """Everything before serving; a database problem is one :class:`StoreError` line."""
        await store.check_writable(within=START_CHECK_WITHIN)
        wallets = Wallets()
        writer_lock = asyncio.Lock()
        pool = BackendPool(clock=monotonic)
        pool.breaker = config.breaker
        pool.timeouts = config.timeouts
        rt = Runtime(
            config=config, store=store, wallets=wallets,
            view=AccessView(store, wallets, writer_lock, clock=clock),
            usage=UsageLog(store, wallets, writer_lock, interval=usage_interval, access_log=access_log,
                           backlog=config.usage_backlog, clock=monotonic),
            limiter=MemoryLimiter(clock=monotonic), pool=pool, client=HttpClient(config.timeouts),
            metrics=Metrics(),
        )
        try:
            await rt.usage.replay()  # before the view loads the balances: they include these debits
            await rt.view.reload()
            if on_ready is not None:
                await on_ready(rt)
        except sqlite3.Error as exc:
            await rt.client.close()
            raise StoreError(f"cannot use the database {config.database}: {exc}") from None
        except BaseException:
            await rt.client.close()
            raise
        return rt

    return open_runtime

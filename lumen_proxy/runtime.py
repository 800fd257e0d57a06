"""Everything a running server holds, built and torn down in one place.

:func:`shared_state` is the one factory that picks the implementations of what several servers
would share (today always the SQLite store, coins and rate limits in this process's memory).
``open_runtime`` is used as an aiohttp cleanup context: it claims the store (one server per store),
connects it (opening and migrating), proves it can be written (a committed heartbeat: a store that
cannot be written refuses the start with one line, as :class:`StoreError`), replays the usage rows a
previous stop spilled, loads the key/account view, and starts the background tasks (view refresh,
usage writer, limiter sweep, active health checks). Nothing is served before those rows are billed.
On the way out it stops the tasks and flushes the usage log; the rows it could not write are
spilled for the next start (``UsageLog.spilled``) or, if even that fails, lost
(``UsageLog.unwritten``); either way the server then exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from aiohttp import web

from .allowances import Allowances
from .auth import AccessView
from .backends import BackendPool, HttpClient, check_backends
from .billing import Coins, Wallets
from .builtin_formats import EchoStore
from .config import Config
from .fairshare import FairShare
from .metrics import Metrics
from .owners import ResponseOwners
from .ratelimit import Limiter, MemoryLimiter
from .store import ServerLocked as ServerLocked  # server.py imports it from here
from .store import StorageFailure, Store, StoreError, store_for
from .usagelog import UsageLog, quarantine_path, spill_path

log = logging.getLogger("lumen_proxy")
SWEEP_EVERY = 30.0
START_CHECK_WITHIN = 2.0  # seconds the start's write check waits for another connection's write lock


class SharedState(NamedTuple):
    """What several servers of one deployment would share; each part behind its seam."""

    store: Store
    coins: Coins
    limiter: Limiter[Any]


def shared_state(config: Config, *, monotonic: Callable[[], float] = time.monotonic) -> SharedState:
    """The implementations ``config`` selects: today always SQLite (``database`` is a file path) and
    this process's memory for coins and limits. Nothing is opened yet."""
    return SharedState(store_for(config.database), Wallets(), MemoryLimiter(clock=monotonic))


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
    responses: ResponseOwners
    allowances: Allowances
    share: FairShare  # the slots of backends with max_concurrency and the fair queue before them
    echo: EchoStore = field(default_factory=EchoStore)  # the built-in echo's stored responses
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
        ids = config.response_ids
        self.responses.keep, self.responses.ttl = ids.keep, ids.hours * 3600
        self.responses.per_account = ids.per_account

    def backend_states(self) -> dict[tuple[str, str], bool]:
        return {(m.name, b.label): self.pool.state(b).up for m in self.config.models for b in m.backends}


RUNTIME = web.AppKey("runtime", Runtime)


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
        shared = shared_state(config, monotonic=monotonic)
        store = shared.store
        claim = await store.claim()
        try:
            await store.connect()
        except BaseException:
            await claim.release()
            raise
        try:
            rt = await _start(shared)
        except BaseException:
            await store.close()
            await claim.release()
            raise
        app[RUNTIME] = rt
        try:
            for coro in (rt.view.run(), rt.usage.run(), _sweep(rt.limiter), _health_loop(rt), rt.allowances.run()):
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
            await claim.release()

    async def _start(shared: SharedState) -> Runtime:
        """Everything before serving; a storage problem is one :class:`StoreError` line."""
        store, wallets = shared.store, shared.coins
        try:
            await store.check_writable(within=START_CHECK_WITHIN)
        except StorageFailure as exc:
            raise StoreError(exc.problem()) from None
        writer_lock = asyncio.Lock()
        pool = BackendPool(clock=monotonic)
        pool.breaker = config.breaker
        pool.timeouts = config.timeouts
        view = AccessView(store, wallets, writer_lock, clock=clock)
        metrics = Metrics()
        rt = Runtime(
            config=config, store=store, wallets=wallets,
            view=view,
            usage=UsageLog(store, wallets, writer_lock, interval=usage_interval, access_log=access_log,
                           quarantine=quarantine_path(config.database), spill=spill_path(config.database),
                           backlog=config.usage_backlog, clock=monotonic),
            limiter=shared.limiter, pool=pool, client=HttpClient(config.timeouts),
            metrics=metrics,
            responses=ResponseOwners(keep=config.response_ids.keep, ttl=config.response_ids.hours * 3600,
                                     per_account=config.response_ids.per_account, clock=monotonic),
            allowances=Allowances(lambda: rt.config, lambda: view.accounts, wallets, store, writer_lock,
                                  view.reload_holding_lock, clock),
            share=FairShare(clock=monotonic, observe=lambda model, s: metrics.queue_wait.observe((model,), s)),
        )
        try:
            await rt.usage.replay()  # before the view loads the balances: they include these debits
            await rt.view.reload()
            await rt.allowances.refill()  # a server down over a period's start refills before serving
            if on_ready is not None:
                await on_ready(rt)
        except StorageFailure as exc:
            await rt.client.close()
            raise StoreError(f"cannot use the database {config.database}: {exc}") from None
        except BaseException:
            await rt.client.close()
            raise
        return rt

    return open_runtime

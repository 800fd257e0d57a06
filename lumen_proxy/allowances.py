"""Refilling the allowances of groups: exactly once per account and period, and never on the request path.

At the start of each period (calendar-aligned in the config's ``timezone``) an account of a group with an
``allowance`` gets the group's coins; what was left does not roll over, except what requests in flight
at that moment may still spend (their holds and unwritten costs), which stays until they settle, so
that no account can be pushed below zero by a refill. Coins the admin adds are the separate balance;
requests spend the allowance first (:data:`.sqlite_store._DEBIT`), and holds span both.

Only the server refills, at start (a server that was down over midnight refills before serving), every
``CHECK_EVERY`` seconds, and at once for an account that is out of coins when a refill is due. Each
refill is conditional in the database (the account's period must be older), so a period is granted
once whatever the clocks say, and each is a ledger row (with one for what expired unspent), so
"ledger = balance + allowance" holds to the micro-coin.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from .billing import Coins
from .config import Allowance, Config
from .periods import next_start, period_start
from .store import AccountRow, Refill, Store

log = logging.getLogger("lumen_proxy")
CHECK_EVERY = 1.0  # seconds between looks for accounts whose period has turned


def period_label(start: float, allowance: Allowance, config: Config) -> str:
    """``2026-12`` (month), ``2026-W49`` (week) or ``2026-12-01`` (day), in the config's zone."""
    local = datetime.fromtimestamp(start, config.timezone)
    if allowance.every == "month":
        return local.strftime("%Y-%m")
    if allowance.every == "week":
        year, week, _ = local.isocalendar()
        return f"{year}-W{week:02d}"
    return local.strftime("%Y-%m-%d")


def owed(account: AccountRow, start: float) -> bool:
    """Whether ``account`` has not been granted the period that began at ``start`` (or a later one)."""
    return account.allowance_start is None or account.allowance_start < start


def refill_of(account: AccountRow, config: Config, now: float, carry: int,
              starts: dict[str, float] | None = None) -> Refill | None:
    """The refill ``account`` is due at ``now``, or None. An account in no group with an allowance (or
    moved out of one) has its leftover expire once. ``starts``: the groups' current period starts, if known."""
    group = config.group(account.group)
    allowance = group.allowance if group is not None else None
    if group is None or allowance is None:
        if account.allowance > 0 and (account.allowance_start is None or account.allowance_start < now):
            return Refill(account.id, now, 0, carry, "")
        return None
    start = starts[group.name] if starts is not None else period_start(now, allowance.every, config.timezone)
    if not owed(account, start):
        return None
    note = f"allowance {period_label(start, allowance, config)} ({account.group})"
    return Refill(account.id, start, allowance.coins, carry, note)


class Allowances:
    """Finds due refills in the view and applies them through the store, under the usage writer's lock."""

    def __init__(self, config: Callable[[], Config], accounts: Callable[[], dict[int, AccountRow]],
                 wallets: Coins, store: Store, lock: asyncio.Lock, reload: Callable[[], Awaitable[None]],
                 clock: Callable[[], float]) -> None:
        self.config, self.accounts, self.wallets, self.store = config, accounts, wallets, store
        self.lock, self.reload, self.clock = lock, reload, clock
        self._starts: dict[str, float] = {}  # per group with an allowance: its current period's start
        self._turns_at = 0.0  # when the next of those periods begins: recompute then
        self._for: Config | None = None  # the config they were computed for

    def _current(self, config: Config, now: float) -> dict[str, float]:
        """The current period start of every group with an allowance; recomputed when one turns."""
        if now >= self._turns_at or config is not self._for:
            every = {g.name: g.allowance.every for g in config.groups if g.allowance is not None}
            self._starts = {name: period_start(now, e, config.timezone) for name, e in every.items()}
            self._turns_at = min((next_start(now, e, config.timezone) for e in every.values()), default=float("inf"))
            self._for = config
        return self._starts

    def is_due(self, account: AccountRow) -> bool:
        """Whether ``account``'s allowance is owed (a new account, or its period has turned) and the refill
        has not run yet. Called for every request: a dict lookup and a comparison."""
        config = self.config()
        group = config.group(account.group)
        if group is None or group.allowance is None:
            return False
        return owed(account, self._current(config, self.clock())[group.name])

    def due(self, now: float) -> list[Refill]:
        config = self.config()
        starts = self._current(config, now)
        return [r for r in (refill_of(a, config, now, self.wallets.in_flight(a.id), starts)
                            for a in self.accounts().values()) if r]

    async def refill(self, only: int | None = None) -> int:
        """Apply every due refill, in one transaction; how many were applied. With ``only`` (a request of
        that account found it owed), nothing is done unless the account is still owed once the lock is
        held: the first such request refills everyone, the others find it done."""
        async with self.lock:  # never between a usage commit and its wallet update
            if only is not None:
                account = self.accounts().get(only)
                if account is None or not self.is_due(account):
                    return 0
            refills = self.due(self.clock())
            if not refills:
                return 0
            applied = await self.store.refill(refills, now=self.clock())
            if applied:  # under the lock: a request waiting for it then finds its account refilled
                await self.reload()  # the new allowances into the view and the wallets
        if applied:
            log.info("allowances refilled for %d account(s)", len(applied))
        return len(applied)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY)
            try:
                await self.refill()
            except Exception as exc:  # the next look retries: a refill is conditional, so never twice
                log.error("cannot refill allowances (will retry): %s", exc)

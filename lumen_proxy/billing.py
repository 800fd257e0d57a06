"""Integer price math (pure), the :class:`Coins` seam, and :class:`Wallets`, its one-process implementation.

All amounts are micro-coins (int). An account's spendable amount is
``balance - pending - held``: ``balance`` is what the database has committed, ``pending`` the
settled costs still in the usage writer's queue, ``held`` the worst cases of requests in flight.
In :class:`Wallets` holds are placed and settled without suspending, so concurrent requests cannot
both see the same coins, and a cancelled handler can always settle in its ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from .config import MICRO, Price

PER_MILLION = 1_000_000


def to_coins(micro: int) -> float:
    """Micro-coins as a coin number for JSON, logs and metrics (exact to 6 decimals below 9e9 coins)."""
    return micro / MICRO


def cost(price: Price, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
    """(prompt − cached) × P / 1e6 + cached × P_cached / 1e6 + completion × C / 1e6, exact, rounded up
    to the micro-coin. ``cached_tokens`` is the part of ``prompt_tokens`` a backend read from its cache."""
    total = ((prompt_tokens - cached_tokens) * price.prompt + cached_tokens * price.cached
             + completion_tokens * price.completion)
    return -(-total // PER_MILLION)


def worst_cost(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """What a hold reserves: every prompt token at the higher of the two prompt prices."""
    return cost(price, prompt_tokens, completion_tokens, prompt_tokens if price.cached > price.prompt else 0)


@dataclass(slots=True)
class Hold:
    account_id: int
    amount: int
    hold_id: str = ""  # the request's id: a shared implementation finds (and expires) holds by it
    open: bool = True


class Coins(Protocol):
    """Who may spend what: holds on the way in, settlement on the way out.

    An implementation keeps, for every account, whatever the concurrency and however many servers:
    - the sum of open holds never exceeds ``balance - pending`` at the moment each was placed
      (``reserve`` checks and records as one step: two requests can never both take the same coins);
    - ``settle`` never awaits (the relay calls it in ``finally``, possibly from a cancelled handler),
      is idempotent, releases the hold and moves the real cost to pending;
    - pending leaves for the balance only through ``committed`` (the usage writer's commit) or
      ``dropped`` (a quarantined row), so "ledger = balance" holds once the writer has caught up.
    """

    async def reserve(self, account_id: int, amount: int, hold_id: str) -> Hold | None:
        """Hold ``amount`` for request ``hold_id``, or None when it does not fit."""
        ...

    def settle(self, hold: Hold, actual_cost: int) -> None: ...
    def available(self, account_id: int) -> int: ...
    def settled(self, account_id: int) -> int: ...
    def held_by(self, account_id: int) -> int: ...
    def load(self, balances: Iterable[tuple[int, int]]) -> None: ...
    def committed(self, debits: Mapping[int, int]) -> None: ...
    def dropped(self, account_id: int, amount: int) -> None: ...
    def owe(self, account_id: int, amount: int) -> None: ...

    def load_allowances(self, allowances: Iterable[tuple[int, int]]) -> None:
        """The committed allowance left of each account (a part of its ``load``-ed amount, spent first)."""
        ...

    def allowance_left(self, account_id: int) -> int:
        """The allowance once every finished request is debited (costs are taken from it first)."""
        ...

    def in_flight(self, account_id: int) -> int:
        """What requests of the account may still debit: open holds plus costs not yet written."""
        ...


class Wallets:
    """Balances, pending debits and open holds per account, in this process's memory (a :class:`Coins`).

    ``reserve`` never suspends: check and record cannot interleave with another request's.
    """

    def __init__(self) -> None:
        self.balance: dict[int, int] = {}  # committed: the balance plus the allowance left
        self.pending: dict[int, int] = {}
        self.held: dict[int, int] = {}
        self.allowance: dict[int, int] = {}  # committed allowance left (a part of balance)

    def load_allowances(self, allowances: Iterable[tuple[int, int]]) -> None:
        self.allowance = {account_id: left for account_id, left in allowances if left}

    def allowance_left(self, account_id: int) -> int:
        return max(self.allowance.get(account_id, 0) - self.pending.get(account_id, 0), 0)

    def in_flight(self, account_id: int) -> int:
        return self.pending.get(account_id, 0) + self.held.get(account_id, 0)

    def load(self, balances: Iterable[tuple[int, int]]) -> None:
        """Take the committed balances from the database (after an admin change, or at start)."""
        self.balance = dict(balances)

    def settled(self, account_id: int) -> int:
        """The balance once every finished request is debited: what the CLI will show."""
        return self.balance.get(account_id, 0) - self.pending.get(account_id, 0)

    def available(self, account_id: int) -> int:
        return self.settled(account_id) - self.held.get(account_id, 0)

    async def reserve(self, account_id: int, amount: int, hold_id: str) -> Hold | None:
        hold = self.place_hold(account_id, amount)
        if hold is not None:
            hold.hold_id = hold_id
        return hold

    def held_by(self, account_id: int) -> int:
        return self.held.get(account_id, 0)

    def place_hold(self, account_id: int, amount: int) -> Hold | None:
        """Reserve ``amount`` or return None when it does not fit beside the other open holds."""
        if amount > self.available(account_id) and amount > 0:
            return None
        self.held[account_id] = self.held.get(account_id, 0) + amount
        return Hold(account_id, amount)

    def settle(self, hold: Hold, actual_cost: int) -> None:
        """Release the hold and queue the real cost; idempotent, never awaits."""
        if not hold.open:
            return
        hold.open = False
        self.held[hold.account_id] -= hold.amount
        if not self.held[hold.account_id]:
            del self.held[hold.account_id]
        self.pending[hold.account_id] = self.pending.get(hold.account_id, 0) + actual_cost

    def committed(self, debits: Mapping[int, int]) -> None:
        """The usage writer committed these debits: move them from pending into the balance."""
        for account_id, amount in debits.items():
            self.balance[account_id] = self.balance.get(account_id, 0) - amount
            if account_id in self.allowance:  # the database takes the allowance first (sqlite_store._DEBIT)
                self.allowance[account_id] = max(self.allowance[account_id] - amount, 0)
            left = self.pending.get(account_id, 0) - amount
            if left:
                self.pending[account_id] = left
            else:
                self.pending.pop(account_id, None)

    def owe(self, account_id: int, amount: int) -> None:
        """A cost settled elsewhere (a spilled row being replayed) now waits in the usage writer's queue."""
        self.pending[account_id] = self.pending.get(account_id, 0) + amount

    def dropped(self, account_id: int, amount: int) -> None:
        """The usage writer quarantined a row: its settled cost will never be debited, so it leaves
        pending and the balance keeps it (the request is not billed)."""
        left = self.pending.get(account_id, 0) - amount
        if left:
            self.pending[account_id] = left
        else:
            self.pending.pop(account_id, None)

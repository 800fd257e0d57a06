"""Integer price math (pure) and the in-memory wallets that hold and settle coins.

All amounts are micro-coins (int). An account's spendable amount is
``balance - pending - held``: ``balance`` is what the database has committed, ``pending`` the
settled costs still in the usage writer's queue, ``held`` the worst cases of requests in flight.
Holds are placed and settled without an ``await``, so concurrent requests cannot both see the same
coins, and a cancelled handler can always settle in its ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import MICRO, Model, Price

PER_MILLION = 1_000_000
EMBEDDING_PATHS = ("/v1/embeddings",)


def to_coins(micro: int) -> float:
    """Micro-coins as a coin number for JSON, logs and metrics (exact to 6 decimals below 9e9 coins)."""
    return micro / MICRO


def cost(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """prompt × P / 1e6 + completion × C / 1e6, exact, rounded up to the micro-coin."""
    total = prompt_tokens * price.prompt + completion_tokens * price.completion
    return -(-total // PER_MILLION)


def estimate_prompt_tokens(body_size: int) -> int:
    """A cheap, deliberate over-estimate: 2 bytes of JSON per token.

    English runs ~4 bytes per token, but short words ("a a a ...") reach 2, and a hold that
    under-estimates lets concurrent requests overspend. Only the hold and the token window use it;
    the bill uses the backend's real usage.
    """
    return body_size // 2 + 1


def typical_prompt_tokens(body_size: int) -> int:
    """What a backend that reports no usage is billed for the prompt: ~4 bytes of JSON per token."""
    return body_size // 4 + 1


def max_output_tokens(body: Mapping[str, Any], model: Model, path: str) -> int:
    if path in EMBEDDING_PATHS:
        return 0
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return model.max_output_tokens


@dataclass(slots=True)
class Hold:
    account_id: int
    amount: int
    open: bool = True


class Wallets:
    """Balances, pending debits and open holds per account."""

    def __init__(self) -> None:
        self.balance: dict[int, int] = {}
        self.pending: dict[int, int] = {}
        self.held: dict[int, int] = {}

    def load(self, balances: Iterable[tuple[int, int]]) -> None:
        """Take the committed balances from the database (after an admin change, or at start)."""
        self.balance = dict(balances)

    def settled(self, account_id: int) -> int:
        """The balance once every finished request is debited: what the CLI will show."""
        return self.balance.get(account_id, 0) - self.pending.get(account_id, 0)

    def available(self, account_id: int) -> int:
        return self.settled(account_id) - self.held.get(account_id, 0)

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
            left = self.pending.get(account_id, 0) - amount
            if left:
                self.pending[account_id] = left
            else:
                self.pending.pop(account_id, None)

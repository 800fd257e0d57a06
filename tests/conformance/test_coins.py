"""The Coins seam: every implementation keeps these, whatever the concurrency.

Today the only implementation is the one-process :class:`lumen_proxy.billing.Wallets`; a shared one
(PostgreSQL, Redis) is added to ``IMPLEMENTATIONS`` and must pass the same tests unchanged.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable

import pytest

from lumen_proxy.billing import Coins, Wallets

IMPLEMENTATIONS: dict[str, Callable[[], Coins]] = {"memory": Wallets}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def coins(request: pytest.FixtureRequest) -> Coins:
    made = IMPLEMENTATIONS[request.param]()
    made.load([(1, 1_000), (2, 50)])
    return made


async def test_a_hold_fits_or_is_refused_and_nothing_is_half_taken(coins: Coins) -> None:
    hold = await coins.reserve(1, 600, "req-1")
    assert hold is not None and (hold.account_id, hold.amount, hold.hold_id) == (1, 600, "req-1")
    assert await coins.reserve(1, 401, "req-2") is None  # 1,000 - 600 held
    assert coins.available(1) == 400 and coins.held_by(1) == 600
    assert await coins.reserve(1, 400, "req-3") is not None
    assert coins.available(1) == 0


async def test_concurrent_holds_never_overspend(coins: Coins) -> None:
    granted = await asyncio.gather(*(coins.reserve(1, 7, f"req-{i}") for i in range(500)))
    taken = sum(h.amount for h in granted if h is not None)
    assert taken == 7 * (1_000 // 7) and coins.available(1) == 1_000 - taken


async def test_settle_never_awaits_is_idempotent_and_moves_the_cost_to_pending(coins: Coins) -> None:
    assert not inspect.iscoroutinefunction(coins.settle)
    hold = await coins.reserve(2, 50, "req-1")
    assert hold is not None
    coins.settle(hold, 30)
    coins.settle(hold, 30)
    assert coins.held_by(2) == 0 and coins.settled(2) == 20 and coins.available(2) == 20


async def test_ledger_equals_balance_once_the_writer_commits(coins: Coins) -> None:
    costs = []
    for i in range(10):
        hold = await coins.reserve(1, 100, f"req-{i}")
        assert hold is not None
        coins.settle(hold, 10 + i)
        costs.append(10 + i)
    assert coins.settled(1) == 1_000 - sum(costs)
    coins.committed({1: sum(costs[:5])})
    assert coins.settled(1) == 1_000 - sum(costs)  # the same, whether committed yet or not
    coins.committed({1: sum(costs[5:])})
    coins.load([(1, 1_000 - sum(costs)), (2, 50)])  # the committed balance, as the database has it
    assert coins.settled(1) == coins.available(1) == 1_000 - sum(costs)


async def test_a_dropped_cost_leaves_pending_and_an_owed_one_joins_it(coins: Coins) -> None:
    hold = await coins.reserve(1, 100, "req-1")
    assert hold is not None
    coins.settle(hold, 40)
    coins.dropped(1, 40)  # the writer quarantined the row: it is never debited
    assert coins.settled(1) == 1_000
    coins.owe(1, 25)  # a spilled row being replayed
    assert coins.settled(1) == 975 and coins.available(1) == 975


async def test_a_free_request_is_always_held(coins: Coins) -> None:
    hold = await coins.reserve(2, 50, "req-1")
    assert hold is not None
    assert await coins.reserve(2, 0, "req-2") is not None  # a free model needs no coins

"""After a run, does lumen's books agree with what the clients saw?

Two checks, run once lumen has stopped on SIGTERM (a graceful stop flushes the usage writer):

``check_usage_log``: the ``usage`` table holds one status-200 row per 2xx answer the load generators
counted. Exact equality is impossible with a time-limited load generator: when wrk's clock runs out
it drops the requests still in flight, which lumen may still complete and log. So the rows must lie
in ``[client_2xx, client_2xx + in_flight]``, where ``in_flight`` is the sum of the connections of
every load run (plus any client-side errors).

``check_coins``: ``accounts show bench --json`` reports the initial coins minus the sum of the logged
costs, exactly, and each logged cost is the config's price applied to the logged tokens (integer
micro-coins, rounded up as lumen_proxy/billing.py does).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

MICRO = 1_000_000
PRICE_PROMPT = 2_500_000  # micro-coins per million tokens: the 2.5 coins of bench/targets.py's config
PRICE_COMPLETION = 10_000_000


@dataclass(frozen=True)
class Check:
    ok: bool
    summary: str  # one line for the results table
    detail: str  # what to look at when it fails


def _query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def check_usage_log(db: Path, client_2xx: int, in_flight: int) -> Check:
    """Status-200 usage rows against the 2xx responses the clients received."""
    by_status = dict(_query(db, "SELECT status, count(*) FROM usage GROUP BY status"))
    rows_200 = by_status.get(200, 0)
    ok = client_2xx <= rows_200 <= client_2xx + in_flight
    summary = f"{rows_200:,} rows vs {client_2xx:,} 2xx (+{rows_200 - client_2xx:,}, allowed 0..{in_flight:,})"
    detail = f"usage rows by status: {by_status}"
    return Check(ok, summary, detail)


def _cost(prompt_tokens: int, completion_tokens: int) -> int:
    total = prompt_tokens * PRICE_PROMPT + completion_tokens * PRICE_COMPLETION
    return -(-total // MICRO)


def check_coins(db: Path, shown_json: str, account: str, initial_coins: int) -> Check:
    """``accounts show --json`` coins == initial - sum(usage.cost), and every cost follows the price."""
    shown = Decimal(str(json.loads(shown_json)["coins"]))
    (account_id, balance), = _query(db, "SELECT id, balance FROM accounts WHERE name = ?", (account,))
    rows = _query(db, "SELECT prompt_tokens, completion_tokens, cost FROM usage WHERE account_id = ?",
                  (account_id,))
    spent = sum(cost for _, _, cost in rows)
    mispriced = sum(1 for p, c, cost in rows if _cost(p, c) != cost)
    expected = initial_coins * MICRO - spent
    ok = shown * MICRO == expected == balance and mispriced == 0
    summary = (f"shown {shown} = {initial_coins:,} - {Decimal(spent) / MICRO} spent: "
               f"{'exact' if shown * MICRO == expected else 'MISMATCH'}")
    detail = (f"accounts.balance={balance} expected={expected} shown={shown} rows={len(rows)} "
              f"mispriced rows={mispriced}")
    return Check(ok, summary, detail)

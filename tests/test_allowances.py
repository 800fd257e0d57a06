"""Groups and allowances on the running server, with the clock injected: periods turn without sleeping.

Every scenario ends with the ledger invariant: for every account, the ledger's sum minus the costs in
the daily totals is exactly balance + allowance left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from lumen_proxy.periods import describe, next_start, period_start
from lumen_proxy.store import Refill
from tests.conftest import MakeProxy, Proxy, auth, build_config, config_dict, eventually, query
from tests.fake_upstream import UpstreamServer

MICRO = 1_000_000
BERLIN = ZoneInfo("Europe/Berlin")
USER = [{"role": "user", "content": "hi"}]


def at(text: str, zone: ZoneInfo = BERLIN) -> float:
    """A local wall-clock time in ``zone`` as a Unix timestamp."""
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ledger_problems(database: Path) -> list[tuple[str, int, int, int, int]]:
    """Accounts where sum(ledger) - sum(daily costs) != balance + allowance."""
    rows = query(database, """
        SELECT a.name, a.balance, a.allowance,
               (SELECT coalesce(sum(amount), 0) FROM ledger l WHERE l.account_id = a.id),
               (SELECT coalesce(sum(cost), 0) FROM usage_daily d WHERE d.account_id = a.id)
        FROM accounts a""")
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows if r[3] - r[4] != r[1] + r[2]]


def groups_config(tmp_path: Path, upstream: UpstreamServer, every: str = "month", **top: Any) -> dict[str, Any]:
    data = config_dict(tmp_path, [upstream.base_url], timezone="Europe/Berlin", default_group="students", groups=[
        {"name": "students", "models": ["gpt-4o", "echo"], "limits": {"rpm": 20, "concurrency": 200},
         "allowance": {"coins": 100, "every": every}, "max_keys": 5},
        {"name": "staff", "limits": {"rpm": 120}},
    ], **top)
    return data


async def add(proxy: Proxy, name: str, group: str | None = "students", coins: float = 0) -> str:
    async with proxy.rt.usage.lock:
        await proxy.rt.store.add_account(name, int(coins * MICRO), None, group=group)
    await proxy.rt.view.reload()
    return await proxy.key(name)


def account(proxy: Proxy, name: str) -> Any:
    return query(proxy.rt.config.database, "SELECT * FROM accounts WHERE name = ?", name)[0]


async def me(proxy: Proxy, key: str, http: aiohttp.ClientSession) -> dict[str, Any]:
    async with http.get(proxy.origin + "/lumen/v1/me", headers=auth(key)) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


# -- periods, pure ---------------------------------------------------------------------------------------
def test_month_starts_at_local_midnight() -> None:
    now = at("2026-11-30T23:59:59")
    assert period_start(now, "month", BERLIN) == at("2026-11-01T00:00:00")
    assert next_start(now, "month", BERLIN) == at("2026-12-01T00:00:00")
    assert datetime.fromtimestamp(next_start(now, "month", BERLIN), UTC).hour == 23  # 2026-11-30 23:00 UTC
    assert describe(next_start(now, "month", BERLIN), BERLIN) == "2026-12-01 00:00 Europe/Berlin"
    assert next_start(at("2026-12-15T12:00:00"), "month", BERLIN) == at("2027-01-01T00:00:00")  # the year turns


def test_a_28_day_month() -> None:
    february = at("2027-02-10T10:00:00")
    assert next_start(february, "month", BERLIN) - period_start(february, "month", BERLIN) == 28 * 86400


def test_days_across_dst_changes_are_23_and_25_hours() -> None:
    spring, autumn = at("2026-03-29T12:00:00"), at("2026-10-25T12:00:00")
    assert next_start(spring, "day", BERLIN) - period_start(spring, "day", BERLIN) == 23 * 3600
    assert next_start(autumn, "day", BERLIN) - period_start(autumn, "day", BERLIN) == 25 * 3600
    week = at("2026-03-25T12:00:00")  # Wednesday; the week holds the spring change
    assert period_start(week, "week", BERLIN) == at("2026-03-23T00:00:00")
    assert next_start(week, "week", BERLIN) - period_start(week, "week", BERLIN) == 7 * 86400 - 3600


def test_a_zone_that_skips_midnight() -> None:
    """Chile moves from 00:00 to 01:00 on the first Sunday of September: that day starts at 01:00."""
    santiago = ZoneInfo("America/Santiago")
    start = period_start(at("2026-09-06T12:00:00", santiago), "day", santiago)
    assert datetime.fromtimestamp(start, santiago).strftime("%H:%M") == "01:00"
    before = at("2026-09-05T23:30:00", santiago)
    assert period_start(before, "day", santiago) < start <= next_start(before, "day", santiago)


# -- on the server -------------------------------------------------------------------------------------------
@pytest.fixture
def clock() -> Clock:
    return Clock(at("2026-11-30T22:00:00"))


@pytest.fixture
async def grouped(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, clock: Clock) -> Proxy:
    return await make_proxy(build_config(tmp_path, groups_config(tmp_path, upstream)), clock=clock)


async def test_a_new_account_gets_its_allowance_and_spends_it_first(grouped: Proxy, clock: Clock,
                                                                     http: aiohttp.ClientSession) -> None:
    key = await add(grouped, "ana", coins=5)
    assert await grouped.rt.allowances.refill() == 1
    assert (account(grouped, "ana")["allowance"], account(grouped, "ana")["balance"]) == (100 * MICRO, 5 * MICRO)
    answer = await grouped.sdk(key).chat.completions.create(model="gpt-4o", messages=USER, max_tokens=10)
    await grouped.flush()
    cost = query(grouped.rt.config.database, "SELECT cost FROM usage")[0][0]
    assert answer.usage is not None and cost > 0
    row = account(grouped, "ana")
    assert (row["allowance"], row["balance"]) == (100 * MICRO - cost, 5 * MICRO)  # the allowance went first
    mine = await me(grouped, key, http)
    assert mine["group"] == "students" and mine["coins"] == 5
    assert mine["allowance"] == {"coins": 100, "left": (100 * MICRO - cost) / MICRO, "every": "month",
                                 "resets_at": "2026-12-01T00:00:00+01:00"}
    assert not ledger_problems(grouped.rt.config.database)


async def test_the_period_turns_exactly_once(grouped: Proxy, clock: Clock, make_proxy: MakeProxy,
                                             upstream: UpstreamServer, tmp_path: Path) -> None:
    key = await add(grouped, "ben")
    await grouped.rt.allowances.refill()
    await grouped.sdk(key).chat.completions.create(model="gpt-4o", messages=USER, max_tokens=10)
    await grouped.flush()
    left = account(grouped, "ben")["allowance"]
    assert 0 < left < 100 * MICRO
    clock.now = at("2026-12-01T00:00:01")
    assert await grouped.rt.allowances.refill() == 1
    assert await grouped.rt.allowances.refill() == 0  # once per period
    assert account(grouped, "ben")["allowance"] == 100 * MICRO
    notes = [(r["amount"], r["note"]) for r in query(grouped.rt.config.database,
                                                      "SELECT * FROM ledger ORDER BY id")]
    assert notes[-2:] == [(-left, "allowance expired unspent"), (100 * MICRO, "allowance 2026-12 (students)")]
    clock.now = at("2026-11-30T23:30:00")  # the server's clock goes back (NTP step, skewed VM)
    assert await grouped.rt.allowances.refill() == 0
    clock.now = at("2026-12-20T09:00:00")
    await grouped.server.close()  # a restart in the same period: nothing granted twice
    again = await make_proxy(build_config(tmp_path, groups_config(tmp_path, upstream)), clock=clock)
    assert await again.rt.allowances.refill() == 0
    assert len(query(again.rt.config.database, "SELECT 1 FROM ledger WHERE note LIKE 'allowance 2026-12%'")) == 1
    assert not ledger_problems(again.rt.config.database)


async def test_a_server_down_over_midnight_refills_before_serving(grouped: Proxy, clock: Clock,
                                                                  make_proxy: MakeProxy, upstream: UpstreamServer,
                                                                  tmp_path: Path, http: aiohttp.ClientSession) -> None:
    key = await add(grouped, "cleo")
    await grouped.rt.allowances.refill()
    await grouped.server.close()
    clock.now = at("2027-02-03T08:00:00")  # down over two month starts: one refill, no accumulation
    again = await make_proxy(build_config(tmp_path, groups_config(tmp_path, upstream)), clock=clock)
    row = account(again, "cleo")
    assert row["allowance"] == 100 * MICRO and row["allowance_start"] == at("2027-02-01T00:00:00")
    mine = await me(again, key, http)
    assert mine["allowance"]["resets_at"] == "2027-03-01T00:00:00+01:00"  # February: 28 days
    assert not ledger_problems(again.rt.config.database)


async def test_402_says_when_the_allowance_refills(make_proxy: MakeProxy, upstream: UpstreamServer,
                                                   tmp_path: Path, clock: Clock) -> None:
    data = groups_config(tmp_path, upstream)
    data["groups"][0]["allowance"]["coins"] = 0.000001  # one micro-coin: nothing fits
    proxy = await make_proxy(build_config(tmp_path, data), clock=clock)
    key = await add(proxy, "dan")
    await proxy.rt.allowances.refill()
    with pytest.raises(Exception) as caught:
        await proxy.sdk(key).chat.completions.create(model="gpt-4o", messages=USER, max_tokens=10)
    assert getattr(caught.value, "status_code", None) == 402
    assert "Your allowance of 1e-06 coins refills on 2026-12-01 00:00 Europe/Berlin." in str(caught.value)


async def test_an_account_out_of_coins_at_midnight_is_refilled_at_once(grouped: Proxy, clock: Clock) -> None:
    """The periodic refill has not run yet: the request that finds no coins triggers the account's refill."""
    key = await add(grouped, "eve")
    await grouped.rt.allowances.refill()
    eve = account(grouped, "eve")
    async with grouped.rt.usage.lock:  # as if November's allowance were spent: a zero grant later that month
        await grouped.rt.store.refill([Refill(eve["id"], at("2026-11-01T00:00:01"), 0, 0, "")], now=clock.now)
    await grouped.rt.view.reload()
    assert account(grouped, "eve")["allowance"] == 0
    clock.now = at("2026-12-01T00:00:00")
    answer = await grouped.sdk(key).chat.completions.create(model="gpt-4o", messages=USER, max_tokens=10)
    assert answer.choices
    await grouped.flush()
    granted = query(grouped.rt.config.database, "SELECT 1 FROM ledger WHERE note = 'allowance 2026-12 (students)'")
    assert len(granted) == 1
    assert not ledger_problems(grouped.rt.config.database)


async def test_group_resolution_of_models_and_limits(grouped: Proxy, http: aiohttp.ClientSession) -> None:
    key = await add(grouped, "fay")
    models = [m.id async for m in grouped.sdk(key).models.list()]
    assert models == ["gpt-4o", "echo"]
    async with http.post(grouped.base_url + "/embeddings", headers=auth(key),
                         json={"model": "text-embedding-3-small", "input": "x"}) as response:
        assert response.status == 403
    raw = await grouped.sdk(key).chat.completions.with_raw_response.create(model="echo", messages=USER)
    assert raw.headers["x-ratelimit-limit-requests"] == "20"  # the group's rpm
    async with grouped.rt.usage.lock:
        await grouped.rt.store.update_account("fay", rpm=7, models=["text-embedding-3-small"])
    await grouped.rt.view.reload()
    raw = await grouped.sdk(key).embeddings.with_raw_response.create(model="text-embedding-3-small", input="x")
    assert raw.headers["x-ratelimit-limit-requests"] == "7"  # the account's own, over its group's
    staff_key = await add(grouped, "gus", group="staff", coins=1)
    raw = await grouped.sdk(staff_key).chat.completions.with_raw_response.create(model="echo", messages=USER)
    assert raw.headers["x-ratelimit-limit-requests"] == "120"
    assert len([m async for m in grouped.sdk(staff_key).models.list()]) == 3  # staff: every model


async def test_moving_to_a_group_without_allowance_expires_the_leftover(grouped: Proxy) -> None:
    await add(grouped, "hal", coins=3)
    await grouped.rt.allowances.refill()
    async with grouped.rt.usage.lock:
        await grouped.rt.store.update_account("hal", group="staff")
    await grouped.rt.view.reload()
    assert await grouped.rt.allowances.refill() == 1
    row = account(grouped, "hal")
    assert (row["allowance"], row["balance"]) == (0, 3 * MICRO)
    assert await grouped.rt.allowances.refill() == 0
    assert not ledger_problems(grouped.rt.config.database)


async def test_100_concurrent_requests_across_midnight_never_spend_more_than_there_is(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, clock: Clock) -> None:
    """Allowance 1 coin a day, a balance of 0.5: requests held before midnight keep what they held (the
    refill carries it), requests after it spend the new day's coin, and nothing goes below zero."""
    data = groups_config(tmp_path, upstream, every="day")
    data["groups"][0]["allowance"]["coins"] = 1
    data["groups"][0]["limits"] = {"rpm": 1000, "concurrency": 1000}  # coins are what this is about
    proxy = await make_proxy(build_config(tmp_path, data), clock=clock)
    key = await add(proxy, "ivy", coins=0.5)
    await proxy.rt.allowances.refill()
    gate = upstream.state.behavior.gate = asyncio.Event()
    client = proxy.sdk(key)

    async def one() -> int:
        try:
            await client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=10_000)  # 0.1 coin held
            return 200
        except Exception as exc:
            return int(getattr(exc, "status_code", 0))

    def settled_in(tasks: list[asyncio.Future[int]], at_backend: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:  # every request is either waiting at the backend or answered
            return len(upstream.state.requests) + sum(1 for t in tasks if t.done()) >= at_backend + len(tasks)
        return check

    before = [asyncio.ensure_future(one()) for _ in range(50)]
    assert await eventually(settled_in(before, 0))
    held_before = len(upstream.state.requests)
    ivy = account(proxy, "ivy")["id"]
    per = proxy.rt.wallets.held_by(ivy) // held_before  # each hold: ~0.1 coin (10,000 tokens at 10 per million)
    assert held_before == int(1.5 * MICRO) // per  # the day's coin and the balance, no more
    clock.now = at("2026-12-01T00:00:00")
    await proxy.rt.allowances.refill()
    after = [asyncio.ensure_future(one()) for _ in range(50)]
    assert await eventually(settled_in(after, held_before))
    held_after = len(upstream.state.requests) - held_before
    assert held_after == (int(2.5 * MICRO) - held_before * per) // per  # the new day's coin joins what was left
    gate.set()
    statuses = await asyncio.gather(*before, *after)
    assert statuses.count(200) == held_before + held_after and statuses.count(402) == 100 - statuses.count(200)
    await proxy.flush()
    spent = sum(r[0] for r in query(proxy.rt.config.database, "SELECT cost FROM usage"))
    row = account(proxy, "ivy")
    assert row["balance"] >= 0 and row["allowance"] >= 0
    assert spent <= int(2.5 * MICRO)  # two days' allowance and the balance, at most
    assert not ledger_problems(proxy.rt.config.database)


async def test_a_reload_changes_the_groups(grouped: Proxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    """Groups live in the YAML: a reload (SIGHUP applies the new config this way) changes what members get."""
    key = await add(grouped, "jo")
    raw = await grouped.sdk(key).chat.completions.with_raw_response.create(model="echo", messages=USER)
    assert raw.headers["x-ratelimit-limit-requests"] == "20"
    data = groups_config(tmp_path, upstream)
    data["groups"][0]["limits"] = {"rpm": 5}
    data["groups"][0]["models"] = ["echo"]
    grouped.rt.apply(build_config(tmp_path, data))
    raw = await grouped.sdk(key).chat.completions.with_raw_response.create(model="echo", messages=USER)
    assert raw.headers["x-ratelimit-limit-requests"] == "5"
    assert [m.id async for m in grouped.sdk(key).models.list()] == ["echo"]

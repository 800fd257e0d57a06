"""The Store seam: every implementation keeps these, however many servers and admin commands share it.

Today the only implementation is :class:`lumen_proxy.sqlite_store.SqliteStore`; another one
(PostgreSQL) adds an :class:`Engine` to ``IMPLEMENTATIONS`` and must pass the same tests unchanged.
An engine makes Stores on one fresh storage (each a separate connection, as the server and the admin
CLI have) and knows how its own migrations are recorded; the tests reach the data through the
:class:`~lumen_proxy.store.Store` protocol only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

import pytest

from lumen_proxy.keys import new_key
from lumen_proxy.migrations import MIGRATIONS
from lumen_proxy.sqlite_store import SqliteStore
from lumen_proxy.store import (
    INT64_MAX,
    NoSuchRecord,
    Refill,
    ServerLocked,
    StorageFailure,
    Store,
    StoreDataError,
    StoreError,
    UsageBatch,
    UsageRow,
)

DAY = 1_767_225_600.0  # 2026-01-01 00:00 UTC


class Engine(Protocol):
    async def open(self) -> Store:
        """A connected Store on this engine's storage (another connection each time)."""
        ...

    def migrations(self) -> list[str]:
        """The names of the implementation's own migrations, in order."""
        ...

    def recorded(self) -> list[str]:
        """The migration names the storage records as applied."""
        ...

    def make_older(self, applied: int, account: str) -> None:
        """Storage as an earlier release left it: its first ``applied`` migrations, and ``account``."""
        ...

    def make_newer(self) -> None:
        """Storage a later release migrated: it records a migration this program does not know."""
        ...


class SqliteEngine:
    def __init__(self, folder: Path) -> None:
        self.path = folder / "lumen.db"

    async def open(self) -> Store:
        return await SqliteStore.open(self.path)

    def migrations(self) -> list[str]:
        return [name for name, _sql in MIGRATIONS]

    def recorded(self) -> list[str]:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY rowid")]

    def make_older(self, applied: int, account: str) -> None:
        """As releases before the names left it: the count in ``user_version``."""
        with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
            for _name, sql in MIGRATIONS[:applied]:
                conn.executescript(sql)
            conn.execute(f"PRAGMA user_version = {applied}")
            conn.execute("INSERT INTO accounts (name, created_at) VALUES (?, 1)", (account,))

    def make_newer(self) -> None:
        with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
            conn.execute("INSERT INTO migrations (name, applied_at) VALUES ('m999_from_a_later_release', 1)")


IMPLEMENTATIONS: dict[str, Callable[[Path], Engine]] = {"sqlite": SqliteEngine}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    return IMPLEMENTATIONS[request.param](tmp_path)


@pytest.fixture
async def store(engine: Engine) -> AsyncIterator[Store]:
    """The server's Store."""
    made = await engine.open()
    yield made
    await made.close()


@pytest.fixture
async def other(engine: Engine, store: Store) -> AsyncIterator[Store]:
    """Another Store on the same storage: the admin CLI beside the server (or a second server)."""
    made = await engine.open()
    yield made
    await made.close()


def usage(request_id: str, account_id: int, key_id: int, cost: int, *, status: int = 200,
          model: str = "gpt-4o", day: int = 0) -> UsageRow:
    return UsageRow(request_id=request_id, time=DAY + day * 86400 + 60, account_id=account_id, key_id=key_id,
                    model=model, endpoint="/v1/chat/completions", status=status, prompt_tokens=10 * cost,
                    completion_tokens=cost, cost=cost)


async def spent(store: Store) -> dict[str, int]:
    """Usage cost per account name, from the daily totals."""
    return {r["account"]: r["cost"] for r in await store.usage_report(by="account")}


async def balances(store: Store) -> dict[str, int]:
    return {a.name: a.balance for a in await store.accounts()}


async def two_accounts(store: Store) -> tuple[int, int, int, int]:
    """alice (1,000 micro-coins) and bob (500), a key each: (alice, her key, bob, his key)."""
    alice = await store.add_account("alice", 1_000)
    bob = await store.add_account("bob", 500)
    _, alice_key = await store.create_key("alice")
    _, bob_key = await store.create_key("bob")
    return alice.id, alice_key.id, bob.id, bob_key.id


# -- ledger = balance ---------------------------------------------------------------------------------------
async def test_ledger_equals_balance_after_coins_and_batches(store: Store) -> None:
    alice, alice_key, bob, bob_key = await two_accounts(store)
    await store.add_coins("alice", 250, "top-up")
    await store.add_coins("bob", -100, "refund")
    first = await store.write_batch(UsageBatch([usage("r1", alice, alice_key, 30), usage("r2", bob, bob_key, 7),
                                                usage("r3", alice, alice_key, 12, status=500)]))
    second = await store.write_usage([usage("r4", bob, bob_key, 40, day=1), usage("r5", alice, alice_key, 0)])
    assert first == {alice: 42, bob: 7}
    assert second[bob] == 40 and second.get(alice, 0) == 0
    ledger = {"alice": 1_000 + 250, "bob": 500 - 100}
    assert await spent(store) == {"alice": 42, "bob": 47}
    assert await balances(store) == {name: ledger[name] - cost for name, cost in (await spent(store)).items()}


async def test_a_batch_written_twice_charges_once(store: Store) -> None:
    """The reply of a commit lost on the way back: the caller retries a batch that is already in."""
    alice, alice_key, bob, bob_key = await two_accounts(store)
    batch = UsageBatch([usage("r1", alice, alice_key, 30), usage("r2", bob, bob_key, 7)])
    assert await store.write_batch(batch) == {alice: 30, bob: 7}
    before = (await balances(store), await store.usage_report(by="key"))
    assert await store.write_batch(batch) == {}
    assert (await balances(store), await store.usage_report(by="key")) == before
    assert [len(await store.usage_rows(r)) for r in ("r1", "r2")] == [1, 1]
    assert await balances(store) == {"alice": 970, "bob": 493}


async def test_a_batch_overlapping_an_earlier_one_charges_only_its_new_rows(store: Store) -> None:
    alice, alice_key, bob, bob_key = await two_accounts(store)
    rows = [usage(f"r{i}", alice if i % 2 else bob, alice_key if i % 2 else bob_key, 10 + i) for i in range(6)]
    await store.write_batch(UsageBatch(rows[:3]))
    assert await store.write_batch(UsageBatch(rows[1:6])) == {alice: 13 + 15, bob: 14}
    assert await store.present_request_ids([r.request_id for r in rows] + ["r-unknown"]) == {
        r.request_id for r in rows}
    assert sum(r["requests"] for r in await store.usage_report()) == 6
    assert await spent(store) == {"alice": 11 + 13 + 15, "bob": 10 + 12 + 14}
    assert await balances(store) == {"alice": 1_000 - 39, "bob": 500 - 36}


@pytest.mark.parametrize("bad", ["no request id", "debits over 64 bits"])
async def test_a_batch_the_store_refuses_stores_nothing(store: Store, bad: str) -> None:
    alice, alice_key, bob, bob_key = await two_accounts(store)
    rows = [usage("r1", bob, bob_key, 5), usage("r2", alice, alice_key, 30)]
    if bad == "no request id":
        rows.append(dataclasses.replace(usage("r3", alice, alice_key, 1), request_id=None))  # type: ignore[arg-type]
    else:  # each row fits, their sum does not
        rows += [usage("r3", alice, alice_key, INT64_MAX), usage("r4", alice, alice_key, INT64_MAX)]
    with pytest.raises(StoreDataError):
        await store.write_batch(UsageBatch(rows))
    assert await balances(store) == {"alice": 1_000, "bob": 500}
    assert await store.usage_report() == []
    assert await store.present_request_ids(["r1", "r2"]) == set()


# -- what another writer commits ----------------------------------------------------------------------------
CHANGES: dict[str, Callable[[Store, str], Awaitable[object]]] = {
    "add an account": lambda admin, key: admin.add_account("carol", 5),
    "create a key": lambda admin, key: admin.create_key("alice", "new"),
    "revoke a key": lambda admin, key: admin.revoke_key(key),
    "add coins": lambda admin, key: admin.add_coins("alice", 77),
    "set models": lambda admin, key: admin.update_account("alice", models=["echo"]),
    "disable an account": lambda admin, key: admin.update_account("alice", enabled=False),
}


async def view_of(store: Store) -> tuple[dict[str, tuple[object, ...]], set[str]]:
    accounts, keys = await store.load_view()
    return {a.name: (a.balance, a.models, a.enabled) for a in accounts}, {k.hash for k in keys}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
async def test_a_change_by_another_writer_moves_the_generation_and_shows_in_the_view(
        store: Store, other: Store, change: Callable[[Store, str], Awaitable[object]]) -> None:
    await store.add_account("alice", 100)
    key, _row = await store.create_key("alice")
    generation, view = await store.generation(), await view_of(store)
    await change(other, key)
    assert await store.generation() != generation
    assert await view_of(store) != view
    assert await view_of(store) == await view_of(other)


async def test_revoked_and_created_keys_in_the_view(store: Store, other: Store) -> None:
    await store.add_account("alice", 100)
    old, old_row = await store.create_key("alice")
    await other.revoke_key(str(old_row.id))
    new, new_row = await other.create_key("alice")
    _accounts, keys = await store.load_view()
    assert [k.id for k in keys] == [new_row.id]
    assert (await store.find_key(old)).revoked_at is not None and (await store.find_key(new)).revoked_at is None


async def test_the_change_feed_shows_another_writers_commit_in_its_next_look(store: Store, other: Store) -> None:
    interval = 0.02
    feed = store.changes(interval)
    try:
        first = await anext(feed)
        await other.add_account("carol", 5)
        started = time.monotonic()
        assert await anext(feed) != first
        assert time.monotonic() - started < interval + 0.5
    finally:
        await feed.aclose()  # type: ignore[attr-defined]


async def test_the_change_feed_reports_a_failure_and_goes_on(store: Store, engine: Engine) -> None:
    feed = store.changes(0.01)
    try:
        assert isinstance(await anext(feed), int)
        await store.close()
        assert isinstance(await anext(feed), StorageFailure)
        await store.connect()
        assert isinstance(await anext(feed), int)
    finally:
        await feed.aclose()  # type: ignore[attr-defined]


# -- errors are Lumen's own ---------------------------------------------------------------------------------
async def test_a_missing_record_a_duplicate_and_a_closed_store(store: Store) -> None:
    await store.add_account("alice", 1)
    for missing in (store.account("bob"), store.account_by_id(999), store.find_key(new_key()),
                    store.find_key("999"), store.keys("bob"), store.add_coins("bob", 1)):
        with pytest.raises(NoSuchRecord):
            await missing
    with pytest.raises(StoreError) as caught:
        await store.add_account("alice", 1)
    assert not isinstance(caught.value, NoSuchRecord | StorageFailure)
    await store.close()
    with pytest.raises(StorageFailure):
        await store.accounts()
    await store.connect()  # for the fixture's close


# -- migrations, by name -----------------------------------------------------------------------------------
async def test_migrations_are_recorded_by_name_and_run_once(engine: Engine, store: Store) -> None:
    assert engine.recorded() == engine.migrations()
    again = await engine.open()
    await again.close()
    assert engine.recorded() == engine.migrations()


@pytest.mark.parametrize("applied", [1, len(MIGRATIONS) - 1])
async def test_an_older_storage_is_upgraded_with_its_data(engine: Engine, applied: int) -> None:
    engine.make_older(applied, "old")
    store = await engine.open()
    try:
        assert (await store.account("old")).balance == 0
        assert engine.recorded() == engine.migrations()
    finally:
        await store.close()


async def test_a_newer_storage_is_refused(engine: Engine) -> None:
    await (await engine.open()).close()
    engine.make_newer()
    with pytest.raises(StoreError, match="newer"):
        await engine.open()


# -- one server per store ----------------------------------------------------------------------------------
async def test_claim_admits_one_server_at_a_time(store: Store, other: Store) -> None:
    claim = await store.claim()
    with pytest.raises(ServerLocked):
        await other.claim()
    await claim.release()
    again = await other.claim()
    await again.release()


async def test_the_start_check_commits_and_reports_read_committed_data(store: Store, other: Store) -> None:
    await store.check_writable(within=1.0)
    alice, alice_key, _bob, _bob_key = await two_accounts(store)
    await store.write_batch(UsageBatch([usage("r1", alice, alice_key, 3), usage("r2", alice, alice_key, 4, day=2)]))
    assert [(r["day"], r["requests"], r["cost"]) for r in await other.usage_report(alice)] == [
        ("2026-01-01", 1, 3), ("2026-01-03", 1, 4)]
    assert await other.prune_usage(DAY + 86400) == 1
    assert await store.usage_rows("r1") == [] and len(await store.usage_rows("r2")) == 1
    assert [r["cost"] for r in await store.usage_report(alice, since="2026-01-01", by="model")] == [7]  # totals stay



async def test_max_active_keys_hold_against_two_writers_at_once(store: Store, other: Store) -> None:
    """Two admins (or a double-clicked portal button) creating the last allowed key at once: one wins."""
    await store.add_account("alice", 0)
    await store.create_key("alice", "old", expires_at=1.0, now=0.5)  # expired: does not count
    results = await asyncio.gather(store.create_key("alice", "a", max_active=1),
                                   other.create_key("alice", "b", max_active=1), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["TooManyKeys", "tuple"]
    assert [k.label for k, _ in await store.keys("alice") if k.expires_at is None] in (["a"], ["b"])


async def test_allowance_is_spent_before_the_balance_and_refilled_once(store: Store, other: Store) -> None:
    account = await store.add_account("alice", 500, group="students")
    key, row = await store.create_key("alice")
    grant = Refill(account.id, DAY, 1_000, 0, "allowance")
    assert await store.refill([grant]) == [grant]
    assert await other.refill([grant]) == []  # the same period, from another writer: nothing twice
    await store.write_usage([usage("r1", account.id, row.id, 1_200)])
    alice = await store.account("alice")
    assert (alice.allowance, alice.balance) == (0, 300)
    later = Refill(account.id, DAY + 86400, 1_000, 0, "allowance 2")
    assert await store.refill([later]) == [later]
    assert (await store.account("alice")).allowance == 1_000

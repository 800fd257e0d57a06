"""The usage writer keeps the log flowing past a bad row, and a stop says when it could not write.

A row that does not fit SQLite's INTEGER (or that SQLite refuses for any reason of its own data) is
quarantined: one JSON line in ``<database>.quarantine.jsonl``, one ERROR log line, not billed. Every
other row, of every account, in the same batch and in later ones, is committed, and the balances stay
equal to the ledger. The rows are recorded the way the relay records them (cost settled into pending,
then ``record``); the relay itself will cap absurd usage, so injecting is the only way to get one here.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from lumen_proxy import usagelog
from lumen_proxy.server import report_stop
from lumen_proxy.store import UsageRow
from lumen_proxy.usagelog import quarantine_path, spill_path
from tests.conftest import MakeProxy, Proxy, build_config, config_dict, eventually, query
from tests.fake_upstream import UpstreamServer
from tests.test_billing import ledger_mismatches

HELLO = [{"role": "user", "content": "Hello there, how are you"}]
TOP = 2**63 - 1  # SQLite's largest INTEGER


@pytest.fixture
async def manual(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> Proxy:
    """The real app whose writer loop stays out of the way (hourly): the test decides when batches commit."""
    config = build_config(tmp_path, config_dict(tmp_path, [upstream.base_url]))
    return await make_proxy(config, usage_interval=3600, access_log=io.StringIO())


async def chat(proxy: Proxy, key: str) -> str:
    raw = await proxy.sdk(key).chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    return raw.headers["x-request-id"]


async def keys(proxy: Proxy, *names: str) -> dict[str, str]:
    made = {}
    for name in names:
        await proxy.account(name)
        made[name] = await proxy.key(name)
    return made


def inject(proxy: Proxy, key: str, **values: Any) -> UsageRow:
    """Record a row as the relay does: its cost settled into pending first (the hold), then ``record``."""
    principal = proxy.rt.view.authenticate(f"Bearer {key}")
    fields: dict[str, Any] = {"request_id": "req_injected", "time": time.time(), "account_id": principal.account.id,
                              "key_id": principal.key_id, "model": "gpt-4o", "endpoint": "/v1/chat/completions",
                              "status": 200}
    row = UsageRow(**{**fields, **values})
    hold = proxy.rt.wallets.place_hold(principal.account.id, 0)
    assert hold is not None
    proxy.rt.wallets.settle(hold, row.cost if isinstance(row.cost, int) else 0)
    proxy.rt.usage.record(row, principal.account.name)
    return row


def quarantined(proxy: Proxy) -> list[dict[str, Any]]:
    path = quarantine_path(proxy.rt.config.database)
    return [json.loads(line) for line in path.read_text().splitlines()]


def committed_ids(proxy: Proxy) -> set[str]:
    return {r["request_id"] for r in query(proxy.rt.config.database, "SELECT request_id FROM usage")}


def assert_books_balance(proxy: Proxy) -> None:
    """Ledger = balance in the database, the wallets agree with it, nothing stuck in pending."""
    database = proxy.rt.config.database
    assert ledger_mismatches(database) == []
    balances = {r["id"]: r["balance"] for r in query(database, "SELECT id, balance FROM accounts")}
    assert proxy.rt.wallets.balance == balances
    assert proxy.rt.wallets.pending == {} and proxy.rt.wallets.held == {}
    assert query(database, "SELECT 1 FROM accounts WHERE typeof(balance) != 'integer'") == []


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]


# -- rows that do not fit are quarantined when recorded ------------------------------------------------------
UNFIT = {
    "2**63 prompt tokens": ("prompt_tokens", 2**63),
    "2**70 completion tokens": ("completion_tokens", 2**70),
    "cost over 2**63 micro-coins": ("cost", 2**63),
    "negative prompt tokens": ("prompt_tokens", -1),
    "negative cost": ("cost", -5),
    "bool tokens": ("completion_tokens", True),
    "float tokens": ("prompt_tokens", 1.5),
    "text cost": ("cost", "7"),
    "status 1000": ("status", 1000),
    "text key id": ("key_id", "3"),
}


@pytest.mark.parametrize("field,value", UNFIT.values(), ids=UNFIT.keys())
async def test_a_row_that_does_not_fit_is_quarantined_and_the_batch_commits(
        manual: Proxy, caplog: pytest.LogCaptureFixture, field: str, value: Any) -> None:
    people = await keys(manual, "alice", "bob")
    before = [await chat(manual, people["alice"]), await chat(manual, people["bob"])]
    inject(manual, people["alice"], request_id="req_unfit", **{field: value})
    after = [await chat(manual, people["bob"]), await chat(manual, people["alice"])]
    assert manual.rt.usage.queued == 4  # never batched

    await manual.flush()
    assert committed_ids(manual) == {*before, *after}
    assert_books_balance(manual)
    [entry] = quarantined(manual)
    assert entry["row"]["request_id"] == "req_unfit"
    assert entry["row"][field] == value and type(entry["row"][field]) is type(value)  # exact, however large
    assert field in entry["reason"] and "prompt" not in entry
    assert stat.S_IMODE(quarantine_path(manual.rt.config.database).stat().st_mode) == 0o600
    [line] = error_lines(caplog)
    assert "req_unfit" in line and field in line and "quarantined" in line
    access_log = manual.rt.usage.access_log
    assert isinstance(access_log, io.StringIO)
    access = [json.loads(x) for x in access_log.getvalue().splitlines()]
    assert [a["request_id"] for a in access] == [*before, "req_unfit", *after]  # every request has its line
    assert all(a["capped"] is False for a in access)


async def test_a_row_that_cannot_even_be_prepared_is_quarantined_when_recorded(
        manual: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    """A time that is not a number: record() must not raise into the handler's finally."""
    people = await keys(manual, "alice")
    inject(manual, people["alice"], request_id="req_nan", time=math.nan, cost=12)
    good = await chat(manual, people["alice"])
    await manual.flush()
    assert committed_ids(manual) == {good}
    assert_books_balance(manual)
    assert [e["row"]["request_id"] for e in quarantined(manual)] == ["req_nan"]
    assert any("req_nan" in line for line in error_lines(caplog))


# -- rows SQLite refuses inside a batch are isolated -----------------------------------------------------------
REFUSED = {  # (values, whether record()'s check must be bypassed to get the row into a batch)
    "no request id (NOT NULL)": ({"request_id": None}, False),
    "unencodable model name": ({"model": "gpt-\ud800"}, False),
    "unsupported key id type": ({"key_id": 1.0 + 0j}, True),
    "negative cost (CHECK)": ({"cost": -5}, True),
    "2**63 tokens (overflow)": ({"prompt_tokens": 2**63}, True),
}


@pytest.mark.parametrize("values,bypass", REFUSED.values(), ids=REFUSED.keys())
async def test_a_row_sqlite_refuses_is_quarantined_and_every_other_row_commits(
        manual: Proxy, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        values: dict[str, Any], bypass: bool) -> None:
    if bypass:  # a row that slipped past record()'s check: the writer is the last line of defence
        monkeypatch.setattr(usagelog, "usage_row_problem", lambda row: None)
    people = await keys(manual, "alice", "bob", "carol")
    first = [await chat(manual, people[name]) for name in ("alice", "bob", "carol", "alice")]
    bad = inject(manual, people["bob"], **{"request_id": "req_refused", **values})
    first += [await chat(manual, people[name]) for name in ("carol", "bob", "alice")]
    assert manual.rt.usage.queued == 8  # in the same batch as seven good rows of three accounts

    await manual.flush()
    good = set(first)
    assert committed_ids(manual) == good
    later = [await chat(manual, people[name]) for name in ("bob", "alice", "carol")]
    await manual.flush()
    assert committed_ids(manual) == good | set(later)  # later batches flow
    assert manual.rt.usage.queued == 0
    assert_books_balance(manual)
    [entry] = quarantined(manual)
    assert entry["row"]["account_id"] == bad.account_id
    assert "SQLite refused the row" in entry["reason"]
    [line] = error_lines(caplog)
    assert f"usage row {bad.request_id} quarantined" in line


@pytest.mark.parametrize("together", [True, False], ids=["same batch", "separate batches"])
@pytest.mark.parametrize("field,table,column", [("cost", "accounts", "balance"),
                                                ("prompt_tokens", "usage_daily", "prompt_tokens")])
async def test_a_row_that_would_overflow_a_total_is_quarantined_not_stored_as_a_float(
        manual: Proxy, caplog: pytest.LogCaptureFixture, field: str, table: str, column: str,
        together: bool) -> None:
    """Each row fits, their sum does not: SQLite would silently store an inexact REAL."""
    people = await keys(manual, "alice")
    inject(manual, people["alice"], request_id="req_first", **{field: TOP})
    if not together:
        await manual.flush()
    inject(manual, people["alice"], request_id="req_second", **{field: TOP})
    await manual.flush()
    assert committed_ids(manual) == {"req_first"}
    assert [e["row"]["request_id"] for e in quarantined(manual)] == ["req_second"]
    assert query(manual.rt.config.database, f"SELECT typeof({column}) AS t FROM {table}")[0]["t"] == "integer"
    assert_books_balance(manual)
    assert any("req_second" in line and column in line for line in error_lines(caplog))


# -- a stop that cannot write --------------------------------------------------------------------------------
async def test_close_spills_the_rows_it_could_not_write_within_its_bound(
        manual: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    people = await keys(manual, "alice")
    ids = [await chat(manual, people["alice"]) for _ in range(3)]
    database = manual.rt.config.database
    locker = sqlite3.connect(database, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # a backup or an admin's shell holding the write lock
    try:
        started = time.monotonic()
        assert await manual.rt.usage.close(within=0.5) == 3
        assert time.monotonic() - started < 2
    finally:
        locker.rollback()
        locker.close()
    usage = manual.rt.usage
    assert (usage.spilled, usage.unwritten, usage.queued) == (3, 0, 0)
    assert committed_ids(manual) == set()
    spilled = [json.loads(line) for line in spill_path(database).read_text().splitlines()]
    rows = [UsageRow(**entry["row"]) for entry in spilled]  # every field, as recorded
    assert [r.request_id for r in rows] == ids
    access_log = usage.access_log
    assert isinstance(access_log, io.StringIO)
    assert [r.cost for r in rows] == [round(json.loads(x)["cost"] * 1e6) for x in access_log.getvalue().splitlines()]
    assert all(r.cost > 0 and r.prompt_tokens > 0 for r in rows)
    assert stat.S_IMODE(spill_path(database).stat().st_mode) == 0o600
    caplog.clear()
    assert report_stop(usage) == 1
    [record] = caplog.records
    assert (record.levelno, record.getMessage()) == (logging.ERROR, (
        f"stopped; 3 usage rows could not be written to the database and were spilled to {spill_path(database)}: "
        "not lost, the next start bills them (0 rows written)"))


async def test_a_spill_that_cannot_be_written_says_the_rows_are_lost_with_counts(
        manual: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    people = await keys(manual, "alice")
    await chat(manual, people["alice"])
    await manual.flush()
    for _ in range(2):
        await chat(manual, people["alice"])
    spill_path(manual.rt.config.database).mkdir()  # not a file: even root cannot append to it
    locker = sqlite3.connect(manual.rt.config.database, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        assert await manual.rt.usage.close(within=0.2) == 2
    finally:
        locker.rollback()
        locker.close()
    assert (manual.rt.usage.spilled, manual.rt.usage.unwritten) == (0, 2)
    caplog.clear()
    assert report_stop(manual.rt.usage) == 1
    [record] = caplog.records
    assert (record.levelno, record.getMessage()) == (logging.ERROR, (
        "stopped; 2 usage rows could NOT be written and are lost (not billed; their JSON lines are on stdout): "
        f"the database refused them and cannot write {spill_path(manual.rt.config.database)}: Is a directory "
        "(1 rows written)"))


async def test_a_stop_after_a_quarantine_is_not_lossy_and_names_the_file(
        manual: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    people = await keys(manual, "alice")
    await chat(manual, people["alice"])
    inject(manual, people["alice"], request_id="req_unfit", prompt_tokens=2**64)
    assert await manual.rt.usage.close() == 0
    caplog.clear()
    assert report_stop(manual.rt.usage) == 0
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (f"stopped; usage log flushed (1 rows; 1 quarantined in "
                                   f"{quarantine_path(manual.rt.config.database)})")


async def test_the_writer_loop_keeps_going_after_a_quarantine(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    """The background task (not a manual flush) commits the good rows within its interval."""
    proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url])))
    people = await keys(proxy, "alice")
    inject(proxy, people["alice"], request_id=None)
    ids = {await chat(proxy, people["alice"]) for _ in range(3)}

    async def all_committed() -> bool:
        return committed_ids(proxy) == ids

    assert await eventually(all_committed, within=1), "the writer stopped"
    assert proxy.rt.usage.failures == 0 and proxy.rt.usage.quarantined == 1


def test_readme_states_the_quarantine_file_and_the_stop_bound(tmp_path: Path) -> None:
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert quarantine_path(tmp_path / "lumen.db") == tmp_path / "lumen.db.quarantine.jsonl"
    assert "`<database>.quarantine.jsonl` (mode 0600" in readme
    assert f"keeps trying for up to {usagelog.CLOSE_WITHIN:g} s" in readme
    assert spill_path(tmp_path / "lumen.db") == tmp_path / "lumen.db.spill.jsonl"
    assert "`<database>.spill.jsonl` (mode 0600" in readme
    assert "were spilled to PATH: not lost, the next start bills them` and exits **1**" in readme
    assert "usage rows could NOT be written and are lost` and exit **1**" in readme

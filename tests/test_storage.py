"""Storage fails closed, and nothing billed is ever lost.

A database the server cannot write refuses its start; usage writes that keep failing turn /healthz to
503 and, past the ``usage_backlog`` bound, refuse new requests with 503 ``storage_unavailable`` and
``Retry-After`` (never a free pass) until a write succeeds; a stop that cannot commit its rows spills
them beside the database, and the next start bills them exactly once. Reports read committed data.

Failing writes are simulated in-process (the store's write raising "database or disk is full", with
a monotonic clock moved by hand), or for the real process by another connection holding the write
lock (``BEGIN EXCLUSIVE``): that refuses writers even to root, unlike chmod, on any file system.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sqlite3
import stat
import time
import timeit
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from lumen_proxy.config import ConfigError
from lumen_proxy.runtime import START_CHECK_WITHIN
from lumen_proxy.store import StorageFailure, StoreError, UsageBatch, UsageRow
from lumen_proxy.usagelog import RETRY_AFTER, coins_text, quarantine_path, spill_path
from tests.conftest import (
    LumenProcess,
    MakeProxy,
    Proxy,
    auth,
    build_config,
    cli,
    config_dict,
    eventually,
    query,
    write_config,
)
from tests.fake_upstream import UpstreamServer
from tests.test_billing import ledger_mismatches

HELLO = [{"role": "user", "content": "Hello there, how are you"}]
CHAT = {"model": "gpt-4o", "messages": HELLO}


class Clock:
    """The server's monotonic clock, moved by hand: how long writes have failed, without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Disk:
    """The store's batch write, failing as a full disk does while ``full`` is set."""

    def __init__(self, proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        self._write = proxy.rt.store.write_batch
        monkeypatch.setattr(proxy.rt.store, "write_batch", self.write_batch)

    async def write_batch(self, batch: UsageBatch) -> dict[int, int]:
        if self.full:
            raise StorageFailure("database or disk is full")
        return await self._write(batch)


@contextmanager
def write_locked(database: Path) -> Iterator[None]:
    """Another connection holds the database's write lock (a long transaction, an admin's sqlite3 shell)."""
    locker = sqlite3.connect(database, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        locker.rollback()
        locker.close()


async def manual_proxy(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, **app: Any) -> Proxy:
    """The real app whose writer loop stays out of the way (hourly): the test decides when batches commit."""
    top = {"usage_backlog": app.pop("usage_backlog")} if "usage_backlog" in app else {}
    config = build_config(tmp_path, config_dict(tmp_path, [upstream.base_url], **top))
    return await make_proxy(config, usage_interval=app.pop("usage_interval", 3600), access_log=io.StringIO(), **app)


async def new_key(proxy: Proxy, name: str = "alice") -> str:
    await proxy.account(name)
    return await proxy.key(name)


async def post_chat(proxy: Proxy, key: str) -> tuple[int, Mapping[str, str], dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(
            proxy.base_url + "/chat/completions", json=CHAT, headers=auth(key)) as response:
        return response.status, response.headers, await response.json()


async def chat(proxy: Proxy, key: str) -> str:
    status, headers, body = await post_chat(proxy, key)
    assert status == 200, body
    return headers["x-request-id"]


async def healthz(proxy: Proxy) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(proxy.origin + "/healthz") as response:
        return response.status, await response.json()


def chats_upstream(upstream: UpstreamServer) -> int:
    return len(upstream.state.requests_to("/v1/chat/completions"))


def committed_ids(database: Path) -> list[str]:
    return [r["request_id"] for r in query(database, "SELECT request_id FROM usage ORDER BY id")]


def assert_refused(response: tuple[int, Mapping[str, str], dict[str, Any]]) -> None:
    status, headers, body = response
    assert status == 503
    assert body["error"]["code"] == "storage_unavailable"
    assert headers["Retry-After"] == str(RETRY_AFTER)


# -- a start that cannot write -------------------------------------------------------------------------------
async def test_a_database_that_cannot_be_written_refuses_the_start_with_one_line(
        serve_config: Path, lumen_process: Callable[..., LumenProcess]) -> None:
    """Reads still work (WAL), so only a real write shows it: the start commits a heartbeat first."""
    assert cli("accounts", "add", "alice", config=serve_config).returncode == 0
    database = serve_config.parent / "lumen.db"
    with write_locked(database):
        started = time.monotonic()
        server = lumen_process(serve_config, wait=False)
        code = await asyncio.to_thread(server.process.wait, 15)
        waited = time.monotonic() - started
    assert code == 1
    assert server.stderr_text().splitlines() == [
        f"lumen-proxy ERROR: cannot write the database {database}: another connection held its write lock for "
        f"over {START_CHECK_WITHIN:g} s (a long transaction, an open sqlite3 shell?); try again"]
    assert START_CHECK_WITHIN <= waited < START_CHECK_WITHIN + 8
    assert query(database, "SELECT * FROM heartbeat") == []


# -- writes that keep failing ---------------------------------------------------------------------------------
async def test_failing_usage_writes_degrade_healthz_then_refuse_new_requests_until_writes_work(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    proxy = await manual_proxy(make_proxy, upstream, tmp_path, monotonic=clock,
                               usage_backlog={"seconds": 30, "rows": 1000})
    key = await new_key(proxy)
    disk = Disk(proxy, monkeypatch)
    status, body = await healthz(proxy)
    assert (status, body["usage_log"]) == (200, {"ok": True, "failing_for_s": 0.0, "rows_waiting": 0,
                                                 "refusing": False})

    disk.full = True
    admitted = [await chat(proxy, key)]
    with pytest.raises(StorageFailure, match="disk is full"):
        await proxy.flush()
    status, body = await healthz(proxy)
    assert (status, body["status"]) == (503, "degraded")
    assert body["usage_log"] == {"ok": False, "failing_for_s": 0.0, "rows_waiting": 1, "refusing": False}
    assert body["database"] is True  # reading works; writing does not

    clock.now += 30  # at the bound: still served
    admitted.append(await chat(proxy, key))
    assert (await healthz(proxy))[1]["usage_log"] == {"ok": False, "failing_for_s": 30.0, "rows_waiting": 2,
                                                      "refusing": False}
    clock.now += 0.5  # over it
    before = chats_upstream(upstream)
    assert_refused(await post_chat(proxy, key))
    assert chats_upstream(upstream) == before  # refused before any backend was asked
    assert (await healthz(proxy))[1]["usage_log"]["refusing"] is True

    disk.full = False
    assert await proxy.rt.usage.flush() == 2
    status, body = await healthz(proxy)
    assert (status, body["usage_log"]) == (200, {"ok": True, "failing_for_s": 0.0, "rows_waiting": 0,
                                                 "refusing": False})
    admitted.append(await chat(proxy, key))
    await proxy.flush()
    assert committed_ids(proxy.rt.config.database) == admitted  # the refused request has no row, costs nothing
    assert ledger_mismatches(proxy.rt.config.database) == []
    assert proxy.rt.wallets.pending == {}


async def test_a_backlog_over_its_row_bound_is_refused_before_its_time_bound(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = await manual_proxy(make_proxy, upstream, tmp_path, monotonic=Clock(),
                               usage_backlog={"seconds": 3600, "rows": 3})
    key = await new_key(proxy)
    disk = Disk(proxy, monkeypatch)
    disk.full = True
    admitted = [await chat(proxy, key)]
    with pytest.raises(StorageFailure):
        await proxy.flush()
    admitted += [await chat(proxy, key), await chat(proxy, key)]  # 3 rows wait: at the bound
    assert_refused(await post_chat(proxy, key))
    assert (await healthz(proxy))[1]["usage_log"] == {"ok": False, "failing_for_s": 0.0, "rows_waiting": 3,
                                                      "refusing": True}
    disk.full = False
    await proxy.flush()
    admitted.append(await chat(proxy, key))
    await proxy.flush()
    assert committed_ids(proxy.rt.config.database) == admitted
    assert ledger_mismatches(proxy.rt.config.database) == []


async def test_the_writer_loop_refuses_past_the_bound_and_recovers_by_itself(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The background task (no manual flush, the real clock): a short bound, and a log that does not flood."""
    proxy = await manual_proxy(make_proxy, upstream, tmp_path, usage_interval=0.01,
                               usage_backlog={"seconds": 0.2, "rows": 1000})
    key = await new_key(proxy)
    disk = Disk(proxy, monkeypatch)
    disk.full = True
    admitted = [await chat(proxy, key)]

    async def refusing() -> bool:
        return bool((await healthz(proxy))[1]["usage_log"]["refusing"])

    assert await eventually(refusing, within=3)
    assert_refused(await post_chat(proxy, key))
    failures = proxy.rt.usage.failures
    disk.full = False

    async def serving() -> bool:
        return (await healthz(proxy))[0] == 200

    assert await eventually(serving, within=3)
    admitted.append(await chat(proxy, key))

    async def all_committed() -> bool:
        return committed_ids(proxy.rt.config.database) == admitted

    assert await eventually(all_committed, within=2)
    assert failures > 10  # retried every interval...
    errors = [r.getMessage() for r in caplog.records if r.name == "lumen_proxy" and r.levelname == "ERROR"]
    assert len(errors) == 2, errors  # ...but logged once, and once more when it began refusing
    assert "(1 rows waiting, will retry; requests are refused after 0.2 s" in errors[0]
    assert "new requests get 503 until a write succeeds): database or disk is full" in errors[1]
    assert any(r.getMessage().startswith("usage log written again after failing for") for r in caplog.records)


async def test_the_admission_check_costs_well_under_a_microsecond_while_writes_work(proxy: Proxy) -> None:
    refusal = proxy.rt.usage.refusal
    assert refusal() is None
    best = min(timeit.repeat(refusal, number=100_000, repeat=5)) / 100_000
    assert best < 0.3e-6, f"{best * 1e9:.0f} ns per call"


def test_the_backlog_bound_is_checked_like_every_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(tmp_path, config_dict(tmp_path, ["http://127.0.0.1:9/v1"], usage_backlog={"rows": -1}))
    assert caught.value.path == "usage_backlog.rows"
    with pytest.raises(ConfigError) as caught:
        build_config(tmp_path, config_dict(tmp_path, ["http://127.0.0.1:9/v1"], usage_backlog={"minutes": 1}))
    assert caught.value.path == "usage_backlog.minutes"
    default = build_config(tmp_path, config_dict(tmp_path, ["http://127.0.0.1:9/v1"])).usage_backlog
    assert (default.seconds, default.rows) == (30.0, 10_000)


# -- a stop that cannot write, and the next start ------------------------------------------------------------
async def test_a_stop_that_cannot_write_spills_and_the_next_start_bills_the_rows_exactly_once(
        tmp_path: Path, lumen_process: Callable[..., LumenProcess]) -> None:
    data = {"database": "lumen.db", "shutdown_grace": 5,
            "models": [{"name": "echo", "backends": [{"url": "builtin:echo"}],
                        "price": {"prompt": 1000, "completion": 2000}}]}
    config = write_config(tmp_path, data)
    database, spill = tmp_path / "lumen.db", spill_path(tmp_path / "lumen.db")
    assert cli("accounts", "add", "alice", "--coins", "100", config=config).returncode == 0
    key = cli("keys", "create", "alice", config=config).stdout.strip()
    first = await asyncio.to_thread(lumen_process, config)
    with write_locked(database):  # from before the requests until after the stop
        async with openai.AsyncOpenAI(api_key=key, base_url=first.base_url, max_retries=0) as client:
            ids = [(await client.chat.completions.with_raw_response.create(model="echo", messages=HELLO)).request_id
                   for _ in range(3)]
        first.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.process.wait, 20) == 1
    log = first.stderr_text()
    assert (f"ERROR: stopped; 3 usage rows could not be written to the database and were spilled to {spill}: "
            "not lost, the next start bills them (0 rows written)") in log
    assert "usage log flushed" not in log and "lost (not billed" not in log
    assert committed_ids(database) == []
    spilled = [json.loads(line)["row"] for line in spill.read_text().splitlines()]
    assert [row["request_id"] for row in spilled] == ids
    assert stat.S_IMODE(spill.stat().st_mode) == 0o600
    cost = sum(row["cost"] for row in spilled)
    assert cost > 0

    second = await asyncio.to_thread(lumen_process, config)  # serves only once the rows are billed
    assert f"replayed 3 usage rows ({coins_text(cost)} coins) from {spill}" in second.stderr_text()
    assert not spill.exists()
    assert committed_ids(database) == ids
    assert ledger_mismatches(database) == []
    assert query(database, "SELECT balance FROM accounts")[0]["balance"] == 100_000_000 - cost
    second.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(second.process.wait, 15) == 0

    third = await asyncio.to_thread(lumen_process, config)
    assert query(database, "SELECT pid FROM heartbeat")[0]["pid"] == third.process.pid  # its start check
    third.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(third.process.wait, 15) == 0
    assert "replayed" not in third.stderr_text()
    assert committed_ids(database) == ids
    assert ledger_mismatches(database) == []


async def spilled_proxy(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> tuple[list[UsageRow], int]:
    """Three requests of alice whose stop spilled them (the database locked), and the server gone:
    the spilled rows, and alice's balance without them."""
    proxy = await manual_proxy(make_proxy, upstream, tmp_path)
    key = await new_key(proxy)
    ids = [await chat(proxy, key) for _ in range(3)]
    with write_locked(proxy.rt.config.database):
        assert await proxy.rt.usage.close(within=0.2) == 3
    await proxy.server.close()
    spilled = spill_path(proxy.rt.config.database).read_text().splitlines()
    rows = [UsageRow(**json.loads(line)["row"]) for line in spilled]
    assert [r.request_id for r in rows] == ids
    return rows, 1000 * 1_000_000


async def test_a_replay_that_died_after_its_commit_bills_nothing_twice(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows, balance = await spilled_proxy(make_proxy, upstream, tmp_path)
    database = tmp_path / "lumen.db"
    spill = spill_path(database)
    with sqlite3.connect(database) as conn:  # what a replay had committed of them when it died
        conn.execute("INSERT INTO usage (request_id, time, account_id, key_id, model, status, cost)"
                     " VALUES (?, ?, ?, ?, ?, 200, ?)", (rows[0].request_id, rows[0].time, rows[0].account_id,
                                                         rows[0].key_id, rows[0].model, rows[0].cost))
        conn.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (rows[0].cost, rows[0].account_id))
    spill.write_text(spill.read_text() * 2)  # and each row twice: billed once all the same
    proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url])))
    assert sorted(committed_ids(database)) == sorted(r.request_id for r in rows)
    assert query(database, "SELECT balance FROM accounts")[0]["balance"] == balance - sum(r.cost for r in rows)
    assert proxy.rt.wallets.balance == {rows[0].account_id: balance - sum(r.cost for r in rows)}
    assert proxy.rt.wallets.pending == {}
    assert not spill.exists()
    assert any(r.getMessage() == f"replayed 2 usage rows ({coins_text(rows[1].cost + rows[2].cost)} coins) "
               f"from {spill}; skipped 2 already in the usage log and 2 repeated" for r in caplog.records)


async def test_a_spilled_line_cut_short_is_quarantined_and_the_others_are_billed(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    rows, balance = await spilled_proxy(make_proxy, upstream, tmp_path)
    database = tmp_path / "lumen.db"
    spill = spill_path(database)
    lines = spill.read_text().splitlines()
    spill.write_text("\n".join([*lines[:2], lines[2][:40]]))  # a write torn by a crash
    await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url])))
    assert committed_ids(database) == [r.request_id for r in rows[:2]]
    assert query(database, "SELECT balance FROM accounts")[0]["balance"] == balance - rows[0].cost - rows[1].cost
    [entry] = [json.loads(line) for line in quarantine_path(database).read_text().splitlines()]
    assert entry["line"] == lines[2][:40] and entry["reason"].startswith(f"line 3 of {spill} is not a usage row")
    assert not spill.exists()


async def test_a_spill_file_that_cannot_be_read_refuses_the_start(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    spill_path(tmp_path / "lumen.db").mkdir()
    with pytest.raises(StoreError, match=r"^cannot read the spill file .*lumen\.db\.spill\.jsonl: Is a directory$"):
        await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url])))


# -- reports ---------------------------------------------------------------------------------------------------
async def test_a_usage_report_never_sees_a_batch_before_its_commit_nor_waits_for_it(
        proxy: Proxy, alice: str, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = proxy.rt.store.conn
    commit, in_commit, go = conn.commit, asyncio.Event(), asyncio.Event()

    async def held_commit() -> None:  # the writer's batch is in its transaction, not yet committed
        in_commit.set()
        await go.wait()
        await commit()

    monkeypatch.setattr(conn, "commit", held_commit)
    await chat(proxy, alice)
    await asyncio.wait_for(in_commit.wait(), 2)

    async def report() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session, session.get(
                proxy.origin + "/lumen/v1/usage", headers=auth(alice)) as response:
            assert response.status == 200
            data: list[dict[str, Any]] = (await response.json())["data"]
            return data

    try:
        assert await asyncio.wait_for(report(), 2) == []
    finally:
        go.set()  # else the writer waits for ever, and the stop with it

    async def committed() -> bool:
        return [r["requests"] for r in await report()] == [1]

    assert await eventually(committed, within=2)

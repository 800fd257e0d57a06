"""The usage log: one row per request (refusals included), matched by ``x-request-id``, written within
250 ms, never lost on a graceful stop; and the reports built on it (CLI and ``/lumen/v1/*``).

Expected report numbers are recomputed here from the raw rows with plain SQL, so a report that
drifts from the log it summarises fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from lumen_proxy.store import StorageFailure, UsageRow
from tests.conftest import (
    LumenProcess,
    MakeProxy,
    Proxy,
    admin,
    auth,
    build_config,
    cli,
    config_dict,
    eventually,
    query,
    write_config,
)
from tests.fake_upstream import UpstreamServer

HELLO = [{"role": "user", "content": "Hello there, how are you"}]
JAN_15 = 1705320000.0  # 2024-01-15 12:00 UTC
GROUP = {"day": "date(time, 'unixepoch')", "model": "model", "key": "key_id", "account": "a.name"}


def rows_of(proxy: Proxy, request_id: str) -> list[sqlite3.Row]:
    return query(proxy.rt.config.database, "SELECT * FROM usage WHERE request_id = ?", request_id)


def quarantined(database: Path) -> list[dict[str, Any]]:
    """The rows the usage writer set aside, from ``<database>.quarantine.jsonl``."""
    return [json.loads(line) for line in Path(f"{database}.quarantine.jsonl").read_text().splitlines()]


def expected_report(database: Path, by: str, account: str | None = None, since: str = "0000",
                    until: str = "9999") -> list[tuple[Any, ...]]:
    """The report recomputed from the raw log: (group, requests, errors, prompt, completion, micro-coins)."""
    rows = query(database, f"""
        SELECT {GROUP[by]} AS g, count(*), sum(status >= 400), sum(prompt_tokens), sum(completion_tokens), sum(cost)
        FROM usage u JOIN accounts a ON a.id = u.account_id
        WHERE (? IS NULL OR a.name = ?) AND date(time, 'unixepoch') BETWEEN ? AND ?
        GROUP BY g ORDER BY g""", account, account, since, until)
    return [tuple(r) for r in rows]


def as_tuples(report: list[dict[str, Any]], by: str) -> list[tuple[Any, ...]]:
    """A CLI/API report in the same shape; coins (decimal) back to integer micro-coins."""
    return [(r[by], int(r["requests"]), int(r["errors"]), int(r["prompt_tokens"]), int(r["completion_tokens"]),
             round(float(r["cost"]) * 1_000_000)) for r in report]


async def traffic(proxy: Proxy, keys: list[str]) -> None:
    """A little of everything: chat, stream, completions, embeddings, a 404, from several keys."""
    clients = [proxy.sdk(k) for k in keys]
    for i, client in enumerate(clients):
        await client.chat.completions.create(model="gpt-4o", messages=HELLO)
        stream = await client.chat.completions.create(model="echo", messages=HELLO, stream=True)
        _ = [chunk async for chunk in stream]
        await client.embeddings.create(model="text-embedding-3-small", input="count these words " * (i + 1))
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="gpt-9", messages=HELLO)
    await clients[0].completions.create(model="gpt-4o", prompt="once upon a time")


async def old_rows(proxy: Proxy, key: str, tag: str = "") -> None:
    """Two requests from January 2024, written the way the usage writer writes them (``tag``: other
    request ids, for more rows: the store keeps one row per request id)."""
    principal = proxy.rt.view.authenticate(f"Bearer {key}")
    rows = [UsageRow(request_id=f"req_old{tag}{i}", time=JAN_15 + i * 86400 * 3, account_id=principal.account.id,
                     key_id=principal.key_id, model="gpt-4o", endpoint="/v1/chat/completions", status=status,
                     prompt_tokens=100, completion_tokens=50 if status == 200 else 0,
                     cost=751 if status == 200 else 0)
            for i, status in enumerate((200, 500))]
    async with proxy.rt.usage.lock:  # one writer on the server's connection, as the usage writer does
        await proxy.rt.store.write_usage(rows)
    await proxy.rt.view.reload()  # the balance changed behind the wallets' back


# -- one row per request ----------------------------------------------------------------------------------
async def test_every_response_carries_the_request_id_of_its_row(proxy: Proxy, alice: str) -> None:
    client = proxy.sdk(alice)
    chat = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HELLO, extra_headers={"X-Request-Id": "req_chosen_by_the_client"})
    stream = await client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    _ = [chunk async for chunk in stream]
    embedding = await client.embeddings.create(model="text-embedding-3-small", input="hello")
    text = await client.completions.create(model="gpt-4o", prompt="hello")
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="gpt-9", messages=HELLO)
    assert chat.parse()._request_id == chat.headers["x-request-id"] != "req_chosen_by_the_client"  # ours
    expected = {
        chat.headers["x-request-id"]: ("/v1/chat/completions", 200),
        stream.response.headers["x-request-id"]: ("/v1/chat/completions", 200),
        embedding._request_id: ("/v1/embeddings", 200),
        text._request_id: ("/v1/completions", 200),
        missing.value.request_id: ("/v1/chat/completions", 404),
    }
    assert len(expected) == 5 and all(rid and rid.startswith("req_") for rid in expected)
    await proxy.flush()
    for request_id, (endpoint, status) in expected.items():
        [row] = rows_of(proxy, request_id)
        assert (row["endpoint"], row["status"]) == (endpoint, status)
    assert len(query(proxy.rt.config.database, "SELECT 1 FROM usage")) == 5


async def refuse_402(proxy: Proxy) -> openai.AsyncOpenAI:
    await proxy.account("poor", coins=0.001)
    return proxy.sdk(await proxy.key("poor"))


async def refuse_403(proxy: Proxy) -> openai.AsyncOpenAI:
    await proxy.account("narrow", models=["echo"])
    return proxy.sdk(await proxy.key("narrow"))


async def refuse_404(proxy: Proxy) -> openai.AsyncOpenAI:
    await proxy.account("lost")
    return proxy.sdk(await proxy.key("lost"))


async def refuse_429(proxy: Proxy) -> openai.AsyncOpenAI:
    await proxy.account("busy")
    await proxy.rt.store.update_account("busy", rpm=1)
    client = proxy.sdk(await proxy.key("busy"))
    await client.chat.completions.create(model="gpt-4o", messages=HELLO)  # the one allowed this minute
    return client


# (setup, model asked for, model in the row): a name the config does not know never reaches the log or a
# report ("-"), and a request refused before its body was read (a key over its rpm) has no model yet.
REFUSALS: dict[int, tuple[Callable[[Proxy], Awaitable[openai.AsyncOpenAI]], str, str]] = {
    402: (refuse_402, "gpt-4o", "gpt-4o"), 403: (refuse_403, "gpt-4o", "gpt-4o"), 404: (refuse_404, "gpt-9", "-"),
    429: (refuse_429, "gpt-4o", "-"),
}


@pytest.mark.parametrize("status", REFUSALS)
async def test_refused_request_is_logged_with_its_status(proxy: Proxy, upstream: UpstreamServer, status: int) -> None:
    setup, asked, model = REFUSALS[status]
    client = await setup(proxy)
    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(model=asked, messages=HELLO)
    assert refused.value.status_code == status
    await proxy.flush()
    [row] = rows_of(proxy, refused.value.request_id or "")
    assert (row["status"], row["model"], row["cost"], row["prompt_tokens"]) == (status, model, 0, 0)
    daily = query(proxy.rt.config.database, "SELECT errors FROM usage_daily WHERE account_id = ? AND model = ?",
                  row["account_id"], model)
    assert [d["errors"] for d in daily] == [1]


async def test_rows_are_committed_within_250_ms(proxy: Proxy, alice: str) -> None:
    client = proxy.sdk(alice)
    database = proxy.rt.config.database

    async def seconds_until_logged(request_id: str) -> float:
        start = time.monotonic()
        while not query(database, "SELECT 1 FROM usage WHERE request_id = ?", request_id):
            assert time.monotonic() - start < 2
            await asyncio.sleep(0.005)
        return time.monotonic() - start

    for _ in range(3):
        chat = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
        assert await seconds_until_logged(chat.headers["x-request-id"]) < 0.25
        stream = await client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
        _ = [chunk async for chunk in stream]
        assert await seconds_until_logged(stream.response.headers["x-request-id"]) < 0.25


async def test_graceful_stop_loses_no_row(
        tmp_path: Path, upstream: UpstreamServer, lumen_process: Callable[..., LumenProcess]) -> None:
    config_file = write_config(tmp_path, config_dict(tmp_path, [upstream.base_url], shutdown_grace=10))
    assert cli("accounts", "add", "alice", "--coins", "10", config=config_file).returncode == 0
    key = cli("keys", "create", "alice", config=config_file).stdout.strip()
    server = await asyncio.to_thread(lumen_process, config_file)
    upstream.state.behavior.chunk_delay = 0.05
    async with openai.AsyncOpenAI(api_key=key, base_url=server.base_url, max_retries=0) as client:
        await asyncio.gather(*(client.chat.completions.create(model="gpt-4o", messages=HELLO) for _ in range(10)))
        streams = [await client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
                   for _ in range(3)]
        for stream in streams:
            await anext(aiter(stream))  # in flight when the signal arrives
        server.process.send_signal(signal.SIGTERM)
        for stream in streams:
            _ = [chunk async for chunk in stream]  # the grace period lets them finish
    assert await asyncio.to_thread(server.process.wait, 15) == 0
    rows = query(tmp_path / "lumen.db", "SELECT status, partial FROM usage")
    assert [tuple(r) for r in rows] == [(200, 0)] * 13
    assert "stopped; usage log flushed (13 rows)" in server.stderr_text()


async def test_a_hard_kill_loses_only_requests_that_ended_in_the_last_batch_window(
        tmp_path: Path, upstream: UpstreamServer, lumen_process: Callable[..., LumenProcess]) -> None:
    """README's kill -9 promise: rows are committed within ~100 ms of the request's end, balance with them."""
    config_file = write_config(tmp_path, config_dict(tmp_path, [upstream.base_url]))
    assert cli("accounts", "add", "alice", "--coins", "10", config=config_file).returncode == 0
    key = cli("keys", "create", "alice", config=config_file).stdout.strip()
    server = await asyncio.to_thread(lumen_process, config_file)
    async with openai.AsyncOpenAI(api_key=key, base_url=server.base_url, max_retries=0) as client:
        await asyncio.gather(*(client.chat.completions.create(model="gpt-4o", messages=HELLO) for _ in range(8)))
    await asyncio.sleep(0.3)  # more than one batch interval (0.1 s) after the last request ended
    server.process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(server.process.wait, 10)
    rows = query(tmp_path / "lumen.db", "SELECT status, cost FROM usage")
    assert [r["status"] for r in rows] == [200] * 8
    balance = query(tmp_path / "lumen.db", "SELECT balance FROM accounts WHERE name = 'alice'")[0]["balance"]
    assert balance == 10 * 1_000_000 - sum(r["cost"] for r in rows)  # the debits came with their rows


# -- reports -------------------------------------------------------------------------------------------------
async def test_usage_cli_reports_match_the_rows(proxy: Proxy, alice: str, config_file: Path) -> None:
    second = await proxy.key("alice")
    await proxy.account("bob")
    await traffic(proxy, [alice, second, await proxy.key("bob")])
    await old_rows(proxy, alice)
    await proxy.flush()
    database = proxy.rt.config.database
    by_day = json.loads(await admin(config_file, "usage", "--json"))
    assert as_tuples(by_day, "day") == expected_report(database, "day")
    assert len(by_day) == 3  # two days in January 2024, and today
    by_model = json.loads(await admin(config_file, "usage", "--by", "model", "--json"))
    assert as_tuples(by_model, "model") == expected_report(database, "model")
    by_key = json.loads(await admin(config_file, "usage", "alice", "--by", "key", "--json"))
    assert as_tuples(by_key, "key") == expected_report(database, "key", "alice")
    assert len(by_key) == 2
    by_account = json.loads(await admin(config_file, "usage", "--by", "account", "--json"))
    assert as_tuples(by_account, "account") == expected_report(database, "account")
    assert [r["account"] for r in by_account] == ["alice", "bob"]
    table = list(csv.DictReader(io.StringIO(await admin(config_file, "usage", "--csv"))))
    assert as_tuples(table, "day") == expected_report(database, "day")
    january = json.loads(await admin(config_file, "usage", "--since", "2024-01-01", "--until", "2024-01-18",
                                     "--json"))
    assert as_tuples(january, "day") == expected_report(database, "day", since="2024-01-01", until="2024-01-18")
    assert [(r["day"], r["requests"], r["errors"]) for r in january] == [("2024-01-15", 1, 0), ("2024-01-18", 1, 1)]


async def test_usage_prune_keeps_totals_and_balances(proxy: Proxy, alice: str, config_file: Path) -> None:
    await traffic(proxy, [alice])
    await old_rows(proxy, alice)
    await proxy.flush()
    database = proxy.rt.config.database
    daily = [tuple(r) for r in query(database, "SELECT * FROM usage_daily ORDER BY day, model, key_id")]
    balances = [tuple(r) for r in query(database, "SELECT name, balance FROM accounts")]
    today = len(query(database, "SELECT 1 FROM usage WHERE time > ?", JAN_15 + 86400 * 30))
    report = await admin(config_file, "usage", "--json")

    out = await admin(config_file, "usage", "prune", "--before", "2024-02-01")
    assert out.startswith("deleted 2 usage rows")
    assert len(query(database, "SELECT 1 FROM usage")) == today > 0
    assert [tuple(r) for r in query(database, "SELECT * FROM usage_daily ORDER BY day, model, key_id")] == daily
    assert [tuple(r) for r in query(database, "SELECT name, balance FROM accounts")] == balances
    assert await admin(config_file, "usage", "--json") == report
    mismatched = query(database, """
        SELECT a.name FROM accounts a WHERE a.balance !=
          (SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = a.id)
          - (SELECT coalesce(sum(cost), 0) FROM usage_daily WHERE account_id = a.id)""")
    assert mismatched == []


async def test_prune_works_in_small_batches(proxy: Proxy, alice: str) -> None:
    for tag in "abc":
        await old_rows(proxy, alice, tag)
    assert await proxy.rt.store.prune_usage(JAN_15 + 86400 * 30, batch=4) == 6
    assert query(proxy.rt.config.database, "SELECT count(*) FROM usage")[0][0] == 0


async def test_me_and_usage_endpoints_match_the_cli(proxy: Proxy, alice: str, config_file: Path) -> None:
    await proxy.account("bob")
    await traffic(proxy, [alice, await proxy.key("alice"), await proxy.key("bob")])
    await old_rows(proxy, alice)
    await proxy.flush()
    shown = json.loads(await admin(config_file, "accounts", "show", "alice", "--json"))
    async with aiohttp.ClientSession(proxy.origin, headers=auth(alice)) as session:
        async with session.get("/lumen/v1/me") as response:
            me = await response.json()
        assert (me["account"], me["coins"], me["coins_held"]) == ("alice", shown["coins"], 0)
        assert me["models"] == ["gpt-4o", "text-embedding-3-small", "echo"]
        for by in ("day", "model", "key"):
            async with session.get("/lumen/v1/usage", params={"by": by, "since": "2024-01-01"}) as response:
                assert response.status == 200
                served = await response.json()
            cli_report = json.loads(await admin(config_file, "usage", "alice", "--by", by, "--since", "2024-01-01",
                                                "--json"))
            assert served["account"] == "alice"
            assert served["data"] == cli_report
            assert as_tuples(served["data"], by) == expected_report(proxy.rt.config.database, by, "alice")
        async with session.get("/lumen/v1/usage", params={"by": "week"}) as response:
            assert response.status == 400
    async with aiohttp.ClientSession(proxy.origin) as anonymous, anonymous.get("/lumen/v1/me") as response:
        assert response.status == 401


async def test_usage_endpoint_rejects_a_bad_date_and_defaults_to_all_time(proxy: Proxy, alice: str) -> None:
    """Same default as `lumen-proxy usage` (no bound); a date it cannot read is a 400, not a 500."""
    client = proxy.sdk(alice)
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    await proxy.flush()
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {alice}"}
        async with http.get(proxy.origin + "/lumen/v1/usage?since=yesterday", headers=headers) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "since"
        async with http.get(proxy.origin + "/lumen/v1/usage?by=model", headers=headers) as resp:
            body = await resp.json()
    assert body["since"] is None
    assert [(r["model"], r["requests"]) for r in body["data"]] == [("gpt-4o", 1)]


async def test_a_row_of_2_63_tokens_no_longer_stops_the_usage_log(proxy: Proxy, alice: str) -> None:
    """The bug: one such row failed every later commit, for every account. Now it is quarantined and the
    writer's own loop keeps committing the others within its interval."""
    bob = proxy.sdk(await proxy.account("bob") and await proxy.key("bob"))
    principal = proxy.rt.view.authenticate(f"Bearer {alice}")
    proxy.rt.usage.record(UsageRow(request_id="req_huge", time=time.time(), account_id=principal.account.id,
                                   key_id=principal.key_id, model="gpt-4o", endpoint="/v1/chat/completions",
                                   status=200, prompt_tokens=2**63), "alice")
    ids = set()
    for client in (proxy.sdk(alice), bob, proxy.sdk(alice)):
        ids.add((await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)).request_id)
    database = proxy.rt.config.database

    async def all_committed() -> bool:
        return {r["request_id"] for r in query(database, "SELECT request_id FROM usage")} == ids

    assert await eventually(all_committed, within=1)
    assert proxy.rt.usage.failures == 0
    [entry] = quarantined(database)
    assert (entry["row"]["request_id"], entry["row"]["prompt_tokens"]) == ("req_huge", 2**63)
    mismatched = query(database, """
        SELECT a.name FROM accounts a WHERE a.balance !=
          (SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = a.id)
          - (SELECT coalesce(sum(cost), 0) FROM usage WHERE account_id = a.id)""")
    assert mismatched == []


async def test_a_failed_usage_commit_keeps_its_rows_and_retries(
    make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full or database locked for a moment: no row and no debit is lost, none is doubled."""
    # The writer's own loop stays out of the way (hourly), so this test decides when flushes happen.
    proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url])), usage_interval=3600)
    await proxy.account("alice")
    client = proxy.sdk(await proxy.key("alice"))
    real_write = proxy.rt.store.write_batch
    failures = 0

    async def flaky(batch: Any) -> dict[int, int]:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise StorageFailure("database or disk is full")
        return await real_write(batch)

    monkeypatch.setattr(proxy.rt.store, "write_batch", flaky)
    ids = []
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        ids.append(raw.request_id)
        with pytest.raises(StorageFailure) if failures < 2 else contextlib.nullcontext():
            await proxy.flush()
    await proxy.flush()
    rows = query(Path(proxy.rt.config.database), "SELECT request_id, cost FROM usage ORDER BY id")
    assert [r["request_id"] for r in rows] == ids
    account = query(Path(proxy.rt.config.database), "SELECT balance FROM accounts WHERE name = 'alice'")[0]
    assert account["balance"] == 1000 * 1_000_000 - sum(r["cost"] for r in rows)


async def test_a_usage_report_the_storage_cannot_give_is_a_503(
        proxy: Proxy, alice: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lumen_proxy.store import StorageFailure

    async def failing(*args: object, **kwargs: object) -> None:
        raise StorageFailure("disk I/O error")

    monkeypatch.setattr(proxy.rt.store, "usage_report", failing)
    async with aiohttp.ClientSession() as session, session.get(
            proxy.origin + "/lumen/v1/usage", headers={"Authorization": f"Bearer {alice}"}) as response:
        assert response.status == 503 and response.headers["Retry-After"] == "5"
        assert (await response.json())["error"]["code"] == "storage_unavailable"

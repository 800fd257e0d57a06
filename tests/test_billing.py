"""Coins: every request costs exactly its price formula, holds stop overspending, the ledger balances.

Prices are coins per million tokens, so a request costs ``tokens × price`` micro-coins (rounded up).
The expected numbers come from the fake upstream's own token counts; the actual ones from the usage
row in the database and the account's balance.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from lumen_proxy.billing import cost
from tests.conftest import MakeProxy, Proxy, auth, build_config, cli, config_dict, eventually, query, write_config
from tests.fake_upstream import UpstreamServer, chat_reply, count_prompt_tokens

MICRO = 1_000_000
# Coins per million tokens (tests/conftest.py): micro-coins per token.
PRICES = {"gpt-4o": (Fraction("2.5"), Fraction(10)), "text-embedding-3-small": (Fraction("0.02"), Fraction(0))}
TEN_WORDS = [{"role": "user", "content": "one two three four five six seven eight nine ten"}]


def price_formula(model: str, prompt: int, completion: int) -> int:
    """prompt × P / 1e6 + completion × C / 1e6 coins, in micro-coins, rounded up."""
    p, c = PRICES[model]
    return math.ceil(prompt * p + completion * c)


def usage_row(proxy: Proxy, request_id: str) -> sqlite3.Row:
    rows = query(proxy.rt.config.database, "SELECT * FROM usage WHERE request_id = ?", request_id)
    assert len(rows) == 1, request_id
    return rows[0]


async def billed_row(proxy: Proxy, key: str, stream: bool) -> sqlite3.Row:
    """Send TEN_WORDS (reading a stream to its end), flush, and return the request's usage row."""
    raw = await proxy.sdk(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=TEN_WORDS, stream=stream)
    if stream:
        _ = [chunk async for chunk in raw.parse()]
    await proxy.flush()
    return usage_row(proxy, raw.headers["x-request-id"])


def balance(proxy: Proxy, account: str) -> int:
    return int(query(proxy.rt.config.database, "SELECT balance FROM accounts WHERE name = ?", account)[0][0])


def ledger_mismatches(database: Path) -> list[tuple[str, int, int, int]]:
    """Accounts where sum(ledger) - sum(usage_daily.cost) != balance, or the raw log disagrees."""
    rows = query(database, """
        SELECT a.name, a.balance,
               (SELECT coalesce(sum(amount), 0) FROM ledger l WHERE l.account_id = a.id),
               (SELECT coalesce(sum(cost), 0) FROM usage_daily d WHERE d.account_id = a.id),
               (SELECT coalesce(sum(cost), 0) FROM usage u WHERE u.account_id = a.id)
        FROM accounts a""")
    return [(r[0], r[1], r[2], r[3]) for r in rows if r[2] - r[3] != r[1] or r[3] != r[4]]


# -- the price formula ---------------------------------------------------------------------------------------
async def test_chat_cost_is_the_price_formula(proxy: Proxy, alice: str) -> None:
    raw = await proxy.sdk(alice).chat.completions.with_raw_response.create(model="gpt-4o", messages=TEN_WORDS)
    usage = raw.parse().usage
    assert usage is not None and usage.prompt_tokens == count_prompt_tokens(TEN_WORDS) == 13
    await proxy.flush()
    row = usage_row(proxy, raw.headers["x-request-id"])
    expected = price_formula("gpt-4o", 13, usage.completion_tokens)
    assert expected == 33 + 10 * usage.completion_tokens  # 13 × 2.5 = 32.5, rounded up
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost"]) == (13, usage.completion_tokens, expected)
    assert (row["status"], row["estimated"], row["partial"], row["model"]) == (200, 0, 0, "gpt-4o")
    assert balance(proxy, "alice") == 1000 * MICRO - expected
    account_id = (await proxy.rt.store.account("alice")).id
    assert proxy.rt.wallets.available(account_id) == 1000 * MICRO - expected


async def test_stream_cost_is_the_price_formula_without_the_usage_chunk(
        proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    stream = await proxy.sdk(alice).chat.completions.create(model="gpt-4o", messages=TEN_WORDS, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices for chunk in chunks)  # naive `chunk.choices[0]` code keeps working
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat_reply("up1", TEN_WORDS)
    assert upstream.state.last.body["stream_options"] == {"include_usage": True}  # asked on the client's behalf
    sent = [e["usage"] for e in upstream.state.last.events() if isinstance(e, dict) and e.get("usage")]
    assert len(sent) == 1
    await proxy.flush()
    row = usage_row(proxy, stream.response.headers["x-request-id"])
    expected = price_formula("gpt-4o", sent[0]["prompt_tokens"], sent[0]["completion_tokens"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (sent[0]["prompt_tokens"], sent[0]["completion_tokens"])
    assert (row["cost"], row["estimated"], row["partial"]) == (expected, 0, 0)
    assert balance(proxy, "alice") == 1000 * MICRO - expected


@pytest.mark.parametrize("path, body", [
    ("/chat/completions", {"model": "gpt-4o", "messages": TEN_WORDS}),
    ("/completions", {"model": "gpt-4o", "prompt": "say something"}),
])
async def test_stream_bytes_are_the_backends_minus_the_usage_chunk(
        proxy: Proxy, alice: str, upstream: UpstreamServer, path: str, body: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as session, session.post(
            proxy.base_url + path, json={**body, "stream": True}, headers=auth(alice)) as response:
        received = await response.read()
    sent = bytes(upstream.state.last.sent)
    events = [e + b"\n\n" for e in sent.split(b"\n\n") if e]
    assert sum(b'"choices":[]' in e for e in events) == 1
    assert received == b"".join(e for e in events if b'"choices":[]' not in e)


async def test_stream_keeps_the_usage_chunk_the_client_asked_for(
        proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    stream = await proxy.sdk(alice).chat.completions.create(
        model="gpt-4o", messages=TEN_WORDS, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    await proxy.flush()
    row = usage_row(proxy, stream.response.headers["x-request-id"])
    usage = chunks[-1].usage
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert row["cost"] == price_formula("gpt-4o", usage.prompt_tokens, usage.completion_tokens)


async def test_embeddings_bill_prompt_tokens_only(proxy: Proxy, alice: str) -> None:
    words = " ".join(["word"] * 130)
    raw = await proxy.sdk(alice).embeddings.with_raw_response.create(model="text-embedding-3-small", input=words)
    assert raw.parse().usage.prompt_tokens == 130
    await proxy.flush()
    row = usage_row(proxy, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (130, 0, 0)
    assert row["cost"] == price_formula("text-embedding-3-small", 130, 0) == 3  # 2.6 rounded up
    assert balance(proxy, "alice") == 1000 * MICRO - 3


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_usage_details_are_kept(proxy: Proxy, alice: str, upstream: UpstreamServer, stream: bool) -> None:
    upstream.state.behavior.cached_tokens = 4
    row = await billed_row(proxy, alice, stream)
    assert json.loads(row["details"]) == {"prompt_tokens_details": {"cached_tokens": 4}}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_backend_without_usage_is_billed_an_estimate(
        proxy: Proxy, alice: str, upstream: UpstreamServer, stream: bool) -> None:
    upstream.state.behavior.omit_usage = True
    row = await billed_row(proxy, alice, stream)
    assert (row["status"], row["estimated"]) == (200, 1)
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    assert row["cost"] == price_formula("gpt-4o", row["prompt_tokens"], row["completion_tokens"]) > 0
    assert balance(proxy, "alice") == 1000 * MICRO - row["cost"]


async def test_stream_usage_switched_off_per_backend(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    data = config_dict(tmp_path, [upstream.base_url])
    data["models"][0]["backends"][0]["stream_usage"] = False  # an older vLLM that rejects stream_options
    upstream.state.behavior.stream_options = "reject"
    proxy = await make_proxy(build_config(tmp_path, data))
    await proxy.account("alice")
    stream = await proxy.sdk(await proxy.key("alice")).chat.completions.create(
        model="gpt-4o", messages=TEN_WORDS, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == chat_reply("up1", TEN_WORDS)
    assert "stream_options" not in upstream.state.last.body
    await proxy.flush()
    row = usage_row(proxy, stream.response.headers["x-request-id"])
    assert (row["status"], row["estimated"], row["partial"]) == (200, 1, 0)
    assert row["cost"] > 0


# -- holds and 402 -------------------------------------------------------------------------------------------
async def test_402_when_the_worst_case_does_not_fit(proxy: Proxy, upstream: UpstreamServer) -> None:
    await proxy.account("poor", coins=0.005)  # max_output_tokens 1000 × 10 alone is 0.01 coins
    client = proxy.sdk(await proxy.key("poor"), max_retries=3)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=TEN_WORDS)
    error = caught.value
    assert error.status_code == 402
    assert isinstance(error.body, dict) and set(error.body) == {"message", "type", "param", "code"}
    assert (error.type, error.code) == ("insufficient_quota", "insufficient_quota")
    assert "administrator" in error.message
    assert upstream.state.requests == []
    await proxy.flush()
    rows = query(proxy.rt.config.database,
                 "SELECT status, cost FROM usage JOIN accounts a ON a.id = account_id WHERE a.name = 'poor'")
    assert [tuple(r) for r in rows] == [(402, 0)]  # one request: the SDK did not retry
    assert balance(proxy, "poor") == 5000


@pytest.mark.parametrize("cap", ["max_tokens", "max_completion_tokens"])
async def test_hold_is_sized_by_the_requested_maximum(proxy: Proxy, cap: str) -> None:
    await proxy.account("poor", coins=0.005)
    client = proxy.sdk(await proxy.key("poor"))
    reply = await client.chat.completions.create(model="gpt-4o", messages=TEN_WORDS, **{cap: 10})
    assert reply.usage is not None
    await proxy.flush()
    assert balance(proxy, "poor") == 5000 - price_formula("gpt-4o", reply.usage.prompt_tokens,
                                                          reply.usage.completion_tokens)


async def test_100_concurrent_requests_cannot_overspend(proxy: Proxy, upstream: UpstreamServer) -> None:
    starting = 10_700  # micro-coins: about 10 worst cases of max_tokens=100 (1000 + the prompt estimate)
    await proxy.account("team", coins=starting / MICRO)
    account_id = (await proxy.rt.store.account("team")).id
    client = proxy.sdk(await proxy.key("team"))
    upstream.state.behavior.first_byte_delay = 1.5  # the lucky ones are still in flight when the rest arrive
    lowest = starting

    async def watch() -> None:
        nonlocal lowest
        while True:
            lowest = min(lowest, proxy.rt.wallets.available(account_id))
            await asyncio.sleep(0.005)

    async def one() -> int:
        try:
            await client.chat.completions.create(model="gpt-4o", messages=TEN_WORDS, max_tokens=100)
        except openai.APIStatusError as exc:
            return exc.status_code
        return 200

    watcher = asyncio.create_task(watch())
    statuses = await asyncio.gather(*(one() for _ in range(100)))
    watcher.cancel()
    smallest_hold = cost(proxy.rt.config.by_name["gpt-4o"].price, 1, 100)
    fit = starting // smallest_hold
    assert 0 < statuses.count(200) <= fit == 10
    assert statuses.count(402) == 100 - statuses.count(200)
    await proxy.flush()
    costs = [r["cost"] for r in query(proxy.rt.config.database,
                                      "SELECT cost FROM usage WHERE account_id = ? AND status = 200", account_id)]
    assert len(costs) == statuses.count(200)
    overrun = max(0, max(costs) - smallest_hold)  # a request that cost more than its hold
    assert lowest >= -overrun
    assert balance(proxy, "team") == starting - sum(costs) >= -overrun
    assert proxy.rt.wallets.held == {}


async def test_client_leaving_mid_stream_is_billed_and_releases_its_hold(
        proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    upstream.state.behavior.reply = "word " * 60
    upstream.state.behavior.chunk_delay = 0.05
    async with aiohttp.ClientSession() as session:
        response = await session.post(proxy.base_url + "/chat/completions", headers=auth(alice), json={
            "model": "gpt-4o", "messages": TEN_WORDS, "stream": True})
        assert (await response.content.readany()).startswith(b"data: ")
        request_id = response.headers["x-request-id"]
        response.close()  # the client goes away after the first chunk
    await asyncio.wait_for(upstream.state.disconnected.wait(), 5)  # and the backend is told to stop

    async def logged() -> bool:
        await proxy.flush()
        return bool(query(proxy.rt.config.database, "SELECT 1 FROM usage WHERE request_id = ?", request_id))

    assert await eventually(logged)
    row = usage_row(proxy, request_id)
    assert row["partial"] == 1 and row["cost"] > 0 and row["completion_tokens"] > 0
    assert proxy.rt.wallets.held == {}
    assert balance(proxy, "alice") == 1000 * MICRO - row["cost"]


async def test_backend_dying_mid_stream_is_billed_and_releases_its_hold(
        proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    upstream.state.behavior.die_after_chunks = 3  # the role chunk and two words, then the connection drops
    async with aiohttp.ClientSession() as session, session.post(
            proxy.base_url + "/chat/completions", headers=auth(alice),
            json={"model": "gpt-4o", "messages": TEN_WORDS, "stream": True}) as response:
        received = await response.read()
        request_id = response.headers["x-request-id"]
    assert received.count(b'"delta"') == 3 and b'"code":"bad_gateway"' in received
    await proxy.flush()
    row = usage_row(proxy, request_id)
    assert (row["status"], row["partial"], row["estimated"]) == (502, 1, 1)
    assert row["completion_tokens"] > 0 and row["cost"] > 0  # delivered tokens are never free
    assert proxy.rt.wallets.held == {}
    assert balance(proxy, "alice") == 1000 * MICRO - row["cost"]


@pytest.mark.parametrize("stream", [True, False])
async def test_client_leaving_before_the_first_byte_is_billed_like_a_cut_off_stream(
        proxy: Proxy, alice: str, upstream: UpstreamServer, stream: bool) -> None:
    """The backend had the prompt and was generating: the prompt estimate and one token, never 0."""
    upstream.state.behavior.gate = asyncio.Event()  # the backend never answers
    body = json.dumps({"model": "gpt-4o", "messages": TEN_WORDS, "stream": stream}).encode()
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(session.post(proxy.base_url + "/chat/completions", data=body,
                                                     headers={**auth(alice), "Content-Type": "application/json"}))
        assert await eventually(lambda: _true(len(upstream.state.requests) == 1))
        pending.cancel()  # the client goes away while the backend works
    await asyncio.wait_for(upstream.state.disconnected.wait(), 5)  # and the backend is told to stop
    database = proxy.rt.config.database

    async def logged() -> bool:
        await proxy.flush()
        return bool(query(database, "SELECT 1 FROM usage"))

    assert await eventually(logged)
    [row] = query(database, "SELECT status, partial, estimated, prompt_tokens, completion_tokens, cost FROM usage")
    prompt = len(body) // 4 + 1  # the typical estimate: ~4 bytes of JSON per token
    assert tuple(row) == (499, 1, 1, prompt, 1, price_formula("gpt-4o", prompt, 1))
    assert proxy.rt.wallets.held == {}
    assert balance(proxy, "alice") == 1000 * MICRO - row["cost"]


async def _true(value: bool) -> bool:
    return value


async def test_client_leaving_before_reaching_a_backend_costs_nothing(proxy: Proxy, upstream: UpstreamServer) -> None:
    """A request refused before any backend worked on it is never billed (here: its hold did not fit)."""
    await proxy.account("poor", coins=0.001)
    key = await proxy.key("poor")
    with pytest.raises(openai.APIStatusError) as refused:
        await proxy.sdk(key).chat.completions.create(model="gpt-4o", messages=TEN_WORDS)
    assert refused.value.status_code == 402
    await proxy.flush()
    assert [tuple(r) for r in query(proxy.rt.config.database, "SELECT status, cost FROM usage")] == [(402, 0)]
    assert upstream.state.requests == []


# -- the ledger -------------------------------------------------------------------------------------------------
async def test_balance_equals_the_ledger_after_a_mixed_run(
        proxy: Proxy, alice: str, upstream: UpstreamServer, tmp_path: Path) -> None:
    config_file = write_config(tmp_path, config_dict(tmp_path, [upstream.base_url]))
    await proxy.account("bob", coins=0.005, models=["gpt-4o"])
    a, b = proxy.sdk(alice), proxy.sdk(await proxy.key("bob"))

    async def attempt(call: Any) -> None:
        try:
            result = await call
            if isinstance(result, openai.AsyncStream):
                _ = [chunk async for chunk in result]
        except openai.APIStatusError:
            pass

    await asyncio.gather(
        attempt(a.chat.completions.create(model="gpt-4o", messages=TEN_WORDS)),
        attempt(a.chat.completions.create(model="gpt-4o", messages=TEN_WORDS, stream=True)),
        attempt(a.completions.create(model="gpt-4o", prompt="three little words")),
        attempt(a.embeddings.create(model="text-embedding-3-small", input="a few words here")),
        attempt(a.chat.completions.create(model="echo", messages=TEN_WORDS)),
        attempt(a.chat.completions.create(model="gpt-9", messages=TEN_WORDS)),  # 404
        attempt(b.chat.completions.create(model="gpt-4o", messages=TEN_WORDS)),  # 402
        attempt(b.chat.completions.create(model="gpt-4o", messages=TEN_WORDS, max_tokens=5)),
        attempt(b.chat.completions.create(model="echo", messages=TEN_WORDS)),  # 403
    )
    for args in (("coins", "add", "alice", "-2.5", "--note", "correction"), ("coins", "add", "bob", "1")):
        done = await asyncio.to_thread(cli, *args, config=config_file)
        assert done.returncode == 0, done.stderr
    await attempt(b.chat.completions.create(model="gpt-4o", messages=TEN_WORDS))  # fits now, or soon
    await proxy.flush()
    database = proxy.rt.config.database
    assert ledger_mismatches(database) == []
    accounts = {r["id"]: r["balance"] for r in query(database, "SELECT id, balance FROM accounts")}

    async def wallets_agree() -> bool:
        return proxy.rt.wallets.balance == accounts

    assert await eventually(wallets_agree, within=2)
    assert proxy.rt.wallets.pending == {} and proxy.rt.wallets.held == {}
    assert len(query(database, "SELECT 1 FROM usage")) == 10


def test_coins_add_takes_negative_amounts(tmp_path: Path) -> None:
    config_file = write_config(tmp_path, config_dict(tmp_path, ["http://127.0.0.1:9/v1"]))
    assert cli("accounts", "add", "alice", "--coins", "10", config=config_file).returncode == 0
    done = cli("coins", "add", "alice", "-2.5", "--note", "refund of a mistake", config=config_file)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "deducted 2.5 coins: alice now has 7.5"
    added = cli("coins", "add", "alice", "0.000001", "--json", config=config_file)
    assert json.loads(added.stdout)["coins"] == 7.500001
    database = tmp_path / "lumen.db"
    ledger = [tuple(r) for r in query(database, "SELECT amount, note FROM ledger ORDER BY id")]
    assert ledger == [(10 * MICRO, "initial coins"), (-2_500_000, "refund of a mistake"), (1, None)]
    assert ledger_mismatches(database) == []

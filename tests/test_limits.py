"""Rate limits through the real proxy and the real ``openai`` SDK (issue 5).

The limiter's window is 60 s of the monotonic clock ``create_app(monotonic=...)`` injects, so these tests
move a :class:`Clock` by hand instead of sleeping. The two SDK-retry tests are the exception: the SDK
really sleeps for what ``Retry-After`` says, so there the clock follows real time (jumped forward to
just before the window edge) or the refusal is the concurrency cap, which frees on release.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import MakeProxy, Proxy, build_config, cli, config_dict, eventually, write_config
from tests.fake_upstream import UpstreamServer

MESSAGES = [{"role": "user", "content": "Hello there"}]


class Clock:
    """A monotonic clock the test moves by hand; ``run()`` makes it also follow real time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.offset = start
        self.real_since: float | None = None

    def __call__(self) -> float:
        running = time.monotonic() - self.real_since if self.real_since is not None else 0.0
        return self.offset + running

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def set(self, value: float) -> None:
        self.offset = value

    def run(self) -> None:
        self.real_since = time.monotonic()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def limits_config(tmp_path: Path, upstream: UpstreamServer, *, model_limits: dict[str, dict[str, int]] | None = None,
                  **top: Any) -> dict[str, Any]:
    data = config_dict(tmp_path, [upstream.base_url], **top)
    for model in data["models"]:
        if model_limits and model["name"] in model_limits:
            model["limits"] = model_limits[model["name"]]
    return data


# Admin writes below (``proxy.account``, ``store.update_account``) share the server's one connection with
# the usage writer; a timed flush could open its transaction in the middle of theirs ("cannot start a
# transaction within a transaction"), so the writer only runs when a test calls ``proxy.flush()``.
QUIET_WRITER = 3600.0


async def start(make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock,
                **config: Any) -> Proxy:
    return await serve(make_proxy, tmp_path, limits_config(tmp_path, upstream, **config), clock)


async def serve(make_proxy: MakeProxy, tmp_path: Path, data: dict[str, Any], clock: Clock) -> Proxy:
    config = build_config(tmp_path, data)
    return await make_proxy(config, monotonic=clock, usage_interval=QUIET_WRITER)  # type: ignore[call-arg]


async def user(proxy: Proxy, name: str = "alice", keys: int = 1, **account: Any) -> list[str]:
    """An account with ``keys`` keys; ``account`` sets its rpm/tpm/concurrency overrides."""
    await proxy.account(name)
    if account:
        await proxy.rt.store.update_account(name, **account)
        await proxy.rt.view.reload()
    return [await proxy.key(name) for _ in range(keys)]


async def chat(client: openai.AsyncOpenAI, model: str = "gpt-4o", **kwargs: Any) -> Any:
    return await client.chat.completions.create(model=model, messages=MESSAGES, **kwargs)  # type: ignore[arg-type]


async def raw_chat(client: openai.AsyncOpenAI, model: str = "gpt-4o", **kwargs: Any) -> Any:
    return await client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, **kwargs)  # type: ignore[arg-type]


async def refused(client: openai.AsyncOpenAI, model: str = "gpt-4o", **kwargs: Any) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as info:
        await chat(client, model, **kwargs)
    return info.value


async def _true(value: bool) -> bool:
    """For ``eventually``, which awaits its check."""
    return value


def remaining(raw: Any, group: str = "requests") -> int:
    return int(raw.headers[f"x-ratelimit-remaining-{group}"])


async def usage_rows(proxy: Proxy, status: int | None = None) -> list[dict[str, Any]]:
    await proxy.flush()
    sql = "SELECT * FROM usage" + (" WHERE status = ?" if status is not None else "") + " ORDER BY id"
    async with proxy.rt.store.conn.execute(sql, () if status is None else (status,)) as cur:
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]


# -- admission at the boundary -------------------------------------------------------------------------
async def test_admits_exactly_the_limit_then_429_names_the_limit(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"rpm": 5})
    client = proxy.sdk((await user(proxy))[0])
    for _ in range(5):
        await chat(client)
    error = await refused(client)
    assert error.status_code == 429
    assert error.body == {"message": error.message.removeprefix("Error code: 429 - "), "type": "rate_limit_exceeded",
                          "param": None, "code": "rate_limit_exceeded"}
    assert error.type == "rate_limit_exceeded"
    assert "Rate limit reached for requests per minute (limit 5) on your key" in error.message
    assert "Retry after 1m0s." in error.message
    assert len(upstream.state.requests) == 5  # the refused one never went upstream


async def test_concurrent_burst_admits_exactly_the_limit(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"rpm": 5})
    client = proxy.sdk((await user(proxy))[0])
    results = await asyncio.gather(*(chat(client) for _ in range(9)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 5
    assert sum(isinstance(r, openai.RateLimitError) for r in results) == 4
    assert len(upstream.state.requests) == 5


async def test_window_slides_with_no_double_burst_at_its_edge(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"rpm": 5})
    client = proxy.sdk((await user(proxy))[0])
    clock.set(1019.5)  # half a second before a minute boundary (1020 = 17 x 60), where fixed windows reset
    for _ in range(5):
        await chat(client)
    clock.set(1020.5)  # a fixed window would hand out 5 more here
    error = await refused(client)
    assert error.response.headers["Retry-After"] == "59"
    assert error.response.headers["retry-after-ms"] == "59000"
    clock.set(1079.25)  # 59.75 s after the burst: still inside its window
    error = await refused(client)
    assert error.response.headers["retry-after-ms"] == "250"
    assert error.response.headers["Retry-After"] == "1"
    clock.set(1079.5)  # exactly 60 s later the burst has left: a full window again, and no more
    for _ in range(5):
        await chat(client)
    await refused(client)
    assert len(upstream.state.requests) == 10


# -- headers ----------------------------------------------------------------------------------------------
async def test_success_carries_openai_rate_limit_headers(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"rpm": 5, "tpm": 10_000})
    client = proxy.sdk((await user(proxy))[0])
    seen = []
    for _ in range(3):
        raw = await raw_chat(client, max_tokens=50)
        assert raw.parse().choices[0].message.content
        seen.append(raw)
    assert [r.headers["x-ratelimit-limit-requests"] for r in seen] == ["5", "5", "5"]
    assert [remaining(r) for r in seen] == [4, 3, 2]
    assert [r.headers["x-ratelimit-reset-requests"] for r in seen] == ["1m0s"] * 3  # the clock stood still
    assert [r.headers["x-ratelimit-limit-tokens"] for r in seen] == ["10000"] * 3
    tokens = [remaining(r, "tokens") for r in seen]
    assert 10_000 > tokens[0] > tokens[1] > tokens[2] > 0
    assert all(r.headers["x-ratelimit-reset-tokens"] == "1m0s" for r in seen)
    assert all(r.headers["x-request-id"].startswith("req_") for r in seen)


async def test_headers_are_computed_when_the_answer_leaves(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"rpm": 5, "tpm": 10_000})
    client = proxy.sdk((await user(proxy))[0])
    upstream.state.behavior.first_byte_delay = 0.2
    task = asyncio.create_task(raw_chat(client))
    assert await eventually(lambda: _true(len(upstream.state.requests) == 1))
    clock.advance(0.1)  # the backend takes 100 ms (of the injected clock) to answer
    raw = await task
    assert raw.headers["x-ratelimit-reset-requests"] == "59.9s"
    assert raw.headers["x-ratelimit-reset-tokens"] == "59.9s"
    assert remaining(raw) == 4


async def test_429_carries_retry_after_and_rate_limit_headers(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"rpm": 5, "tpm": 10_000})
    client = proxy.sdk((await user(proxy))[0])
    for _ in range(5):
        await chat(client, max_tokens=50)
    clock.advance(0.1)
    headers = (await refused(client, max_tokens=50)).response.headers
    assert headers["Retry-After"] == "60"  # 59.9 s, rounded up to whole seconds
    assert headers["Retry-After"].isdigit()
    assert headers["retry-after-ms"] == "59900"
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "59.9s"
    assert headers["x-ratelimit-limit-tokens"] == "10000"
    assert 0 < int(headers["x-ratelimit-remaining-tokens"]) < 10_000
    assert headers["x-request-id"].startswith("req_")
    assert "x-should-retry" not in headers


async def test_request_larger_than_tpm_is_refused_for_good(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"tpm": 1000})
    client = proxy.sdk((await user(proxy))[0], max_retries=2)
    error = await refused(client, max_tokens=5000)
    assert "Request too large for tokens per minute (limit 1000" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    assert "Retry-After" not in error.response.headers
    assert len(await usage_rows(proxy, 429)) == 1  # the SDK believed x-should-retry and did not retry
    assert (await chat(client, max_tokens=50)).choices


async def test_a_group_no_limit_applies_to_is_left_out(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"rpm": 5})
    client = proxy.sdk((await user(proxy))[0])
    raw = await raw_chat(client)
    assert raw.headers["x-ratelimit-limit-requests"] == "5"
    assert "x-ratelimit-limit-tokens" not in raw.headers
    bob = (await user(proxy, "bob", rpm=0))[0]  # bob's account is unlimited, his key still has the default
    raw = await raw_chat(proxy.sdk(bob))
    assert remaining(raw) == 4


# -- the SDK's own retries --------------------------------------------------------------------------------
async def test_sdk_waits_out_retry_after_of_a_requests_limit(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    """A client one request over its rpm, just before the window frees, gets through with no code of its own.

    The refusal asks for ~2 s. The SDK's own backoff without Retry-After is at most 0.5 s + 1 s for its two
    retries, which would still be refused and raise; only honouring Retry-After gets this request through,
    and with exactly one 429 on the way.
    """
    clock.run()  # the limiter's clock follows real time, because the SDK really sleeps
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"rpm": 2})
    client = proxy.sdk((await user(proxy))[0], max_retries=2)  # the SDK's default
    await chat(client)
    await chat(client)
    clock.advance(58.0)  # the first request is about to leave the window
    started = time.monotonic()
    completion = await chat(client)
    assert completion.choices[0].message.content
    assert time.monotonic() - started >= 1.5
    rows = await usage_rows(proxy)
    assert [r["status"] for r in rows] == [200, 200, 429, 200]
    assert len(upstream.state.requests) == 3


async def test_sdk_waits_out_retry_after_of_the_concurrency_cap(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    """concurrency=1: the second of two overlapping requests is told "Retry-After: 1" and gets through.

    The first takes 0.8 s; without honouring Retry-After the SDK would retry within 0.5 s, while the
    first still runs, and fail (``max_retries=1``).
    """
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"concurrency": 1})
    key = (await user(proxy))[0]
    upstream.state.behavior.first_byte_delay = 0.8
    first = asyncio.create_task(chat(proxy.sdk(key)))
    assert await eventually(lambda: _true(len(upstream.state.requests) == 1))
    second = await chat(proxy.sdk(key, max_retries=1))
    assert second.choices[0].message.content
    assert first.done()
    rows = await usage_rows(proxy)
    assert sorted(r["status"] for r in rows) == [200, 200, 429]
    refusal = next(r for r in rows if r["status"] == 429)
    assert refusal["cost"] == 0 and refusal["prompt_tokens"] == 0


# -- who shares which window ------------------------------------------------------------------------------
async def test_account_limit_set_by_cli_is_shared_by_all_its_keys(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    data = limits_config(tmp_path, upstream)
    config_path = write_config(tmp_path, data)
    proxy = await serve(make_proxy, tmp_path, data, clock)
    first, second = await user(proxy, keys=2)
    bob = (await user(proxy, "bob"))[0]
    done = cli("accounts", "set-limits", "alice", "--rpm", "3", config=config_path)
    assert done.returncode == 0, done.stderr
    alice_id = (await proxy.rt.store.account("alice")).id
    assert await eventually(lambda: _true(proxy.rt.view.accounts[alice_id].rpm == 3))  # the view polls
    a, b = proxy.sdk(first), proxy.sdk(second)
    assert remaining(await raw_chat(a)) == 2
    assert remaining(await raw_chat(b)) == 1
    assert remaining(await raw_chat(a)) == 0
    for client in (a, b):
        assert "(limit 3) on your account." in (await refused(client)).message
    for _ in range(5):
        await chat(proxy.sdk(bob))  # another account has its own window (and no limit)


async def test_top_level_limits_apply_per_key_and_per_account(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"rpm": 2})
    # alice's account allows 10: each key gets the default 2, on its own
    a1, a2 = (proxy.sdk(k) for k in await user(proxy, "alice", keys=2, rpm=10))
    for client in (a1, a2):
        await chat(client)
        await chat(client)
        assert "(limit 2) on your key." in (await refused(client)).message
    # bob's account has the default too, so his two keys share 2
    b1, b2 = (proxy.sdk(k) for k in await user(proxy, "bob", keys=2))
    await chat(b1)
    assert remaining(await raw_chat(b2)) == 0
    assert "(limit 2) on your account." in (await refused(b2)).message


async def test_per_model_limits(make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer,
                                clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, model_limits={"gpt-4o": {"rpm": 2}})
    a1, a2 = (proxy.sdk(k) for k in await user(proxy, keys=2))
    raw = await raw_chat(a1)
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert remaining(raw) == 1
    await chat(a2)
    error = await refused(a1)
    assert "Rate limit reached for requests per minute (limit 2) on your account for gpt-4o." in error.message
    await refused(a2)  # the model's limit is per account: all its keys share it
    for _ in range(4):
        raw = await raw_chat(a1, model="echo")  # other models are not limited
        assert "x-ratelimit-limit-requests" not in raw.headers
    bob = proxy.sdk((await user(proxy, "bob"))[0])
    assert remaining(await raw_chat(bob)) == 1  # another account, another window


async def test_concurrency_cap(make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer,
                               clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"concurrency": 2})
    client = proxy.sdk((await user(proxy))[0])
    behavior = upstream.state.behavior
    behavior.first_byte_delay = 0.3
    fast = asyncio.create_task(chat(client))
    assert await eventually(lambda: _true(len(upstream.state.requests) == 1))
    behavior.first_byte_delay = 1.0
    slow = asyncio.create_task(chat(client))
    assert await eventually(lambda: _true(len(upstream.state.requests) == 2))
    error = await refused(client)
    assert "Too many concurrent requests (limit 2) on your key. Retry after 1s." in error.message
    assert error.response.headers["Retry-After"] == "1"
    assert len(upstream.state.requests) == 2
    await fast
    behavior.first_byte_delay = 0.0
    assert (await chat(client)).choices  # a slot freed: admitted while the slow one still runs
    assert not slow.done()
    await slow
    results = await asyncio.gather(chat(client), chat(client))
    assert all(r.choices for r in results)


# -- order of checks ----------------------------------------------------------------------------------
async def test_unauthenticated_requests_touch_no_window_and_bad_ones_count(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    """A key is admitted before its body is read: a bad body or an unknown model still counts against its
    rpm (it cost the server a parse), while a caller without a valid key touches no window at all."""
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"rpm": 3})
    key = (await user(proxy))[0]
    echo_only = (await user(proxy, "carol"))[0]
    await proxy.rt.store.update_account("carol", models=["echo"])
    await proxy.rt.view.reload()
    strangers = proxy.sdk("sk-lumen-not-a-real-key-0000000000"), proxy.sdk(key[:-2] + "xx")
    alice, carol = proxy.sdk(key), proxy.sdk(echo_only)
    for _ in range(10):  # an unauthenticated flood
        for stranger in strangers:
            with pytest.raises(openai.AuthenticationError):
                await chat(stranger)
    assert len(proxy.rt.limiter) == 0
    for _ in range(2):  # authenticated, but no such model / not this account's model
        with pytest.raises(openai.NotFoundError):
            await chat(alice, model="gpt-9")
        with pytest.raises(openai.PermissionDeniedError):
            await chat(carol)
    assert remaining(await raw_chat(alice)) == 0  # two refused requests and this one
    assert remaining(await raw_chat(carol, model="echo")) == 0
    with pytest.raises(openai.RateLimitError):
        await chat(alice, model="gpt-9")  # over the limit: refused before the body is even read


async def test_rate_limit_comes_before_coins(make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer,
                                             clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"rpm": 1})
    await proxy.rt.store.add_account("poor", 0)
    await proxy.rt.view.reload()
    client = proxy.sdk(await proxy.key("poor"))
    with pytest.raises(openai.APIStatusError) as info:
        await chat(client)
    assert info.value.status_code == 402  # admitted by the limiter, then no coins
    assert info.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    for _ in range(3):
        error = await refused(client)  # 429, never 402: the limiter answers first
        assert error.status_code == 429
    assert proxy.rt.wallets.held == {}
    assert len(upstream.state.requests) == 0


async def test_rate_limited_request_places_no_hold(make_proxy: MakeProxy, tmp_path: Path,
                                                   upstream: UpstreamServer, clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"concurrency": 1})
    client = proxy.sdk((await user(proxy))[0])
    account_id = (await proxy.rt.store.account("alice")).id
    upstream.state.behavior.first_byte_delay = 0.5
    running = asyncio.create_task(chat(client))
    assert await eventually(lambda: _true(len(upstream.state.requests) == 1))
    one_hold = proxy.rt.wallets.held[account_id]
    assert one_hold > 0
    for _ in range(3):
        await refused(client)
        assert proxy.rt.wallets.held == {account_id: one_hold}
    await running
    assert proxy.rt.wallets.held == {}


async def test_refused_requests_are_in_the_usage_log(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    data = limits_config(tmp_path, upstream, limits={"rpm": 1})
    config_path = write_config(tmp_path, data)
    proxy = await serve(make_proxy, tmp_path, data, clock)
    client = proxy.sdk((await user(proxy))[0])
    await chat(client)
    errors = [await refused(client) for _ in range(3)]
    await proxy.flush()
    for error in errors:
        assert error.request_id is not None
        (row,) = await proxy.rt.store.usage_rows(error.request_id)
        assert row["status"] == 429
        assert row["model"] == "-"  # refused on the key's rpm before its body (and model) was read
        assert (row["cost"], row["prompt_tokens"], row["completion_tokens"]) == (0, 0, 0)
    done = cli("usage", "--json", config=config_path)
    assert done.returncode == 0, done.stderr
    (day,) = json.loads(done.stdout)
    assert (day["requests"], day["errors"]) == (4, 3)


# -- tokens -------------------------------------------------------------------------------------------------
async def test_tokens_are_reconciled_with_real_usage(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    """Two identical requests have identical estimates, so what the second sees used is the first's real usage."""
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"tpm": 100_000})
    client = proxy.sdk((await user(proxy))[0])
    first = await raw_chat(client, max_tokens=500)
    second = await raw_chat(client, max_tokens=500)
    estimate = 100_000 - remaining(first, "tokens")
    assert estimate > 500  # admitted on prompt estimate + max_tokens
    actual = first.parse().usage.total_tokens
    assert actual < 100
    assert remaining(first, "tokens") - remaining(second, "tokens") == actual


async def test_stream_tokens_are_reconciled_with_injected_usage(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    """The client did not ask for usage; the proxy asked upstream, dropped the chunk, and still reconciled."""
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"tpm": 100_000})
    client = proxy.sdk((await user(proxy))[0])
    seen = []
    for _ in range(2):
        raw = await raw_chat(client, max_tokens=500, stream=True)
        chunks = [chunk async for chunk in raw.parse()]
        assert all(chunk.usage is None for chunk in chunks)
        seen.append(remaining(raw, "tokens"))
        assert await eventually(lambda: _true(not proxy.rt.wallets.held))  # the handler has finished
    actual = next(e for e in upstream.state.requests[0].events() if isinstance(e, dict) and e.get("usage"))
    assert seen[0] - seen[1] == actual["usage"]["total_tokens"]


async def test_tokens_per_minute_refuse_with_the_exact_wait(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"tpm": 1000})
    client = proxy.sdk((await user(proxy))[0])
    upstream.state.behavior.reply = "word " * 300
    clock.set(1000)
    first = await chat(client, max_tokens=400)  # admitted on ~424, reconciled to its real 305
    assert first.usage.total_tokens == 305
    clock.set(1010)
    await chat(client, max_tokens=400)
    clock.set(1020)
    error = await refused(client, max_tokens=500)  # ~524 more: fits only once the first has left
    assert "Rate limit reached for tokens per minute (limit 1000, used 610, requested " in error.message
    assert error.response.headers["retry-after-ms"] == "40000"
    assert error.response.headers["x-ratelimit-remaining-tokens"] == "390"
    assert error.response.headers["x-ratelimit-reset-tokens"] == "50s"
    clock.set(1060)
    assert (await chat(client, max_tokens=500)).choices


# -- memory and reload ----------------------------------------------------------------------------------------
async def test_idle_subjects_are_forgotten(make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer,
                                           clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"rpm": 5})
    limiter = proxy.rt.limiter
    for name in ("a", "b", "c"):
        await chat(proxy.sdk((await user(proxy, name))[0]))
    assert len(limiter) == 6  # a key and an account each
    clock.advance(30)
    late = proxy.sdk((await user(proxy, "d"))[0])
    await chat(late)
    assert limiter.sweep() == 0
    clock.advance(31)  # a, b, c idle for 61 s; d for 31 s
    assert limiter.sweep() == 6
    assert len(limiter) == 2
    assert remaining(await raw_chat(late)) == 3  # d's window was kept
    clock.advance(61)
    assert limiter.sweep() == 2
    assert len(limiter) == 0
    assert remaining(await raw_chat(late)) == 4  # a forgotten subject starts from a full window


async def test_windows_survive_a_config_reload(make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer,
                                               clock: Clock) -> None:
    proxy = await start(make_proxy, tmp_path, upstream, clock, limits={"rpm": 3})
    client = proxy.sdk((await user(proxy))[0])
    await chat(client)
    await chat(client)

    def reload(**config: Any) -> None:
        proxy.rt.apply(build_config(tmp_path, limits_config(tmp_path, upstream, **config)))

    reload(limits={"rpm": 3}, admin_token="changed")
    assert remaining(await raw_chat(client)) == 0
    await refused(client)
    reload(limits={"rpm": 5})  # raised: the difference at once
    assert remaining(await raw_chat(client)) == 1
    await chat(client)
    await refused(client)
    reload(limits={"rpm": 2})  # lowered: everything still in the window counts
    clock.advance(59)
    await refused(client)
    reload(limits={"rpm": 5}, model_limits={"gpt-4o": {"rpm": 1}})  # a model limit starts empty
    clock.advance(2)  # the first five have left
    raw = await raw_chat(client)
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert remaining(raw) == 0
    assert "on your account for gpt-4o" in (await refused(client)).message


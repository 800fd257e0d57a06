"""Backends: spreading, failover, the circuit breaker, 503 when none can serve, and timeouts.

The breaker runs on the app's monotonic clock; these tests pass a fake one to ``create_app`` so a
30-second cool-down takes no time. The hostile cases show that what one account's requests cause
(timeouts, 500s for its own body) never takes a backend out for the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from lumen_proxy.backends import check_backends
from lumen_proxy.config import Config
from tests.conftest import MakeProxy, Proxy, auth, build_config, config_dict
from tests.fake_upstream import UpstreamServer, chat_reply

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_config(tmp_path: Path, *upstreams: UpstreamServer, failures: int = 3, cooldown: float = 30,
                first_byte: float | None = None) -> Config:
    data = config_dict(tmp_path, [u.base_url for u in upstreams],
                       circuit_breaker={"failures": failures, "cooldown": cooldown})
    if first_byte is not None:
        data["timeouts"] = {"connect": 2, "first_byte": first_byte}
    return build_config(tmp_path, data)


async def started(make_proxy: MakeProxy, config: Config, clock: FakeClock | None = None) -> tuple[Proxy, str]:
    proxy = await (make_proxy(config) if clock is None else make_proxy(config, monotonic=clock))  # type: ignore[call-arg]
    await proxy.account("alice")
    return proxy, await proxy.key("alice")


async def sdk_of(proxy: Proxy, account: str, **kwargs: object) -> openai.AsyncOpenAI:
    """An SDK client with a key of a new account (1000 coins)."""
    await proxy.account(account)
    return proxy.sdk(await proxy.key(account), **kwargs)


class Turnstile(asyncio.Event):
    """A fake upstream's gate that also tells the test when a request has reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = asyncio.Event()

    async def wait(self) -> Literal[True]:
        self.reached.set()
        return await super().wait()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def two(make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer,
              upstream2: UpstreamServer, clock: FakeClock) -> AsyncIterator[openai.AsyncOpenAI]:
    """An SDK client of a proxy whose gpt-4o has two backends: upstream, then upstream2."""
    proxy, key = await started(make_proxy, make_config(tmp_path, upstream, upstream2), clock)
    yield proxy.sdk(key)


@pytest.fixture
async def one(make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer,
              clock: FakeClock) -> AsyncIterator[openai.AsyncOpenAI]:
    """An SDK client of a proxy whose gpt-4o has one backend (breaker: 3 failures, 30 s)."""
    proxy, key = await started(make_proxy, make_config(tmp_path, upstream), clock)
    yield proxy.sdk(key)


async def ask(client: openai.AsyncOpenAI) -> str:
    completion = await client.chat.completions.create(model="gpt-4o", messages=HELLO)
    return completion.choices[0].message.content or ""


async def refused(client: openai.AsyncOpenAI) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        await ask(client)
    return caught.value


def retry_headers(error: openai.APIStatusError) -> dict[str, str]:
    """What a 503 tells the SDKs about retrying."""
    names = ("Retry-After", "retry-after-ms", "x-should-retry")
    return {name: error.response.headers[name] for name in names if name in error.response.headers}


OPEN_FOR_30_S = {"Retry-After": "30", "retry-after-ms": "30000", "x-should-retry": "false"}
TRY_AGAIN_NOW = {"Retry-After": "1", "retry-after-ms": "1000"}


# ---- spreading and failover ----


async def test_requests_are_spread_over_the_backends(
    two: openai.AsyncOpenAI, upstream: UpstreamServer, upstream2: UpstreamServer
) -> None:
    replies = [await ask(two) for _ in range(4)]
    assert replies == [chat_reply(name, HELLO) for name in ("up1", "up2", "up1", "up2")]


async def test_a_backend_answering_500_fails_over_to_the_next(
    two: openai.AsyncOpenAI, upstream: UpstreamServer, upstream2: UpstreamServer
) -> None:
    upstream.state.behavior.fail_status = 500
    assert await ask(two) == chat_reply("up2", HELLO)
    assert len(upstream.state.requests) == 1  # it was tried first, and failed
    assert len(upstream2.state.requests) == 1


async def test_a_stopped_backend_fails_over_to_the_next(
    two: openai.AsyncOpenAI, upstream: UpstreamServer, upstream2: UpstreamServer
) -> None:
    await upstream.stop()  # connection refused
    assert await ask(two) == chat_reply("up2", HELLO)


async def test_a_stream_fails_over_before_its_first_byte(
    two: openai.AsyncOpenAI, upstream: UpstreamServer, upstream2: UpstreamServer
) -> None:
    upstream.state.behavior.fail_status = 503
    stream = await two.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text == chat_reply("up2", HELLO)


async def test_a_backends_4xx_is_not_retried_elsewhere(
    two: openai.AsyncOpenAI, upstream: UpstreamServer, upstream2: UpstreamServer
) -> None:
    upstream.state.behavior.max_context_tokens = 1
    with pytest.raises(openai.BadRequestError) as caught:
        await ask(two)
    assert caught.value.code == "context_length_exceeded"
    assert len(upstream.state.requests) == 1
    assert upstream2.state.requests == []


async def test_a_backends_4xx_never_opens_the_breaker(one: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.max_context_tokens = 1
    for _ in range(6):  # twice the breaker's threshold
        with pytest.raises(openai.BadRequestError):
            await ask(one)
    upstream.state.behavior.max_context_tokens = None
    assert await ask(one) == chat_reply("up1", HELLO)
    assert len(upstream.state.requests) == 7


# ---- the circuit breaker: the backend's own evidence ----


async def test_one_blip_does_not_take_a_backend_out(
    two: openai.AsyncOpenAI, upstream: UpstreamServer, upstream2: UpstreamServer
) -> None:
    upstream.state.behavior.fail_status, upstream.state.behavior.fail_times = 503, 1
    replies = [await ask(two) for _ in range(5)]
    assert replies[0] == chat_reply("up2", HELLO)  # the blip, served by the other backend
    assert replies[1:] == [chat_reply(name, HELLO) for name in ("up2", "up1", "up2", "up1")]


async def test_only_consecutive_failures_count(one: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    for _ in range(3):
        upstream.state.behavior.fail_status, upstream.state.behavior.fail_times = 503, 2
        for _ in range(2):
            error = await refused(one)
            assert (error.status_code, retry_headers(error)) == (503, TRY_AGAIN_NOW)  # not open: try again
        assert await ask(one) == chat_reply("up1", HELLO)  # the success resets the count
    assert len(upstream.state.requests) == 9


async def test_breaker_opens_after_n_failures_and_a_probe_closes_it(
    one: openai.AsyncOpenAI, upstream: UpstreamServer, clock: FakeClock
) -> None:
    upstream.state.behavior.fail_status = 503
    for _ in range(3):
        await refused(one)
    assert len(upstream.state.requests) == 3
    # Open: the backend is skipped, the client is told when it will be tried again.
    for _ in range(5):
        assert (await refused(one)).status_code == 503
    assert len(upstream.state.requests) == 3
    clock.advance(29)
    await refused(one)
    assert len(upstream.state.requests) == 3
    # After the cool-down one probe goes through; it succeeds, and the breaker closes.
    upstream.state.behavior.fail_status = None
    clock.advance(1)
    assert await ask(one) == chat_reply("up1", HELLO)
    assert [await ask(one) for _ in range(3)] == [chat_reply("up1", HELLO)] * 3
    assert len(upstream.state.requests) == 7


async def test_a_failed_probe_opens_the_breaker_again(
    one: openai.AsyncOpenAI, upstream: UpstreamServer, clock: FakeClock
) -> None:
    upstream.state.behavior.fail_status = 502
    for _ in range(3):
        await refused(one)
    clock.advance(30)
    assert retry_headers(await refused(one)) == OPEN_FOR_30_S  # the probe fails ...
    assert len(upstream.state.requests) == 4
    await refused(one)  # ... and the backend is skipped for another cool-down
    clock.advance(29)
    await refused(one)
    assert len(upstream.state.requests) == 4
    upstream.state.behavior.fail_status = None
    clock.advance(1)
    assert await ask(one) == chat_reply("up1", HELLO)


async def test_exactly_one_request_probes(one: openai.AsyncOpenAI, upstream: UpstreamServer, clock: FakeClock) -> None:
    upstream.state.behavior.fail_status = 503
    for _ in range(3):
        await refused(one)
    upstream.state.behavior.fail_status = None
    gate = upstream.state.behavior.gate = Turnstile()  # the probe takes a while
    clock.advance(30)
    probe = asyncio.create_task(ask(one))
    await gate.reached.wait()
    error = await refused(one)  # while the probe is out, others are not let through ...
    assert (error.status_code, retry_headers(error)) == (503, TRY_AGAIN_NOW)  # ... but it may close any moment
    gate.set()
    assert await probe == chat_reply("up1", HELLO)
    assert len(upstream.state.requests) == 4


async def test_a_probe_whose_client_leaves_lets_the_next_request_probe(
    make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: FakeClock,
    http: aiohttp.ClientSession,
) -> None:
    proxy, key = await started(make_proxy, make_config(tmp_path, upstream), clock)
    sdk = proxy.sdk(key)
    upstream.state.behavior.fail_status = 503
    for _ in range(3):
        await refused(sdk)
    upstream.state.behavior.fail_status = None
    gate = upstream.state.behavior.gate = Turnstile()
    clock.advance(30)
    body = {"model": "gpt-4o", "messages": HELLO}
    leaving = asyncio.create_task(http.post(proxy.base_url + "/chat/completions", json=body, headers=auth(key)))
    await gate.reached.wait()  # the probe waits on the backend ...
    leaving.cancel()  # ... and its client hangs up
    await upstream.state.disconnected.wait()  # the proxy dropped the probe's upstream request
    gate.set()
    assert await ask(sdk) == chat_reply("up1", HELLO)  # at once: no second cool-down, no restart
    assert len(upstream.state.requests) == 5


async def test_an_open_backend_is_skipped_in_favour_of_a_healthy_one(
    two: openai.AsyncOpenAI, upstream: UpstreamServer, upstream2: UpstreamServer
) -> None:
    upstream.state.behavior.fail_status = 503
    replies = [await ask(two) for _ in range(10)]
    assert replies == [chat_reply("up2", HELLO)] * 10
    assert len(upstream.state.requests) == 3  # tried until the breaker opened, then left alone


async def test_refused_connections_open_the_breaker(
    one: openai.AsyncOpenAI, upstream: UpstreamServer, clock: FakeClock
) -> None:
    await upstream.stop()
    assert [retry_headers(await refused(one)) for _ in range(3)] == [TRY_AGAIN_NOW] * 2 + [OPEN_FOR_30_S]
    await upstream.start()  # back, but the breaker keeps it out until the cool-down ends
    assert retry_headers(await refused(one)) == OPEN_FOR_30_S
    assert upstream.state.requests == []
    clock.advance(30)
    assert await ask(one) == chat_reply("up1", HELLO)


@pytest.mark.parametrize("status", [502, 503])
async def test_502_and_503_from_the_backend_open_the_breaker(
    one: openai.AsyncOpenAI, upstream: UpstreamServer, status: int
) -> None:
    upstream.state.behavior.fail_status = status
    for _ in range(3):
        await refused(one)
    upstream.state.behavior.fail_status = None
    assert retry_headers(await refused(one)) == OPEN_FOR_30_S
    assert len(upstream.state.requests) == 3


async def test_failed_health_checks_open_the_breaker(
    make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: FakeClock
) -> None:
    proxy, key = await started(make_proxy, make_config(tmp_path, upstream), clock)
    rt = proxy.rt
    upstream.state.behavior.fail_status = 503  # GET /v1/models too
    await check_backends(rt.pool, rt.client, rt.config)
    upstream.state.behavior.fail_status = None
    assert retry_headers(await refused(proxy.sdk(key))) == OPEN_FOR_30_S
    assert upstream.state.requests_to("/v1/chat/completions") == []
    await check_backends(rt.pool, rt.client, rt.config)  # a passing check closes it again
    assert await ask(proxy.sdk(key)) == chat_reply("up1", HELLO)


# ---- the circuit breaker: what one account's requests cause ----


async def test_one_accounts_timeouts_neither_open_the_breaker_nor_reach_a_second_backend(
    make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, upstream2: UpstreamServer, clock: FakeClock
) -> None:
    proxy = await make_proxy(make_config(tmp_path, upstream, upstream2, first_byte=0.1),  # type: ignore[call-arg]
                             monotonic=clock)
    alice, bob = await sdk_of(proxy, "alice"), await sdk_of(proxy, "bob")
    upstream.state.behavior.first_byte_delay = upstream2.state.behavior.first_byte_delay = 1.0  # a long generation
    for _ in range(6):  # three on each backend: the breaker's threshold
        error = await refused(alice)
        assert (error.status_code, error.code) == (504, "upstream_timeout")
    assert (len(upstream.state.requests), len(upstream2.state.requests)) == (3, 3)  # each went to one backend
    upstream.state.behavior.first_byte_delay = upstream2.state.behavior.first_byte_delay = 0.0
    assert await ask(bob) == chat_reply("up1", HELLO)


async def test_one_accounts_500s_do_not_open_the_breaker_for_others(
    make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: FakeClock
) -> None:
    proxy = await make_proxy(make_config(tmp_path, upstream), monotonic=clock)  # type: ignore[call-arg]
    alice, bob = await sdk_of(proxy, "alice"), await sdk_of(proxy, "bob")
    upstream.state.behavior.fail_status = 500  # say, what the backend answers to alice's body
    errors = [await refused(alice) for _ in range(6)]
    upstream.state.behavior.fail_status = None
    assert await ask(bob) == chat_reply("up1", HELLO)
    assert [(e.status_code, retry_headers(e)) for e in errors] == [(503, TRY_AGAIN_NOW)] * 6  # not open


async def test_500s_seen_by_two_accounts_open_the_breaker(
    make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: FakeClock
) -> None:
    proxy = await make_proxy(make_config(tmp_path, upstream), monotonic=clock)  # type: ignore[call-arg]
    alice, bob = await sdk_of(proxy, "alice"), await sdk_of(proxy, "bob")
    upstream.state.behavior.fail_status = 500
    for sdk in (alice, alice, bob):
        await refused(sdk)
    upstream.state.behavior.fail_status = None
    assert retry_headers(await refused(alice)) == OPEN_FOR_30_S
    assert len(upstream.state.requests) == 3


async def test_a_success_forgets_which_accounts_saw_500s(
    make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, clock: FakeClock
) -> None:
    proxy = await make_proxy(make_config(tmp_path, upstream), monotonic=clock)  # type: ignore[call-arg]
    alice, bob = await sdk_of(proxy, "alice"), await sdk_of(proxy, "bob")
    upstream.state.behavior.fail_status, upstream.state.behavior.fail_times = 500, 2
    for _ in range(2):
        await refused(alice)
    assert await ask(alice) == chat_reply("up1", HELLO)
    upstream.state.behavior.fail_status, upstream.state.behavior.fail_times = 500, 1
    await refused(bob)  # the third 500, the second account, but after a success: one failure
    assert await ask(bob) == chat_reply("up1", HELLO)


# ---- nothing can serve ----


async def test_503_with_retry_after_when_every_backend_is_down(
    two: openai.AsyncOpenAI, upstream: UpstreamServer, upstream2: UpstreamServer
) -> None:
    await upstream.stop()
    upstream2.state.behavior.fail_status = 502
    error = await refused(two)
    assert error.status_code == 503
    assert retry_headers(error) == TRY_AGAIN_NOW  # neither breaker is open: either may be tried again
    assert error.code == "backend_unavailable"
    assert error.response.json()["error"]["type"] == "server_error"


async def test_the_503_of_an_open_breaker_says_when_the_next_probe_goes(
    one: openai.AsyncOpenAI, upstream: UpstreamServer, clock: FakeClock
) -> None:
    upstream.state.behavior.fail_status = 503
    for _ in range(3):
        await refused(one)
    clock.advance(10)
    assert retry_headers(await refused(one)) == {"Retry-After": "20", "retry-after-ms": "20000",
                                                 "x-should-retry": "false"}
    clock.advance(18.5)  # 1.5 s to go: worth the SDK's retry
    assert retry_headers(await refused(one)) == {"Retry-After": "2", "retry-after-ms": "1500"}


async def test_sdk_users_hear_at_once_when_every_breaker_is_open(
    make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, upstream2: UpstreamServer, clock: FakeClock
) -> None:
    proxy, key = await started(make_proxy, make_config(tmp_path, upstream, upstream2), clock)
    upstream.state.behavior.fail_status = upstream2.state.behavior.fail_status = 503
    for _ in range(3):
        await refused(proxy.sdk(key))
    retrying = proxy.sdk(key, max_retries=2)  # the SDK's default
    started_at = time.perf_counter()
    error = await refused(retrying)
    assert time.perf_counter() - started_at < 1.0
    assert (error.status_code, retry_headers(error)) == (503, OPEN_FOR_30_S)
    assert (len(upstream.state.requests), len(upstream2.state.requests)) == (3, 3)


# ---- timeouts ----


async def test_first_byte_timeout_gives_504(make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer) -> None:
    proxy, key = await started(make_proxy, make_config(tmp_path, upstream, first_byte=0.2))
    upstream.state.behavior.first_byte_delay = 1.0
    error = await refused(proxy.sdk(key))
    assert error.status_code == 504
    assert error.code == "upstream_timeout"


async def test_the_sdk_does_not_send_a_timed_out_request_again(
        make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer) -> None:
    """The SDKs retry a 504 twice by default: three times the load on a model already too slow."""
    proxy, key = await started(make_proxy, make_config(tmp_path, upstream, first_byte=0.2))
    upstream.state.behavior.first_byte_delay = 1.0
    with pytest.raises(openai.APIStatusError) as caught:
        await proxy.sdk(key, max_retries=2).chat.completions.create(model="gpt-4o", messages=HELLO)
    assert caught.value.status_code == 504 and caught.value.response.headers["x-should-retry"] == "false"
    assert len(upstream.state.requests) == 1


async def test_a_slow_backend_is_not_relieved_by_a_fast_one(
    make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, upstream2: UpstreamServer
) -> None:
    proxy, key = await started(make_proxy, make_config(tmp_path, upstream, upstream2, first_byte=0.2))
    upstream.state.behavior.first_byte_delay = 1.0
    assert (await refused(proxy.sdk(key))).status_code == 504  # the same request twice would double its load
    assert upstream2.state.requests == []
    assert await ask(proxy.sdk(key)) == chat_reply("up2", HELLO)  # the rotation goes on


async def test_a_slow_stream_is_not_cut_between_events_under_the_first_byte_timeout(
    make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer
) -> None:
    proxy, key = await started(make_proxy, make_config(tmp_path, upstream, first_byte=0.3))
    upstream.state.behavior.chunk_delay, upstream.state.behavior.reply = 0.15, "slow but steady"
    stream = await proxy.sdk(key).chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text == "slow but steady"


# ---- a broken backend ----


async def serve_raw(answer: bytes) -> asyncio.Server:
    """A TCP server that reads the request, writes ``answer`` and hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(answer)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("answer", "status", "code"),
    [
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\nProtocol mismatch.\r\n", 503, "backend_unavailable", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"id\":",
                     502, "bad_gateway", id="body-cut-short"),
    ],
)
async def test_a_broken_backend_is_a_clean_openai_error(
    make_proxy: MakeProxy, tmp_path: Path, answer: bytes, status: int, code: str
) -> None:
    server = await serve_raw(answer)
    port = server.sockets[0].getsockname()[1]
    try:
        data = config_dict(tmp_path, [f"http://127.0.0.1:{port}/v1"])
        proxy, key = await started(make_proxy, build_config(tmp_path, data))
        error = await refused(proxy.sdk(key))
    finally:
        server.close()
        await server.wait_closed()
    assert (error.status_code, error.code) == (status, code)
    assert set(error.response.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in error.response.text
    echo = await proxy.sdk(key).chat.completions.create(model="echo", messages=HELLO)  # the server lives on
    assert echo.choices[0].message.content

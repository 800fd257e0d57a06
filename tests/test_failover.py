"""Backends: spreading, failover, the circuit breaker, 503 when none can serve, and timeouts.

The breaker runs on the app's monotonic clock; these tests pass a fake one to ``create_app`` so a
30-second cool-down takes no time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from lumen_proxy.config import Config
from tests.conftest import MakeProxy, Proxy, build_config, config_dict
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


# ---- the circuit breaker ----


async def test_one_blip_does_not_take_a_backend_out(
    two: openai.AsyncOpenAI, upstream: UpstreamServer, upstream2: UpstreamServer
) -> None:
    upstream.state.behavior.fail_status, upstream.state.behavior.fail_times = 500, 1
    replies = [await ask(two) for _ in range(5)]
    assert replies[0] == chat_reply("up2", HELLO)  # the blip, served by the other backend
    assert replies[1:] == [chat_reply(name, HELLO) for name in ("up2", "up1", "up2", "up1")]


async def test_only_consecutive_failures_count(one: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    for _ in range(3):
        upstream.state.behavior.fail_status, upstream.state.behavior.fail_times = 500, 2
        for _ in range(2):
            assert (await refused(one)).status_code == 503
        assert await ask(one) == chat_reply("up1", HELLO)  # the success resets the count
    assert len(upstream.state.requests) == 9


async def test_breaker_opens_after_n_failures_and_a_probe_closes_it(
    one: openai.AsyncOpenAI, upstream: UpstreamServer, clock: FakeClock
) -> None:
    upstream.state.behavior.fail_status = 500
    for _ in range(3):
        await refused(one)
    assert len(upstream.state.requests) == 3
    # Open: the backend is skipped, the client is told to come back later.
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
    upstream.state.behavior.fail_status = 500
    for _ in range(3):
        await refused(one)
    clock.advance(30)
    await refused(one)  # the probe fails ...
    assert len(upstream.state.requests) == 4
    await refused(one)  # ... and the backend is skipped for another cool-down
    clock.advance(29)
    await refused(one)
    assert len(upstream.state.requests) == 4
    upstream.state.behavior.fail_status = None
    clock.advance(1)
    assert await ask(one) == chat_reply("up1", HELLO)


async def test_exactly_one_request_probes(one: openai.AsyncOpenAI, upstream: UpstreamServer, clock: FakeClock) -> None:
    upstream.state.behavior.fail_status = 500
    for _ in range(3):
        await refused(one)
    upstream.state.behavior.fail_status = None
    upstream.state.behavior.first_byte_delay = 0.3  # the probe takes a while
    clock.advance(30)
    probe = asyncio.create_task(ask(one))
    await asyncio.sleep(0.1)
    assert (await refused(one)).status_code == 503  # while the probe is out, others are not let through
    assert await probe == chat_reply("up1", HELLO)
    assert len(upstream.state.requests) == 4


async def test_an_open_backend_is_skipped_in_favour_of_a_healthy_one(
    two: openai.AsyncOpenAI, upstream: UpstreamServer, upstream2: UpstreamServer
) -> None:
    upstream.state.behavior.fail_status = 500
    replies = [await ask(two) for _ in range(10)]
    assert replies == [chat_reply("up2", HELLO)] * 10
    assert len(upstream.state.requests) == 3  # tried until the breaker opened, then left alone


# ---- nothing can serve ----


async def test_503_with_retry_after_when_every_backend_is_down(
    two: openai.AsyncOpenAI, upstream: UpstreamServer, upstream2: UpstreamServer
) -> None:
    await upstream.stop()
    upstream2.state.behavior.fail_status = 502
    error = await refused(two)
    assert error.status_code == 503
    assert int(error.response.headers["Retry-After"]) > 0
    assert error.code == "backend_unavailable"
    assert error.response.json()["error"]["type"] == "server_error"


# ---- timeouts ----


async def test_first_byte_timeout_gives_504(make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer) -> None:
    proxy, key = await started(make_proxy, make_config(tmp_path, upstream, first_byte=0.2))
    upstream.state.behavior.first_byte_delay = 1.0
    error = await refused(proxy.sdk(key))
    assert error.status_code == 504
    assert error.code == "upstream_timeout"


async def test_a_slow_backend_fails_over_to_a_fast_one(
    make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer, upstream2: UpstreamServer
) -> None:
    proxy, key = await started(make_proxy, make_config(tmp_path, upstream, upstream2, first_byte=0.2))
    upstream.state.behavior.first_byte_delay = 1.0
    assert await ask(proxy.sdk(key)) == chat_reply("up2", HELLO)


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

"""The breaker's rules in-process: ``connect`` over a scripted dialer, on a fake clock.

What the real app cannot easily show: a dial that raises something unforeseen, a probe that hangs,
a connect timeout, and the counting of ambiguous evidence per account. The user-visible side (the
real SDK, the fake upstream, the 503's headers) is in test_failover.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest

from lumen_proxy.backends import BackendPool, Upstream, connect
from lumen_proxy.config import Backend, Model, Timeouts
from lumen_proxy.errors import BackendUnavailable, UpstreamTimeout
from tests.test_failover import FakeClock

A = Backend(url="http://a.test/v1", model="m")
B = Backend(url="http://b.test/v1", model="m")
ONE = Model(name="m", backends=(A,))
TWO = Model(name="m", backends=(A, B))
ALICE, BOB = 1, 2


@dataclass
class Answer:
    status: int
    content_type: str = "application/json"
    retry_headers: dict[str, str] = field(default_factory=dict)

    async def read(self) -> bytes:
        return b"{}"

    async def chunks(self) -> AsyncIterator[bytes]:
        yield b"{}"

    def close(self) -> None:
        pass


class Dial:
    """Backends that answer a status, raise, or hang (``None``), as the test scripts them."""

    def __init__(self) -> None:
        self.plan: dict[Backend, int | Exception | None] = {}
        self.calls: list[Backend] = []
        self.reached = asyncio.Event()

    async def __call__(self, backend: Backend) -> Upstream:
        self.calls.append(backend)
        self.reached.set()
        what = self.plan.get(backend, 200)
        if what is None:
            await asyncio.Event().wait()
        if isinstance(what, Exception):
            raise what
        return Answer(what or 200)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pool(clock: FakeClock) -> BackendPool:
    return BackendPool(clock=clock)  # 3 failures, 30 s cool-down; a probe may take 10 + 300 s


@pytest.fixture
def dial() -> Dial:
    return Dial()


async def open_breaker(pool: BackendPool, dial: Dial) -> None:
    dial.plan[A] = 503
    for _ in range(3):
        with pytest.raises(BackendUnavailable):
            await connect(pool, ONE, dial, account=ALICE)
    assert not pool.state(A).up


async def test_a_probe_that_raises_lets_the_next_request_probe_at_once(
    pool: BackendPool, dial: Dial, clock: FakeClock
) -> None:
    await open_breaker(pool, dial)
    clock.advance(30)
    dial.plan[A] = RuntimeError("a bug set off by this body")
    with pytest.raises(RuntimeError):
        await connect(pool, ONE, dial, account=ALICE)
    dial.plan[A] = 200
    assert (await connect(pool, ONE, dial, account=BOB))[0] == A  # no second cool-down, no restart
    assert pool.state(A).up


async def test_probes_raising_for_two_accounts_open_the_breaker_again(
    pool: BackendPool, dial: Dial, clock: FakeClock
) -> None:
    await open_breaker(pool, dial)
    clock.advance(30)
    dial.plan[A] = RuntimeError("it happens to everyone")
    for account in (ALICE, BOB):
        with pytest.raises(RuntimeError):
            await connect(pool, ONE, dial, account=account)
    with pytest.raises(BackendUnavailable) as caught:
        await connect(pool, ONE, dial, account=ALICE)
    assert caught.value.headers["Retry-After"] == "30"
    assert len(dial.calls) == 5


async def test_a_hung_probe_lets_another_request_probe_after_its_deadline(
    pool: BackendPool, dial: Dial, clock: FakeClock
) -> None:
    pool.timeouts = Timeouts(connect=1, first_byte=5)
    await open_breaker(pool, dial)
    clock.advance(30)
    dial.plan[A], dial.reached = None, asyncio.Event()
    hung = asyncio.create_task(connect(pool, ONE, dial, account=ALICE))
    await dial.reached.wait()
    clock.advance(5.9)
    with pytest.raises(BackendUnavailable):  # the probe may still answer
        await connect(pool, ONE, dial, account=BOB)
    clock.advance(0.1)  # connect + first_byte: it cannot any more
    dial.plan[A] = 200
    assert (await connect(pool, ONE, dial, account=BOB))[0] == A
    hung.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hung
    assert pool.state(A).up


async def test_a_connect_timeout_fails_over_and_counts_against_the_backend(pool: BackendPool, dial: Dial) -> None:
    dial.plan[A] = aiohttp.ConnectionTimeoutError()
    served = [(await connect(pool, TWO, dial, account=ALICE))[0] for _ in range(6)]
    assert served == [B] * 6
    assert dial.calls.count(A) == 3  # tried every other request, until the breaker opened
    assert not pool.state(A).up


async def test_a_first_byte_timeout_is_a_504_without_trying_the_next_backend(pool: BackendPool, dial: Dial) -> None:
    dial.plan[A] = aiohttp.SocketTimeoutError()
    with pytest.raises(UpstreamTimeout):
        await connect(pool, TWO, dial, account=ALICE)
    assert dial.calls == [A]


def test_ambiguous_failures_count_once_two_accounts_have_seen_them(pool: BackendPool) -> None:
    for _ in range(2):
        pool.failed(A, "HTTP 500", ambiguous=True, account=ALICE)
    pool.failed(A, "ServerDisconnectedError")
    assert pool.state(A).up  # one strong failure, and alice's own 500s
    pool.failed(A, "HTTP 500", ambiguous=True, account=BOB)
    assert not pool.state(A).up  # now alice's count too: 4 of 3


def test_callers_without_an_account_count_as_one(pool: BackendPool) -> None:
    for _ in range(5):
        pool.failed(A, "first-byte timeout", ambiguous=True)
    assert pool.state(A).up

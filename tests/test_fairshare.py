"""Fair share of saturated backends: ``max_concurrency`` slots and the fair queue in front of them.

The first half drives :class:`FairShare` alone (no HTTP): a gate's slots are held through ``take``,
waiters are queued as tasks, and each ``release`` hands the freed slot on; the order in which the
tasks come back is the order the queue granted. Time is an injected clock where it is reported, and
the real waits are a few hundredths of a second at most.

The second half runs the real app (``make_proxy``) over the fake upstream with gated backends. The
fake's ``behavior.gate`` is an ``asyncio.Event`` every POST waits for; :class:`Turnstile` (an Event
whose ``wait`` takes one pass at a time) lets the test answer the backend's requests one by one, so
the order in which the fake receives the queued requests is the order Lumen granted their slots.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lumen_proxy.config import Backend
from lumen_proxy.fairshare import FairShare, Gate, QueueTimeout
from lumen_proxy.portal.guard import PORTAL
from lumen_proxy.store import AccountRow
from tests.conftest import MakeProxy, Proxy, auth, build_config, config_dict, eventually, query
from tests.fake_upstream import RecordedRequest, UpstreamServer

MODEL = "gpt-4o"
CHAT = "/v1/chat/completions"
MICRO = 1_000_000
HOLDER = 0  # the account whose requests hold the slots when a pure test starts


# -- the queue alone ---------------------------------------------------------------------------------
async def settle() -> None:
    """Let granted waiters' tasks resume (a grant reaches its task a few loop turns later)."""
    for _ in range(10):
        await asyncio.sleep(0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gate_of(share: FairShare, capacity: int = 1, url: str = "http://gpu-a:8000/v1") -> Gate:
    gate = share.gate(Backend(url=url, model="m", max_concurrency=capacity))
    assert gate is not None
    return gate


class Waiters:
    """Requests of accounts on ``share``: slots they hold, and tasks waiting for one.

    ``granted`` lists the waiters' names (``<account>.<n>``) in the order they got a slot; a granted
    waiter then holds its slot until :meth:`serve` lets it go.
    """

    def __init__(self, share: FairShare) -> None:
        self.share = share
        self.granted: list[str] = []
        self.tasks: dict[str, asyncio.Task[Gate]] = {}
        self.counts: dict[int, int] = {}
        self.holding: list[tuple[Gate, int]] = []  # (gate, account) per slot held, oldest first

    def hold(self, gate: Gate, account: int = HOLDER) -> bool:
        taken = self.share.take(gate, account)
        if taken:
            self.holding.append((gate, account))
        return taken

    def add(self, account: int, gates: list[Gate], *, cost: int = 100, weight: float = 1.0,
            within: float = 60.0, name: str | None = None) -> str:
        n = self.counts[account] = self.counts.get(account, 0) + 1
        name = name or f"{account}.{n}"

        async def wait() -> Gate:
            got = await self.share.wait(gates, account=account, model="m", weight=weight, cost=cost, within=within)
            self.granted.append(name)
            self.holding.append((got, account))
            return got

        self.tasks[name] = asyncio.create_task(wait())
        return name

    def let_go(self, gate: Gate) -> None:
        """The oldest request holding a slot of ``gate`` ends."""
        held = next(i for i, (g, _) in enumerate(self.holding) if g is gate)
        _, account = self.holding.pop(held)
        self.share.release(gate, account)

    async def serve(self, gate: Gate, grants: int) -> list[str]:
        """End the oldest request on ``gate`` ``grants`` times; the names granted meanwhile."""
        before = len(self.granted)
        for _ in range(grants):
            self.let_go(gate)
            await settle()
        return self.granted[before:]

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


@pytest.fixture
async def waiters() -> AsyncIterator[Callable[[FairShare], Waiters]]:
    made: list[Waiters] = []

    def make(share: FairShare) -> Waiters:
        made.append(Waiters(share))
        return made[-1]

    yield make
    for w in made:
        await w.close()


MakeWaiters = Callable[[FairShare], Waiters]


def account_of(name: str) -> str:
    return name.split(".")[0]


async def test_fast_path_takes_up_to_capacity_without_awaiting() -> None:
    share = FairShare()
    gate = gate_of(share, capacity=2)
    assert share.gate(Backend(url="http://gpu-a:8000/v1", model="m", max_concurrency=2)) is gate  # one per backend
    assert share.gate(Backend(url="http://gpu-a:8000/v1", model="m")) is None  # no max_concurrency: no gate
    assert not inspect.iscoroutinefunction(share.take) and not inspect.iscoroutinefunction(share.release)
    assert share.take(gate, 1) is True and share.take(gate, 2) is True
    assert share.take(gate, 3) is False and gate.busy == 2
    share.release(gate, 1)
    assert gate.busy == 1 and share.take(gate, 3) is True
    share.release(gate, 2)
    share.release(gate, 3)
    assert gate.busy == 0 and gate.held == {} and share.depth() == {} and share.finish == {}
    assert by_url(share.slots()) == {"http://gpu-a:8000/v1": {"busy": 0, "capacity": 2}}


async def test_a_newcomer_never_takes_a_slot_a_waiter_waits_for(waiters: MakeWaiters) -> None:
    share = FairShare()
    gate = gate_of(share)
    queue = waiters(share)
    assert queue.hold(gate)
    queue.add(1, [gate])
    await settle()
    gate.capacity = 2  # as a reload that raises max_concurrency leaves it, until the next grant
    assert share.take(gate, 2) is False  # a free slot, but someone waits for it
    assert await queue.serve(gate, 1) == ["1.1"]


async def test_a_light_account_is_served_before_a_heavy_accounts_backlog(waiters: MakeWaiters) -> None:
    share = FairShare()
    gate = gate_of(share)
    queue = waiters(share)
    assert queue.hold(gate)
    for _ in range(10):
        queue.add(1, [gate], cost=100)  # heavy: tags 100, 200, ..., 1000
    queue.add(2, [gate], cost=100)  # light: tag 100, level with the heavy's first (which came first)
    await settle()
    assert share.depth() == {"m": 11} and share.waiting_of(1) == 10 and share.waiting_of(2) == 1
    assert await queue.serve(gate, 3) == ["1.1", "2.1", "1.2"]  # light before the heavy's 2nd
    assert await queue.serve(gate, 8) == [f"1.{n}" for n in range(3, 11)]
    queue.let_go(gate)
    assert gate.busy == 0 and share.depth() == {}


async def test_an_account_holding_fewer_slots_goes_first(waiters: MakeWaiters) -> None:
    share = FairShare()
    gate = gate_of(share, capacity=3)
    queue = waiters(share)
    assert queue.hold(gate, 2) and queue.hold(gate, 1) and queue.hold(gate, 1)
    queue.add(1, [gate], cost=1)  # the smallest tag, but its account holds two slots
    queue.add(2, [gate], cost=1000)
    queue.add(2, [gate], cost=1000)
    await settle()
    assert await queue.serve(gate, 1) == ["2.1"]  # 2's slot freed: it holds none, 1 holds two
    assert gate.held == {1: 2, 2: 1}
    assert await queue.serve(gate, 1) == ["1.1"]  # 1 holds one, 2 holds one: the smaller tag goes first
    assert gate.held == {1: 2, 2: 1}
    assert await queue.serve(gate, 1) == ["2.2"]
    for _ in range(3):
        queue.let_go(gate)
    assert gate.busy == 0 and gate.held == {}


async def test_light_accounts_interleave_and_nobody_gets_two_turns_in_a_row(waiters: MakeWaiters) -> None:
    share = FairShare()
    gate = gate_of(share)
    queue = waiters(share)
    assert queue.hold(gate)
    for _ in range(6):
        queue.add(1, [gate])
    for _ in range(2):
        for light in (2, 3, 4):
            queue.add(light, [gate])
    await settle()
    order = [account_of(n) for n in await queue.serve(gate, 12)]
    assert order == ["1", "2", "3", "4", "1", "2", "3", "4", "1", "1", "1", "1"]
    for i in range(1, len(order)):  # two in a row only once nobody else waits
        if order[i] == order[i - 1]:
            assert set(order[i:]) == {order[i]}
    queue.let_go(gate)
    assert gate.busy == 0


async def test_a_group_weight_of_two_gets_twice_the_turns(waiters: MakeWaiters) -> None:
    share = FairShare()
    gate = gate_of(share)
    queue = waiters(share)
    assert queue.hold(gate)
    for _ in range(6):
        queue.add(1, [gate], weight=1.0)
    for _ in range(6):
        queue.add(2, [gate], weight=2.0)
    await settle()
    first = [account_of(n) for n in await queue.serve(gate, 6)]
    assert abs(first.count("2") - 4) <= 1 and first.count("1") + first.count("2") == 6
    await queue.serve(gate, 6)
    queue.let_go(gate)
    assert gate.busy == 0 and len(queue.granted) == 12


async def test_expensive_requests_get_a_tenth_of_the_turns_of_cheap_ones(waiters: MakeWaiters) -> None:
    share = FairShare()
    gate = gate_of(share)
    queue = waiters(share)
    assert queue.hold(gate)
    for _ in range(3):
        queue.add(1, [gate], cost=1000)
    for _ in range(30):
        queue.add(2, [gate], cost=100)
    await settle()
    order = [account_of(n) for n in await queue.serve(gate, 33)]
    expensive = [i for i, a in enumerate(order) if a == "1"]
    assert len(expensive) == 3
    gaps = [expensive[0]] + [b - a - 1 for a, b in zip(expensive, expensive[1:], strict=False)]
    assert all(9 <= g <= 11 for g in gaps), order  # ~10 cheap grants per expensive one
    queue.let_go(gate)
    assert gate.busy == 0


async def test_a_waiter_on_two_gates_is_granted_once_by_whichever_frees_first(waiters: MakeWaiters) -> None:
    share = FairShare()
    a, b = gate_of(share, url="http://gpu-a:8000/v1"), gate_of(share, url="http://gpu-b:8000/v1")
    queue = waiters(share)
    assert queue.hold(a) and queue.hold(b)
    both = queue.add(1, [a, b], name="both")
    only_a = queue.add(2, [a], name="only-a")
    await settle()
    assert share.depth() == {"m": 2}
    queue.let_go(b)
    await settle()
    assert queue.granted == ["both"] and queue.tasks[both].result() is b
    assert (a.busy, b.busy) == (1, 1) and share.depth() == {"m": 1}
    queue.let_go(a)  # "both" waits there no more: a's slot goes to the next waiter
    await settle()
    assert queue.granted == ["both", "only-a"] and queue.tasks[only_a].result() is a
    assert (a.busy, b.busy) == (1, 1) and share.depth() == {}
    queue.let_go(a)
    queue.let_go(b)
    assert (a.busy, b.busy) == (0, 0)
    assert queue.hold(a) and queue.hold(b)  # nothing stale blocks the fast path
    queue.let_go(a)
    queue.let_go(b)
    assert (a.busy, b.busy) == (0, 0) and a.held == b.held == {}


async def test_a_cancelled_waiter_leaves_the_queue(waiters: MakeWaiters) -> None:
    share = FairShare()
    gate = gate_of(share)
    queue = waiters(share)
    assert queue.hold(gate)
    gone = queue.add(1, [gate])
    stays = queue.add(2, [gate])
    await settle()
    assert share.depth() == {"m": 2}
    queue.tasks[gone].cancel()
    await settle()
    assert queue.tasks[gone].cancelled()
    assert share.depth() == {"m": 1} and share.waiting_of(1) == 0 and share.waiting_of(2) == 1
    assert await queue.serve(gate, 1) == [stays]
    assert gate.busy == 1 and gate.held == {2: 1}
    queue.let_go(gate)
    assert gate.busy == 0 and share.depth() == {}


@pytest.mark.parametrize("first", [
    "cancel",
    "grant",
])
async def test_a_waiter_granted_and_cancelled_in_the_same_turn_passes_the_slot_on(
        waiters: MakeWaiters, first: str) -> None:
    share = FairShare()
    gate = gate_of(share)
    queue = waiters(share)
    assert queue.hold(gate)
    leaving = queue.add(1, [gate])
    following = queue.add(2, [gate])
    await settle()
    if first == "cancel":
        queue.tasks[leaving].cancel()
        queue.let_go(gate)
    else:  # the client disconnects in the very turn its slot is granted
        queue.let_go(gate)
        queue.tasks[leaving].cancel()
    await settle()
    assert queue.tasks[leaving].cancelled()
    assert queue.granted == [following] and queue.tasks[following].result() is gate
    assert gate.busy == 1 and gate.held == {2: 1} and share.depth() == {}
    queue.let_go(gate)
    assert gate.busy == 0


async def test_queue_timeout_after_within_counts_the_waiters_ahead(waiters: MakeWaiters) -> None:
    clock = Clock()
    share = FairShare(clock=clock)
    gate = gate_of(share)
    queue = waiters(share)
    assert queue.hold(gate)
    for _ in range(3):
        queue.add(1, [gate])
    await settle()
    clock.now += 1
    late = asyncio.create_task(share.wait([gate], account=1, model="m", weight=1, cost=100, within=0.05))
    await settle()
    assert share.depth() == {"m": 4}
    clock.now += 7.5  # what the injected clock says passed; the real wait is `within`
    with pytest.raises(QueueTimeout) as raised:
        await late
    assert raised.value.waited == pytest.approx(7.5) and raised.value.ahead == 3
    assert "waited 7.5 s" in str(raised.value)
    assert share.depth() == {"m": 3} and share.waiting_of(1) == 3
    assert await queue.serve(gate, 3) == ["1.1", "1.2", "1.3"]
    queue.let_go(gate)
    assert gate.busy == 0


async def test_queue_timeout_counts_a_waiter_on_two_gates_once(waiters: MakeWaiters) -> None:
    share = FairShare()
    a, b = gate_of(share, url="http://gpu-a:8000/v1"), gate_of(share, url="http://gpu-b:8000/v1")
    queue = waiters(share)
    assert queue.hold(a) and queue.hold(b)
    queue.add(1, [a, b])
    await settle()
    with pytest.raises(QueueTimeout) as raised:
        await share.wait([a, b], account=1, model="m", weight=1, cost=100, within=0.02)
    assert raised.value.ahead == 1


async def test_queue_timeout_counts_an_earlier_waiter_with_an_equal_tag(waiters: MakeWaiters) -> None:
    share = FairShare()
    gate = gate_of(share)
    queue = waiters(share)
    assert queue.hold(gate)
    queue.add(1, [gate], cost=100)  # account 1's first: tag 100
    await settle()
    with pytest.raises(QueueTimeout) as raised:  # account 2's first: tag 100 too, behind it
        await share.wait([gate], account=2, model="m", weight=1, cost=100, within=0.02)
    assert raised.value.ahead == 1


async def test_a_heavy_account_that_keeps_requeuing_cannot_starve_a_light_one(waiters: MakeWaiters) -> None:
    share = FairShare()
    gate = gate_of(share)
    queue = waiters(share)
    assert queue.hold(gate)
    for _ in range(20):
        queue.add(1, [gate])
    await settle()
    await queue.serve(gate, 10)  # the heavy backlog has been served a while: V moved on
    light = queue.add(2, [gate])
    await settle()
    served_before_light = 0
    for _ in range(50):
        granted = await queue.serve(gate, 1)
        assert len(granted) == 1
        if granted == [light]:
            break
        served_before_light += 1
        for _ in range(2):  # each heavy turn queues two more
            queue.add(1, [gate])
        await settle()
    assert light in queue.granted and served_before_light <= 2
    assert share.waiting_of(1) > 10  # the heavy backlog was still growing


async def test_requests_that_left_the_queue_do_not_push_the_account_back(waiters: MakeWaiters) -> None:
    share = FairShare()
    gate = gate_of(share)
    queue = waiters(share)
    assert queue.hold(gate)
    left = [queue.add(1, [gate]) for _ in range(10)]
    await settle()
    for name in left:
        queue.tasks[name].cancel()
    await settle()
    for _ in range(3):
        queue.add(2, [gate])
    back = queue.add(1, [gate])
    await settle()
    assert share.depth() == {"m": 4}
    order = await queue.serve(gate, 4)
    assert order.index(back) <= 1, order  # account 1 was served nothing: it is no heavier than account 2


async def test_every_slot_is_back_after_a_mixed_run(waiters: MakeWaiters) -> None:
    share = FairShare()
    a, b = gate_of(share, capacity=2, url="http://gpu-a:8000/v1"), gate_of(share, url="http://gpu-b:8000/v1")
    queue = waiters(share)
    assert queue.hold(a) and queue.hold(a, 5) and queue.hold(b)
    names = [queue.add(account, [a, b] if account % 2 else [a]) for account in range(1, 9)]
    await settle()
    for name in names[::3]:
        queue.tasks[name].cancel()
    await settle()
    for _ in range(100):
        if not queue.holding:
            break
        gate, _ = queue.holding[0]
        queue.let_go(gate)
        await settle()
    assert all(t.done() for t in queue.tasks.values())
    assert len(queue.granted) == 8 - len(names[::3])
    assert (a.busy, b.busy) == (0, 0) and a.held == b.held == {} and share.depth() == {}


# -- through the app ---------------------------------------------------------------------------------
class Turnstile(asyncio.Event):
    """The fake's ``behavior.gate``, letting the POSTs that wait at it go one at a time (``let_one``)."""

    def __init__(self) -> None:
        super().__init__()
        self.passes = asyncio.Semaphore(0)
        self.blocked = 0

    async def wait(self) -> Literal[True]:
        if not self.is_set():
            self.blocked += 1
            try:
                await self.passes.acquire()
            finally:
                self.blocked -= 1
        return True

    def let_one(self) -> None:
        self.passes.release()

    def open(self) -> None:
        self.set()
        for _ in range(self.blocked):
            self.passes.release()


def by_url(slots: dict[tuple[str, str], dict[str, int]]) -> dict[str, dict[str, int]]:
    """FairShare.slots() by backend URL (each test's backends serve one upstream model)."""
    return {label: value for (label, _model), value in slots.items()}


def gated(tmp_path: Path, urls: list[str], capacity: int = 2, **top: Any) -> dict[str, Any]:
    data = config_dict(tmp_path, urls, **top)
    for backend in data["models"][0]["backends"]:
        backend["max_concurrency"] = capacity
    return data


async def member(proxy: Proxy, name: str, group: str | None = None) -> tuple[AccountRow, str]:
    async with proxy.rt.usage.lock:
        row = await proxy.rt.store.add_account(name, 1000 * MICRO, group=group)
    await proxy.rt.view.reload()
    return row, await proxy.key(name)


def ask(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 10, **extra}


async def post(session: aiohttp.ClientSession, proxy: Proxy, key: str, body: dict[str, Any],
               path: str = CHAT) -> tuple[int, dict[str, str], Any]:
    async with session.post(proxy.origin + path, json=body, headers=auth(key)) as response:
        return response.status, dict(response.headers), await response.json()


async def model_health(session: aiohttp.ClientSession, proxy: Proxy, model: str = MODEL) -> dict[str, Any]:
    async with session.get(proxy.origin + "/healthz") as response:
        health: dict[str, Any] = (await response.json())["models"][model]
        return health


def chats(upstream: UpstreamServer) -> list[RecordedRequest]:
    return upstream.state.requests_to(CHAT)


def sender(record: RecordedRequest) -> str:
    return str(record.body["messages"][0]["content"])


async def until(check: Callable[[], bool], within: float = 5.0) -> bool:
    async def probe() -> bool:
        return check()

    return await eventually(probe, within=within, step=0.01)


async def waiting_is(session: aiohttp.ClientSession, proxy: Proxy, n: int) -> bool:
    async def probe() -> bool:
        return (await model_health(session, proxy)).get("waiting") == n

    return await eventually(probe, step=0.01)


async def finish(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def rows_of(proxy: Proxy, account: AccountRow) -> list[Any]:
    return query(proxy.rt.config.database, "SELECT status, cost, backend FROM usage WHERE account_id = ? ORDER BY id",
                 account.id)


async def queue_order(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> list[str]:
    """Heavy sends 6 at once (2 reach the backend, 4 wait), then light 1; the backend answers one at a time.
    The senders in the order the backend received them."""
    proxy = await make_proxy(build_config(tmp_path, gated(tmp_path, [upstream.base_url], capacity=2)))
    _, heavy = await member(proxy, "heavy")
    _, light = await member(proxy, "light")
    turnstile = Turnstile()
    upstream.state.behavior.gate = turnstile
    tasks: list[asyncio.Task[Any]] = []
    async with aiohttp.ClientSession() as session:
        try:
            tasks += [asyncio.create_task(post(session, proxy, heavy, ask("heavy"))) for _ in range(6)]
            assert await waiting_is(session, proxy, 4)
            assert len(chats(upstream)) == 2
            health = await model_health(session, proxy)
            assert health["slots"] == {upstream.base_url: {"busy": 2, "capacity": 2}}
            tasks.append(asyncio.create_task(post(session, proxy, light, ask("light"))))  # same size, same cost
            assert await waiting_is(session, proxy, 5)
            for arrived in range(3, 8):
                turnstile.let_one()
                assert await until(lambda n=arrived: len(chats(upstream)) >= n)  # type: ignore[misc]
                assert len(chats(upstream)) == arrived  # one answer frees one slot: one grant
            turnstile.open()
            results = await asyncio.gather(*tasks)
        finally:
            await finish(tasks)
        assert [status for status, _, _ in results] == [200] * 7
        health = await model_health(session, proxy)
        assert health["waiting"] == 0 and health["slots"][upstream.base_url]["busy"] == 0
    return [sender(r) for r in chats(upstream)]


async def test_queued_requests_reach_the_backend_in_fair_order(make_proxy: MakeProxy, upstream: UpstreamServer,
                                                               tmp_path: Path) -> None:
    order = await queue_order(make_proxy, upstream, tmp_path)
    assert order.count("heavy") == 6 and order.count("light") == 1
    assert order.index("light") == 2  # right after the two heavy requests the backend had, before the 4 waiting


async def test_queue_timeout_is_a_503_that_bills_nothing_and_releases_the_hold(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    proxy = await make_proxy(build_config(tmp_path, gated(tmp_path, [upstream.base_url], queue_timeout=0.3)))
    assert proxy.rt.config.queue_timeout == 0.3
    _, busy = await member(proxy, "busy")
    late, late_key = await member(proxy, "late")
    gate = upstream.state.behavior.gate = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    async with aiohttp.ClientSession() as session:
        try:
            tasks += [asyncio.create_task(post(session, proxy, busy, ask("busy"))) for _ in range(2)]
            assert await until(lambda: len(chats(upstream)) == 2)
            client = proxy.sdk(late_key)
            waiting = asyncio.create_task(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "late"}], max_tokens=10))
            tasks.append(waiting)
            assert await until(lambda: proxy.rt.share.waiting_of(late.id) == 1)
            assert proxy.rt.wallets.held_by(late.id) > 0
            with pytest.raises(openai.APIStatusError) as raised:
                await waiting
            error = raised.value
            assert error.status_code == 503
            assert error.response.headers["Retry-After"] == "5" and error.response.headers["retry-after-ms"] == "5000"
            body = error.response.json()
            assert set(body) == {"error"} and set(body["error"]) >= {"message", "type", "param", "code"}
            assert body["error"]["type"] == "server_error" and body["error"]["code"] == "backend_unavailable"
            assert "queue_timeout" in body["error"]["message"] and "waited" in body["error"]["message"]
            assert "busy" in body["error"]["message"]
            request_id = error.response.headers["x-request-id"]
            assert proxy.rt.wallets.held_by(late.id) == 0 and proxy.rt.share.depth() == {}
            assert len(chats(upstream)) == 2  # it never reached the backend
            gate.set()
            assert [s for s, _, _ in await asyncio.gather(*tasks[:2])] == [200, 200]
        finally:
            await finish(tasks)
    await proxy.flush()
    rows = query(proxy.rt.config.database, "SELECT status, cost, account_id FROM usage WHERE request_id = ?",
                 request_id)
    assert [tuple(r) for r in rows] == [(503, 0, late.id)]


async def test_a_client_that_leaves_while_waiting_is_never_sent_nor_billed(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    proxy = await make_proxy(build_config(tmp_path, gated(tmp_path, [upstream.base_url])))
    _, busy = await member(proxy, "busy")
    leaver, leaver_key = await member(proxy, "leaver")
    gate = upstream.state.behavior.gate = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    async with aiohttp.ClientSession() as session:
        try:
            tasks += [asyncio.create_task(post(session, proxy, busy, ask("busy"))) for _ in range(2)]
            assert await until(lambda: len(chats(upstream)) == 2)
            leaving = asyncio.create_task(post(session, proxy, leaver_key, ask("leaving")))
            assert await waiting_is(session, proxy, 1)
            assert proxy.rt.wallets.held_by(leaver.id) > 0
            leaving.cancel()  # closes the connection: the server cancels the handler
            await asyncio.gather(leaving, return_exceptions=True)
            assert await waiting_is(session, proxy, 0)
            assert await until(lambda: proxy.rt.wallets.held_by(leaver.id) == 0)
            assert proxy.rt.share.waiting_of(leaver.id) == 0
            assert (await model_health(session, proxy))["slots"][upstream.base_url]["busy"] == 2
            gate.set()
            assert [s for s, _, _ in await asyncio.gather(*tasks)] == [200, 200]
            assert await until(lambda: (by_url(proxy.rt.share.slots())[upstream.base_url]["busy"] == 0))
            gate.clear()  # a later request still gets a slot (two even, at once)
            again = [asyncio.create_task(post(session, proxy, leaver_key, ask("again"))) for _ in range(2)]
            tasks += again
            assert await until(lambda: len(chats(upstream)) == 4)
            assert (await model_health(session, proxy))["waiting"] == 0
            gate.set()
            assert [s for s, _, _ in await asyncio.gather(*again)] == [200, 200]
        finally:
            await finish(tasks)
    assert [sender(r) for r in chats(upstream)] == ["busy", "busy", "again", "again"]  # never "leaving"
    await proxy.flush()
    rows = rows_of(proxy, leaver)
    assert [(r["status"], r["cost"], r["backend"]) for r in rows][0] == (499, 0, None)
    assert [r["status"] for r in rows[1:]] == [200, 200]
    assert proxy.rt.wallets.held_by(leaver.id) == 0


async def test_a_stream_holds_its_slot_until_its_last_byte(make_proxy: MakeProxy, upstream: UpstreamServer,
                                                           tmp_path: Path) -> None:
    proxy = await make_proxy(build_config(tmp_path, gated(tmp_path, [upstream.base_url], capacity=1)))
    _, key = await member(proxy, "alice")
    _, other = await member(proxy, "bob")
    upstream.state.behavior.reply = "one two three four five six seven eight"
    upstream.state.behavior.chunk_delay = 0.03
    client = proxy.sdk(key)
    tasks: list[asyncio.Task[Any]] = []
    first_done_when_second_arrived: list[bool] = []

    class Probe(asyncio.Event):
        async def wait(self) -> Literal[True]:
            first_done_when_second_arrived.append(chats(upstream)[0].finished)
            return True

    async with aiohttp.ClientSession() as session:
        try:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "stream"}], max_tokens=50, stream=True)
            pieces: list[str] = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                if len(pieces) == 1 and not tasks:
                    upstream.state.behavior.gate = Probe()  # the stream already passed the fake's gate
                    tasks.append(asyncio.create_task(post(session, proxy, other, ask("second"))))
                    assert await waiting_is(session, proxy, 1)
                if tasks and not tasks[0].done():
                    assert len(chats(upstream)) == 1
            assert "".join(pieces).split() == "one two three four five six seven eight".split()
            status, _, _ = await tasks[0]
            assert status == 200
        finally:
            await finish(tasks)
    assert [sender(r) for r in chats(upstream)] == ["stream", "second"]
    assert first_done_when_second_arrived == [True]
    assert by_url(proxy.rt.share.slots())[upstream.base_url] == {"busy": 0, "capacity": 1}


async def test_a_client_leaving_mid_stream_frees_the_slot_at_once(make_proxy: MakeProxy, upstream: UpstreamServer,
                                                                  tmp_path: Path) -> None:
    proxy = await make_proxy(build_config(tmp_path, gated(tmp_path, [upstream.base_url], capacity=1)))
    _, key = await member(proxy, "alice")
    upstream.state.behavior.reply = " ".join(f"w{n}" for n in range(40))
    upstream.state.behavior.chunk_delay = 0.05  # two seconds of stream, if nobody left
    async with aiohttp.ClientSession() as session:
        response = await session.post(proxy.origin + CHAT, json=ask("stream", stream=True), headers=auth(key))
        assert response.status == 200
        await response.content.readany()
        assert by_url(proxy.rt.share.slots())[upstream.base_url]["busy"] == 1
        response.close()  # the client goes away mid-stream
        assert await until(lambda: by_url(proxy.rt.share.slots())[upstream.base_url]["busy"] == 0, within=1.0)
        assert await until(lambda: chats(upstream)[0].disconnected)  # and the backend was told to stop
        status, _, _ = await post(session, proxy, key, ask("after"))
        assert status == 200
    assert by_url(proxy.rt.share.slots())[upstream.base_url]["busy"] == 0 and proxy.rt.share.depth() == {}


async def test_an_uncapped_backend_beside_a_full_one_takes_the_overflow(
        make_proxy: MakeProxy, upstream: UpstreamServer, upstream2: UpstreamServer, tmp_path: Path) -> None:
    data = config_dict(tmp_path, [upstream.base_url, upstream2.base_url])
    data["models"][0]["backends"][0]["max_concurrency"] = 1
    proxy = await make_proxy(build_config(tmp_path, data))
    assert proxy.rt.config.model(MODEL).gated
    _, key = await member(proxy, "alice")
    gate1 = upstream.state.behavior.gate = asyncio.Event()
    gate2 = upstream2.state.behavior.gate = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(post(session, proxy, key, ask(f"r{n}"))) for n in range(4)]
        try:
            assert await until(lambda: len(chats(upstream)) + len(chats(upstream2)) == 4)
            assert (len(chats(upstream)), len(chats(upstream2))) == (1, 3)  # nobody waits while one can serve
            health = await model_health(session, proxy)
            assert health["waiting"] == 0 and health["slots"] == {upstream.base_url: {"busy": 1, "capacity": 1}}
            gate1.set()
            gate2.set()
            assert [s for s, _, _ in await asyncio.gather(*tasks)] == [200] * 4
        finally:
            await finish(tasks)
    assert by_url(proxy.rt.share.slots()) == {upstream.base_url: {"busy": 0, "capacity": 1}}


async def test_failover_between_gated_backends(make_proxy: MakeProxy, upstream: UpstreamServer,
                                               upstream2: UpstreamServer, tmp_path: Path) -> None:
    proxy = await make_proxy(build_config(tmp_path, gated(tmp_path, [upstream.base_url, upstream2.base_url],
                                                          capacity=1)))
    _, key = await member(proxy, "alice")
    upstream2.state.behavior.fail_status = 500
    tasks: list[asyncio.Task[Any]] = []
    async with aiohttp.ClientSession() as session:
        try:
            for _ in range(4):  # the rotation puts the failing backend first every other time
                status, _, answer = await post(session, proxy, key, ask("fail over"))
                assert status == 200 and "up1" in answer["choices"][0]["message"]["content"]
            assert len(chats(upstream)) == 4 and len(chats(upstream2)) >= 1
            assert by_url(proxy.rt.share.slots()) == {upstream.base_url: {"busy": 0, "capacity": 1},
                                              upstream2.base_url: {"busy": 0, "capacity": 1}}

            upstream2.state.behavior.fail_status = None
            gate1 = upstream.state.behavior.gate = asyncio.Event()
            gate2 = upstream2.state.behavior.gate = asyncio.Event()
            seen1, seen2 = len(chats(upstream)), len(chats(upstream2))
            tasks += [asyncio.create_task(post(session, proxy, key, ask(f"slot {n}"))) for n in range(2)]
            assert await until(lambda: (len(chats(upstream)), len(chats(upstream2))) == (seen1 + 1, seen2 + 1))
            tasks.append(asyncio.create_task(post(session, proxy, key, ask("waits"))))
            assert await waiting_is(session, proxy, 1)
            gate2.set()  # the second backend frees first: the waiting request goes there
            assert await until(lambda: len(chats(upstream2)) == seen2 + 2)
            assert sender(chats(upstream2)[-1]) == "waits" and len(chats(upstream)) == seen1 + 1
            gate1.set()
            assert [s for s, _, _ in await asyncio.gather(*tasks)] == [200, 200, 200]
        finally:
            await finish(tasks)
    assert all(s["busy"] == 0 for s in by_url(proxy.rt.share.slots()).values())


async def test_send_priority_sends_the_groups_priority_not_the_clients(
        make_proxy: MakeProxy, upstream: UpstreamServer, upstream2: UpstreamServer, tmp_path: Path) -> None:
    data = config_dict(tmp_path, [upstream.base_url], groups=[{"name": "batch", "priority": -5, "weight": 0.5}])
    data["models"][0]["backends"][0]["send_priority"] = True
    data["models"].append({"name": "plain", "backends": [{"url": upstream2.base_url, "model": "fake-model"}]})
    proxy = await make_proxy(build_config(tmp_path, data))
    assert not proxy.rt.config.model(MODEL).gated  # send_priority alone gates nothing
    _, batch = await member(proxy, "batcher", group="batch")
    _, loner = await member(proxy, "loner")
    for key, expected in ((batch, -5), (loner, 0)):
        client = proxy.sdk(key)
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=5, extra_body={"priority": 99})
        assert chats(upstream)[-1].body["priority"] == expected
        await client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=5, extra_body={"priority": 99})
        assert chats(upstream2)[-1].body["priority"] == 99  # without send_priority: the client's, unchanged
    client = proxy.sdk(loner)
    await client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert "priority" not in chats(upstream2)[-1].body
    assert proxy.rt.share.gates == {}


async def test_without_max_concurrency_nothing_changes(make_proxy: MakeProxy, upstream: UpstreamServer,
                                                       tmp_path: Path) -> None:
    proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url])))
    assert not any(m.gated for m in proxy.rt.config.models)
    _, key = await member(proxy, "alice")
    client = proxy.sdk(key)
    upstream.state.behavior.gate = gate = asyncio.Event()
    calls = [asyncio.create_task(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)) for _ in range(5)]
    try:
        assert await until(lambda: len(chats(upstream)) == 5)  # no cap: all of them at the backend at once
        gate.set()
        await asyncio.gather(*calls)
    finally:
        await finish(calls)  # type: ignore[arg-type]
    stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=5, stream=True)
    async for _ in stream:
        pass
    await client.embeddings.create(model="text-embedding-3-small", input="hi")
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.origin + "/healthz") as response:
            models = (await response.json())["models"]
        async with session.get(proxy.origin + "/lumen/v1/me", headers=auth(key)) as response:
            assert (await response.json())["waiting"] == 0
    for health in models.values():
        assert "waiting" not in health and "slots" not in health
    assert proxy.rt.share.gates == {} and proxy.rt.share.depth() == {}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(session: aiohttp.ClientSession, proxy: Proxy) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with session.get(proxy.origin + "/metrics") as response:
        assert response.status == 200
        return samples(await response.text())


async def test_me_metrics_and_the_live_panel_show_who_waits(make_proxy: MakeProxy, upstream: UpstreamServer,
                                                             tmp_path: Path) -> None:
    proxy = await make_proxy(build_config(tmp_path, gated(tmp_path, [upstream.base_url], capacity=1)))
    _, heavy = await member(proxy, "heavy")
    _, light = await member(proxy, "light")
    _, idle = await member(proxy, "idle")
    gate = upstream.state.behavior.gate = asyncio.Event()
    backend = frozenset({("backend", upstream.base_url), ("upstream_model", "fake-model")})
    model = frozenset({("model", MODEL)})
    tasks: list[asyncio.Task[Any]] = []
    async with aiohttp.ClientSession() as session, \
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        try:
            before = await scrape(session, proxy)
            assert before.get(("lumen_queue_wait_seconds_count", model), 0) == 0
            tasks += [asyncio.create_task(post(session, proxy, heavy, ask("heavy"))) for _ in range(3)]
            assert await waiting_is(session, proxy, 2)
            tasks.append(asyncio.create_task(post(session, proxy, light, ask("light"))))
            assert await waiting_is(session, proxy, 3)

            for key, expected in ((heavy, 2), (light, 1), (idle, 0)):
                async with session.get(proxy.origin + "/lumen/v1/me", headers=auth(key)) as response:
                    assert response.status == 200 and (await response.json())["waiting"] == expected

            token, _ = await proxy.app[PORTAL].records.create_link("light")
            async with browser.post(f"{proxy.origin}/login/link/{token}", headers={"Origin": proxy.origin},
                                    allow_redirects=False) as response:
                assert response.status == 303
            async with browser.get(proxy.origin + "/usage/live.json") as response:
                assert response.status == 200 and (await response.json())["waiting"] == 1

            found = await scrape(session, proxy)
            assert found[("lumen_queue_waiting", model)] == 3
            assert found[("lumen_backend_slots_busy", backend)] == 1
            assert found[("lumen_backend_slots", backend)] == 1
            gate.set()
            assert [s for s, _, _ in await asyncio.gather(*tasks)] == [200] * 4
            after = await scrape(session, proxy)
            assert after[("lumen_queue_wait_seconds_count", model)] == 3  # the three that waited
            assert after.get(("lumen_queue_waiting", model), 0) == 0
            assert after[("lumen_backend_slots_busy", backend)] == 0
        finally:
            await finish(tasks)


async def test_two_gated_models_on_one_backend_url_report_their_own_slots(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    data = gated(tmp_path, [upstream.base_url], capacity=2)
    data["models"][1]["backends"][0]["max_concurrency"] = 3
    proxy = await make_proxy(build_config(tmp_path, data))
    _, key = await member(proxy, "alice")
    client = proxy.sdk(key)
    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    await client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert len(proxy.rt.share.gates) == 2
    async with aiohttp.ClientSession() as session:
        chat = await model_health(session, proxy)
        embed = await model_health(session, proxy, "text-embedding-3-small")
    assert chat["slots"][upstream.base_url]["capacity"] == 2
    assert embed["slots"][upstream.base_url]["capacity"] == 3

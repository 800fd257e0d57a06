"""Fair share of saturated backends: a backend's ``max_concurrency`` slots, and the queue in front of them.

A backend that declares ``max_concurrency: N`` is given at most N requests at once. A request that
finds every slot of its model's candidate backends taken waits here, not in the backend (where vLLM
and llama.cpp serve in arrival order, so one account's 200 queued requests would put everyone else
behind them).

When a slot frees, it goes to the waiting account that holds the fewest of that backend's slots for
its weight (``held / weight``: max-min fairness of the slots themselves, so an account running one
request at a time is served before one running forty); between accounts holding as much, to the
request with the smallest start-time fair queueing tag, ``max(V, the account's last tag) + cost /
weight`` with ``cost`` its expected tokens (V: the tag last served), so cheaper requests and
heavier-weighted groups go first; within an account, in arrival order. No account starves: every
waiting account's turn comes as soon as it holds the least, and its tag is finite.

A waiter may be served by any of its candidate backends: it waits at each one, and the first to free a
slot takes it (failover and the breaker keep working: a slot of a backend that fails is handed on).
The fast path, a backend with no ``max_concurrency`` or a free slot and no one waiting, takes no
lock and never awaits. A waiter that leaves (its client disconnected, or ``queue_timeout`` passed) is
marked and skipped; a slot granted to a waiter that is already gone is passed on at once, so no slot
leaks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .config import Backend

WEIGHT_FLOOR = 1e-6


@dataclass(eq=False)
class Waiter:
    account: int
    model: str
    weight: float
    tag: float
    since: float
    future: asyncio.Future[Gate]
    gone: bool = False

    @property
    def waiting(self) -> bool:
        return not self.gone and not self.future.done()


@dataclass(eq=False)
class Gate:
    """The slots of one backend (keyed by its URL and upstream model, as its breaker is)."""

    label: str
    model: str  # the backend's upstream model name
    capacity: int
    busy: int = 0
    held: dict[int, int] = field(default_factory=dict)  # slots held per account
    queues: dict[int, deque[Waiter]] = field(default_factory=dict)  # waiters per account, in arrival order

    def has_room(self) -> bool:
        """A free slot nobody waits for (a newcomer never overtakes a waiter)."""
        return self.busy < self.capacity and not self.waiting()

    def waiting(self) -> int:
        return sum(1 for queue in self.queues.values() for w in queue if w.waiting)

    def next_waiter(self) -> Waiter | None:
        """The head waiter of the account holding the fewest slots for its weight, then the smallest tag."""
        best: tuple[float, float] | None = None
        chosen: Waiter | None = None
        for account in list(self.queues):
            queue = self.queues[account]
            while queue and not queue[0].waiting:
                queue.popleft()
            if not queue:
                del self.queues[account]
                continue
            head = queue[0]
            key = (self.held.get(account, 0) / head.weight, head.tag)
            if best is None or key < best:
                best, chosen = key, head
        return chosen

    def occupy(self, account: int) -> None:
        self.busy += 1
        self.held[account] = self.held.get(account, 0) + 1

    def vacate(self, account: int) -> None:
        self.busy -= 1
        left = self.held.get(account, 0) - 1
        if left > 0:
            self.held[account] = left
        else:
            self.held.pop(account, None)


class QueueTimeout(Exception):
    """No slot within ``queue_timeout``; ``waited`` seconds, ``ahead`` requests were still waiting."""

    def __init__(self, waited: float, ahead: int) -> None:
        super().__init__(f"waited {waited:.1f} s")
        self.waited, self.ahead = waited, ahead


class FairShare:
    """Every gated backend's slots and the one fair queue in front of them."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 observe: Callable[[str, float], None] = lambda model, seconds: None) -> None:
        self.clock, self.observe = clock, observe
        self.gates: dict[tuple[str, str], Gate] = {}
        self.virtual = 0.0
        self.finish: dict[int, float] = {}  # each account's last tag (entries below `virtual` mean nothing)

    def gate(self, backend: Backend) -> Gate | None:
        if backend.max_concurrency is None:
            return None
        key = (backend.url, backend.model)
        gate = self.gates.get(key)
        if gate is None:
            gate = self.gates[key] = Gate(backend.label, backend.model, backend.max_concurrency)
        elif gate.capacity != backend.max_concurrency:  # a reload changed it: takes effect as slots free
            gate.capacity = backend.max_concurrency
        return gate

    def take(self, gate: Gate, account: int) -> bool:
        """A slot now, if one is free and nobody waits; never awaits."""
        if gate.has_room():
            gate.occupy(account)
            return True
        return False

    async def wait(self, gates: Sequence[Gate], *, account: int, model: str, weight: float, cost: int,
                   within: float) -> Gate:
        """A slot of one of ``gates``, granted in fair order; :class:`QueueTimeout` after ``within`` seconds."""
        weight = max(weight, WEIGHT_FLOOR)
        tag = max(self.virtual, self.finish.get(account, 0.0)) + max(cost, 1) / weight
        self.finish[account] = tag
        waiter = Waiter(account, model, weight, tag, self.clock(), asyncio.get_running_loop().create_future())
        for gate in gates:
            gate.queues.setdefault(account, deque()).append(waiter)
        for gate in gates:  # a slot may have freed between the caller's look and now
            self._grant(gate)
        try:
            async with asyncio.timeout(within):  # not wait_for: on 3.11 it can drop a cancellation
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            waiter.gone = True
            if waiter.future.done() and not waiter.future.cancelled():  # granted in the same instant
                return waiter.future.result()
            ahead = self._ahead(gates, waiter)
            self._unshare(waiter, cost)
            raise QueueTimeout(self.clock() - waiter.since, ahead) from None
        except asyncio.CancelledError:  # the client left while waiting
            waiter.gone = True
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result(), account)  # granted but never used: pass it on
            else:
                self._unshare(waiter, cost)
            raise

    def _unshare(self, waiter: Waiter, cost: int) -> None:
        """A request that left unserved takes back its share of its account's tags (it used nothing)."""
        last = self.finish.get(waiter.account)
        if last is not None:
            self.finish[waiter.account] = max(self.virtual, last - max(cost, 1) / waiter.weight)

    @staticmethod
    def _ahead(gates: Sequence[Gate], waiter: Waiter) -> int:
        """Waiters that would be served before ``waiter`` (the grant order, then arrival)."""
        def key(gate: Gate, w: Waiter) -> tuple[float, float, float]:
            return gate.held.get(w.account, 0) / w.weight, w.tag, w.since
        ahead: set[int] = set()
        for gate in gates:
            mine = key(gate, waiter)
            ahead.update(id(w) for q in gate.queues.values() for w in q if w.waiting and key(gate, w) < mine)
        return len(ahead)

    def release(self, gate: Gate, account: int) -> None:
        """A request of ``account`` let go of its slot: the next waiter in fair order gets it."""
        gate.vacate(account)
        self._grant(gate)

    def _grant(self, gate: Gate) -> None:
        while gate.busy < gate.capacity:
            waiter = gate.next_waiter()
            if waiter is None:
                break
            gate.queues[waiter.account].popleft()
            gate.occupy(waiter.account)
            self.virtual = max(self.virtual, waiter.tag)
            self.observe(waiter.model, self.clock() - waiter.since)
            waiter.future.set_result(gate)
        if not gate.queues and len(self.finish) > 1000:
            self.finish = {a: t for a, t in self.finish.items() if t > self.virtual}

    def _waiters(self) -> dict[int, Waiter]:
        return {id(w): w for g in self.gates.values() for q in g.queues.values() for w in q if w.waiting}

    def waiting_of(self, account: int) -> int:
        """How many of ``account``'s requests wait now (the person's own, for /lumen/v1/me)."""
        return sum(1 for w in self._waiters().values() if w.account == account)

    def depth(self) -> dict[str, int]:
        """Requests waiting per model."""
        found: dict[str, int] = {}
        for waiter in self._waiters().values():
            found[waiter.model] = found.get(waiter.model, 0) + 1
        return found

    def slots(self) -> dict[tuple[str, str], dict[str, int]]:
        """Per backend (label, upstream model): slots busy and capacity."""
        return {(g.label, g.model): {"busy": g.busy, "capacity": g.capacity} for g in self.gates.values()}

"""Fair share of saturated backends: a backend's ``max_concurrency`` slots, and the queue in front of them.

A backend that declares ``max_concurrency: N`` is given at most N requests at once. A request that
finds every slot of its model's candidate backends taken waits here, not in the backend (where vLLM
and llama.cpp serve in arrival order, so one account's 200 queued requests would put everyone else
behind them). Waiting requests are granted slots by start-time fair queueing (SFQ, the virtual-time
form of weighted fair queueing that deficit round robin approximates): each request gets a tag,
``max(V, the account's last tag) + cost / weight``, where ``cost`` is its expected tokens and
``weight`` its group's; the smallest tag is served next and ``V`` becomes its tag. An account's
tags run ahead of V by its own backlog only, so a light account's next request is served before a
heavy account's fortieth, and no account starves (every tag is finite and V only grows).

A waiter may be served by any of its candidate backends: it waits in each one's heap with the same
tag, and the first to free a slot takes it (failover and the breaker keep working: a slot of a backend
that fails is handed on). The fast path, a backend with no ``max_concurrency`` or a free slot and no
one waiting, takes no lock and never awaits. A waiter that leaves (its client disconnected, or
``queue_timeout`` passed) is marked and skipped; a slot granted to a waiter that is already gone is
passed on at once, so no slot leaks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .config import Backend

WEIGHT_FLOOR = 1e-6


@dataclass(eq=False)
class Waiter:
    account: int
    model: str
    tag: float
    since: float
    future: asyncio.Future[Gate]
    gone: bool = False


@dataclass(eq=False)
class Gate:
    """The slots of one backend (keyed by its URL and upstream model, as its breaker is)."""

    label: str
    capacity: int
    busy: int = 0
    heap: list[tuple[float, int, Waiter]] = field(default_factory=list)

    def has_room(self) -> bool:
        """A free slot nobody waits for (a newcomer never overtakes a waiter)."""
        return self.busy < self.capacity and not self.waiting()

    def waiting(self) -> int:
        while self.heap and (self.heap[0][2].gone or self.heap[0][2].future.done()):
            heapq.heappop(self.heap)
        return len(self.heap)


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
        self._seq = itertools.count()

    def gate(self, backend: Backend) -> Gate | None:
        if backend.max_concurrency is None:
            return None
        key = (backend.url, backend.model)
        gate = self.gates.get(key)
        if gate is None:
            gate = self.gates[key] = Gate(backend.label, backend.max_concurrency)
        elif gate.capacity != backend.max_concurrency:  # a reload changed it: takes effect as slots free
            gate.capacity = backend.max_concurrency
        return gate

    def take(self, gate: Gate) -> bool:
        """A slot now, if one is free and nobody waits; never awaits."""
        if gate.has_room():
            gate.busy += 1
            return True
        return False

    async def wait(self, gates: Sequence[Gate], *, account: int, model: str, weight: float, cost: int,
                   within: float) -> Gate:
        """A slot of one of ``gates``, granted in fair order; :class:`QueueTimeout` after ``within`` seconds."""
        tag = max(self.virtual, self.finish.get(account, 0.0)) + max(cost, 1) / max(weight, WEIGHT_FLOOR)
        self.finish[account] = tag
        waiter = Waiter(account, model, tag, self.clock(), asyncio.get_running_loop().create_future())
        seq = next(self._seq)
        for gate in gates:
            heapq.heappush(gate.heap, (tag, seq, waiter))
        for gate in gates:  # a slot may have freed between the caller's look and now
            self._grant(gate)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), within)
        except TimeoutError:
            waiter.gone = True
            if waiter.future.done() and not waiter.future.cancelled():  # granted in the same instant
                return waiter.future.result()
            ahead = sum(1 for g in gates for _, _, w in g.heap if w.tag < tag and not w.gone)
            raise QueueTimeout(self.clock() - waiter.since, ahead) from None
        except asyncio.CancelledError:  # the client left while waiting
            waiter.gone = True
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())  # granted but never used: pass it on
            raise

    def release(self, gate: Gate) -> None:
        """A request let go of its slot: the next waiter in fair order gets it."""
        gate.busy -= 1
        self._grant(gate)

    def _grant(self, gate: Gate) -> None:
        while gate.busy < gate.capacity and gate.heap:
            tag, _, waiter = heapq.heappop(gate.heap)
            if waiter.gone or waiter.future.done():
                continue
            gate.busy += 1
            self.virtual = max(self.virtual, tag)
            self.observe(waiter.model, self.clock() - waiter.since)
            waiter.future.set_result(gate)
        if not gate.heap and len(self.finish) > 1000:
            self.finish = {a: t for a, t in self.finish.items() if t > self.virtual}

    def waiting_of(self, account: int) -> int:
        """How many of ``account``'s requests wait now (the person's own, for /lumen/v1/me)."""
        seen: set[int] = set()
        for gate in self.gates.values():
            for _, _, waiter in gate.heap:
                if waiter.account == account and not waiter.gone and not waiter.future.done():
                    seen.add(id(waiter))
        return len(seen)

    def depth(self) -> dict[str, int]:
        """Requests waiting per model."""
        found: dict[str, set[int]] = {}
        for gate in self.gates.values():
            for _, _, waiter in gate.heap:
                if not waiter.gone and not waiter.future.done():
                    found.setdefault(waiter.model, set()).add(id(waiter))
        return {model: len(ids) for model, ids in found.items()}

    def slots(self) -> dict[str, dict[str, int]]:
        return {g.label: {"busy": g.busy, "capacity": g.capacity} for g in self.gates.values()}

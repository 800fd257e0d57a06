"""The Limiter seam: every implementation keeps these, whatever the concurrency.

Today the only implementation is :class:`lumen_proxy.ratelimit.MemoryLimiter` (one process); a shared
one (Redis, Valkey) is added to ``IMPLEMENTATIONS`` and must pass the same tests unchanged. Time comes
from a fake clock: no test sleeps.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import pytest

from lumen_proxy.ratelimit import Limiter, LimitSpec, MemoryLimiter, Refusal, Ticket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


IMPLEMENTATIONS: dict[str, Callable[[Clock], Limiter[Any]]] = {"memory": lambda clock: MemoryLimiter(clock=clock)}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def limiter(request: pytest.FixtureRequest, clock: Clock) -> Limiter[Any]:
    return IMPLEMENTATIONS[request.param](clock)


KEY = ("key:1", LimitSpec(rpm=3, tpm=1_000, concurrency=2))
ACCOUNT = ("account:1", LimitSpec(rpm=5))


async def test_rpm_is_exact_over_a_sliding_window(limiter: Limiter[Any], clock: Clock) -> None:
    for i in range(3):
        ticket = await limiter.admit([KEY], 0, f"req-{i}")
        assert not isinstance(ticket, Refusal)
        ticket.finish(0)
        clock.now += 10
    refused = await limiter.admit([KEY], 0, "req-3")
    assert isinstance(refused, Refusal) and refused.limit == "requests"
    assert refused.retry_after == pytest.approx(30.0)  # the first admission leaves at 1060; now is 1030
    clock.now += 30
    assert not isinstance(await limiter.admit([KEY], 0, "req-4"), Refusal)


async def test_concurrency_slots_are_freed_by_finish_and_finish_never_awaits(limiter: Limiter[Any]) -> None:
    first, second = [await limiter.admit([KEY], 0, f"req-{i}") for i in range(2)]
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    assert not inspect.iscoroutinefunction(first.finish)
    refused = await limiter.admit([KEY], 0, "req-2")
    assert isinstance(refused, Refusal) and refused.limit == "concurrency"
    first.finish(0)
    first.finish(0)  # idempotent: frees one slot, once
    third = await limiter.admit([KEY], 0, "req-3")
    assert not isinstance(third, Refusal)
    assert isinstance(await limiter.admit([KEY], 0, "req-4"), Refusal)


async def test_extend_charges_tokens_all_or_nothing(limiter: Limiter[Any]) -> None:
    ticket = await limiter.admit([KEY, ACCOUNT], 0, "req-1")
    assert isinstance(ticket, Ticket)
    model = ("account:1:gpt-4o", LimitSpec(rpm=1))
    assert await limiter.extend(ticket, [model], 800) is None
    other = await limiter.admit([KEY, ACCOUNT], 0, "req-2")
    assert isinstance(other, Ticket)
    refused = await limiter.extend(other, [model], 100)  # the model's rpm is full, though tokens fit
    assert isinstance(refused, Refusal) and refused.subject == "account:1:gpt-4o"
    too_many = await limiter.extend(other, [], 300)  # 800 + 300 > 1,000 on the key
    assert isinstance(too_many, Refusal) and too_many.limit == "tokens"
    assert await limiter.extend(other, [], 200) is None  # nothing was charged by the refusals
    ticket.finish(100)  # the real usage replaces the estimate
    third = await limiter.admit([ACCOUNT], 0, "req-3")
    assert isinstance(third, Ticket)


async def test_a_request_too_large_for_tpm_is_told_not_to_retry(limiter: Limiter[Any]) -> None:
    ticket = await limiter.admit([KEY], 0, "req-1")
    assert isinstance(ticket, Ticket)
    refused = await limiter.extend(ticket, [], 5_000)
    assert isinstance(refused, Refusal) and refused.is_too_large
    assert refused.headers()["x-should-retry"] == "false"


async def test_concurrent_admissions_never_exceed_a_limit(limiter: Limiter[Any]) -> None:
    outcomes = await asyncio.gather(*(limiter.admit([ACCOUNT], 0, f"req-{i}") for i in range(50)))
    assert sum(not isinstance(o, Refusal) for o in outcomes) == 5


async def test_idle_subjects_are_forgotten(limiter: Limiter[Any], clock: Clock) -> None:
    ticket = await limiter.admit([KEY], 0, "req-1")
    assert isinstance(ticket, Ticket)
    ticket.finish(0)
    clock.now += 61
    assert limiter.sweep() == 1

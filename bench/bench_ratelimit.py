"""What one rate-limit check costs, and what 10,000 active keys weigh.

Run from the repository root: ``python -m bench.bench_ratelimit`` (about 15 s on one core;
``--keys`` changes the population).

Timings drive a fake clock so the windows are in steady state (entries expiring as new ones
arrive) without waiting; each figure is the best of ``--repeat`` passes over every key, per call.
Memory is tracemalloc's count of what the limiter holds once every key has a full rpm log.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from collections.abc import Callable, Sequence

from lumen_proxy.ratelimit import LimitSpec, RateLimiter, Ticket

KEY_LIMITS = LimitSpec(rpm=60, tpm=100_000, concurrency=8)
ACCOUNT_LIMITS = LimitSpec(rpm=600, tpm=1_000_000, concurrency=80)
KEYS_PER_ACCOUNT = 10
TOKENS = 500


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


Subjects = list[tuple[str, LimitSpec]]


def population(keys: int, with_accounts: bool) -> list[Subjects]:
    def subjects(index: int) -> Subjects:
        own = [(f"key:{index}", KEY_LIMITS)]
        return own + [(f"account:{index // KEYS_PER_ACCOUNT}", ACCOUNT_LIMITS)] if with_accounts else own

    return [subjects(index) for index in range(keys)]


def per_call_us(repeat: int, calls: int, one_pass: Callable[[], None]) -> float:
    """Best pass, in microseconds per call; gc off so a collection does not land in one pass."""
    best = float("inf")
    gc.disable()
    try:
        for _ in range(repeat):
            start = time.perf_counter_ns()
            one_pass()
            best = min(best, time.perf_counter_ns() - start)
    finally:
        gc.enable()
    return best / calls / 1000


def admit_all(limiter: RateLimiter, clock: Clock, everyone: Sequence[Subjects], step: float) -> list[Ticket]:
    tickets = []
    for subjects in everyone:
        outcome = limiter.admit(subjects, TOKENS)
        if not isinstance(outcome, Ticket):
            raise RuntimeError(f"benchmark expected admission, got {outcome}")
        tickets.append(outcome)
        clock.now += step
    return tickets


def timings(keys: int, repeat: int) -> list[tuple[str, float]]:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    everyone = population(keys, with_accounts=True)
    step = 2.0 / keys  # each key every 2 s: 30 of its 60 rpm in the window, accounts at half too
    for _ in range(30):  # fill the windows to steady state
        release(admit_all(limiter, clock, everyone, step))

    def admit_release() -> None:
        release(admit_all(limiter, clock, everyone, step))

    tickets = admit_all(limiter, clock, everyone, step)

    def headers() -> None:
        for ticket in tickets:
            ticket.headers()

    def reconcile() -> None:
        for ticket in tickets:
            ticket.reconcile(420)

    rows = [
        ("admit + release (key + account, steady state)", per_call_us(repeat, keys, admit_release)),
        ("ticket.headers()", per_call_us(repeat, keys, headers)),
        ("ticket.reconcile()", per_call_us(repeat, keys, reconcile)),
    ]
    release(tickets)

    keys_only = population(keys, with_accounts=False)
    full = RateLimiter(clock=clock)
    for _ in range(KEY_LIMITS.rpm):
        release(admit_all(full, clock, keys_only, 0.0))
        clock.now += 0.01

    def refuse() -> None:
        for subjects in keys_only:
            outcome = full.admit(subjects, TOKENS)
            if isinstance(outcome, Ticket):
                raise RuntimeError("benchmark expected a refusal")
            outcome.headers()

    rows.append(("admit refused (rpm log full) + headers()", per_call_us(repeat, keys, refuse)))
    return rows


def release(tickets: Sequence[Ticket]) -> None:
    for ticket in tickets:
        ticket.release()


def sweep_timings(keys: int) -> list[tuple[str, float]]:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    release(admit_all(limiter, clock, population(keys, with_accounts=True), 0.0))
    kept, nothing_idle = 0, float("inf")
    for _ in range(100):
        start = time.perf_counter_ns()
        kept += limiter.sweep()
        nothing_idle = min(nothing_idle, (time.perf_counter_ns() - start) / 1000)
    clock.now += 60
    start = time.perf_counter_ns()
    dropped = limiter.sweep()
    all_idle = (time.perf_counter_ns() - start) / 1000
    if kept or len(limiter) or not dropped:
        raise RuntimeError(f"sweep kept {kept}, left {len(limiter)}")
    return [
        ("sweep(), nothing idle (whole call)", nothing_idle),
        (f"sweep(), {dropped} idle (whole call)", all_idle),
    ]


def memory(keys: int) -> list[tuple[str, float]]:
    clock = Clock()
    everyone = population(keys, with_accounts=False)
    gc.collect()
    tracemalloc.start()
    limiter = RateLimiter(clock=clock)
    for _ in range(KEY_LIMITS.rpm):
        release(admit_all(limiter, clock, everyone, 0.0))
        clock.now += 0.5
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if len(limiter) != keys:
        raise RuntimeError(f"expected {keys} subjects, have {len(limiter)}")
    return [
        (f"memory, {keys} keys x {KEY_LIMITS.rpm}-entry log (MiB)", held / 2**20),
        ("memory per key (bytes)", held / keys),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"limits: key {KEY_LIMITS}, account {ACCOUNT_LIMITS}, {KEYS_PER_ACCOUNT} keys per account")
    times = timings(args.keys, args.repeat) + sweep_timings(args.keys)
    sizes = memory(args.keys)
    width = max(len(name) for name, _ in times + sizes) + 2
    print(f"{f'{args.keys} active keys':<{width}}{'µs':>10}")
    for name, value in times:
        print(f"{name:<{width}}{value:>10.2f}")
    print()
    for name, value in sizes:
        print(f"{name:<{width}}{value:>10.1f}")


if __name__ == "__main__":
    main()

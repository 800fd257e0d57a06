"""The sliding-window limiter, driven by a fake clock: exact counts, no sleeps."""

from __future__ import annotations

import random

import pytest

from lumen_proxy.ratelimit import (
    CONCURRENCY_RETRY_AFTER,
    LimitSpec,
    RateLimiter,
    Refusal,
    Ticket,
    format_duration,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> RateLimiter:
    return RateLimiter(clock=clock)


def key(spec: LimitSpec, name: str = "key:1") -> list[tuple[str, LimitSpec]]:
    return [(name, spec)]


def admitted(outcome: Ticket | Refusal) -> Ticket:
    assert isinstance(outcome, Ticket), outcome
    return outcome


def refused(outcome: Ticket | Refusal) -> Refusal:
    assert isinstance(outcome, Refusal), outcome
    return outcome


def wait(refusal: Refusal) -> float:
    assert refusal.retry_after is not None, refusal
    return refusal.retry_after


def test_admits_exactly_rpm_then_refuses(limiter: RateLimiter) -> None:
    spec = LimitSpec(rpm=5)
    for _ in range(5):
        admitted(limiter.admit(key(spec), tokens=10))
    refusal = refused(limiter.admit(key(spec), tokens=10))
    assert (refusal.limit, refusal.scope, refusal.limit_value) == ("requests", "key", 5)
    assert refusal.message == ("Rate limit reached for requests per minute (limit 5) on your key. Retry after 1m0s.")


def test_no_double_burst_at_window_edge() -> None:
    """10 at t=59.9 and then nothing until they leave; a fixed window would let 20 through in 0.2 s."""
    clock = FakeClock(59.9)
    limiter = RateLimiter(clock=clock)
    spec = LimitSpec(rpm=10)
    fixed_windows: dict[int, int] = {}

    def fixed_window_admits(now: float) -> bool:
        bucket = int(now // 60)
        fixed_windows[bucket] = fixed_windows.get(bucket, 0) + 1
        return fixed_windows[bucket] <= 10

    ours = fixed = 0
    for now in (59.9, 60.0, 60.1):
        clock.now = now
        for _ in range(10):
            ours += isinstance(limiter.admit(key(spec), tokens=1), Ticket)
            fixed += fixed_window_admits(now)
    assert (fixed, ours) == (20, 10)

    refusal = refused(limiter.admit(key(spec), tokens=1))
    clock.now = 119.9 - 1e-6
    refused(limiter.admit(key(spec), tokens=1))
    clock.now = 60.1 + wait(refusal)
    assert clock.now == pytest.approx(119.9)
    for _ in range(10):
        admitted(limiter.admit(key(spec), tokens=1))
    refused(limiter.admit(key(spec), tokens=1))


def test_any_window_span_holds_at_most_the_limit_and_no_request_is_refused_needlessly() -> None:
    clock = FakeClock(0.0)
    limiter = RateLimiter(clock=clock)
    spec = LimitSpec(rpm=7)
    rng = random.Random(20240601)
    admitted_at: list[float] = []
    for _ in range(2000):
        clock.advance(rng.choice((0.0, 0.01, 0.5, 3.0, 11.7)))
        in_window = sum(1 for t in admitted_at if t > clock.now - 60)
        outcome = limiter.admit(key(spec), tokens=1)
        assert isinstance(outcome, Ticket) == (in_window < 7)
        if isinstance(outcome, Ticket):
            admitted_at.append(clock.now)
    assert len(admitted_at) > 100
    for start in admitted_at:
        assert sum(1 for t in admitted_at if start <= t < start + 60) <= 7


@pytest.mark.parametrize("start", [0.0, 0.1, 1000.3, 123456.789])
def test_retry_after_is_exact_for_requests(start: float) -> None:
    clock = FakeClock(start)
    limiter = RateLimiter(clock=clock)
    spec = LimitSpec(rpm=3)
    for step in (0.0, 0.3, 0.7):
        clock.advance(step)
        admitted(limiter.admit(key(spec), tokens=1))
    clock.advance(0.2)
    retry = wait(refused(limiter.admit(key(spec), tokens=1)))
    assert retry == pytest.approx(60 - 1.2)

    then = clock.now
    clock.now = then + retry - 0.001
    refused(limiter.admit(key(spec), tokens=1))
    clock.now = then + retry
    admitted(limiter.admit(key(spec), tokens=1))


@pytest.mark.parametrize("start", [0.0, 0.1, 1000.3])
def test_retry_after_is_exact_for_tokens(start: float) -> None:
    clock = FakeClock(start)
    limiter = RateLimiter(clock=clock)
    spec = LimitSpec(tpm=1000)
    for step, tokens in ((0.0, 400), (0.3, 300), (0.7, 200)):
        clock.advance(step)
        admitted(limiter.admit(key(spec), tokens=tokens))
    clock.advance(0.2)
    refusal = refused(limiter.admit(key(spec), tokens=650))  # 900 used: 400 and 300 must leave
    assert (refusal.limit, refusal.limit_value) == ("tokens", 1000)
    assert refusal.retry_after == pytest.approx(60 - 0.2 - 0.7)
    assert "(limit 1000, used 900, requested 650)" in refusal.message

    then = clock.now
    clock.now = then + wait(refusal) - 0.001
    refused(limiter.admit(key(spec), tokens=650))
    clock.now = then + wait(refusal)
    admitted(limiter.admit(key(spec), tokens=650))


def test_tokens_window_and_reconcile(limiter: RateLimiter, clock: FakeClock) -> None:
    spec = LimitSpec(tpm=1000)
    first = admitted(limiter.admit(key(spec), tokens=600))
    refused(limiter.admit(key(spec), tokens=500))
    first.reconcile(300)
    second = admitted(limiter.admit(key(spec), tokens=500))
    assert second.headers()["x-ratelimit-remaining-tokens"] == "200"

    first.reconcile(350)  # a second reconcile replaces, it does not add
    second.reconcile(0)
    assert second.headers()["x-ratelimit-remaining-tokens"] == "650"

    clock.advance(60)
    assert second.headers()["x-ratelimit-remaining-tokens"] == "1000"


def test_late_reconcile_changes_nothing(limiter: RateLimiter, clock: FakeClock) -> None:
    spec = LimitSpec(tpm=1000)
    first = admitted(limiter.admit(key(spec), tokens=600))
    clock.advance(30)
    second = admitted(limiter.admit(key(spec), tokens=100))
    clock.advance(30)
    assert second.headers()["x-ratelimit-remaining-tokens"] == "900"
    first.reconcile(900)  # its entry has left the window: nothing to correct
    assert second.headers()["x-ratelimit-remaining-tokens"] == "900"


def test_reconcile_finds_its_entry_in_a_long_log(limiter: RateLimiter, clock: FakeClock) -> None:
    spec = LimitSpec(rpm=1000, tpm=100_000)
    tickets = []
    for _ in range(300):  # one a second: the log keeps 60 and drops the rest behind it
        tickets.append(admitted(limiter.admit(key(spec), tokens=100)))
        clock.advance(1)
    tickets[-1].reconcile(1100)
    tickets[-59].reconcile(600)
    tickets[-61].reconcile(99_999)  # already out of the window
    assert tickets[-1].headers()["x-ratelimit-remaining-tokens"] == str(100_000 - 57 * 100 - 1100 - 600)


def test_estimate_larger_than_tpm_is_refused_for_good(limiter: RateLimiter) -> None:
    spec = LimitSpec(rpm=10, tpm=1000)
    refusal = refused(limiter.admit([("key:1", LimitSpec()), ("account:1", spec)], tokens=1001))
    assert refusal.is_too_large
    assert (refusal.limit, refusal.scope, refusal.limit_value, refusal.retry_after) == (
        "tokens",
        "account",
        1000,
        None,
    )
    assert refusal.message == (
        "Request too large for tokens per minute (limit 1000, requested 1001) on your account. "
        "Reduce the prompt or max_tokens; retrying will not help."
    )
    headers = refusal.headers()
    assert headers["x-should-retry"] == "false"
    assert "Retry-After" not in headers
    assert headers["x-ratelimit-remaining-requests"] == "10"  # nothing was recorded
    assert len(limiter) == 0


def test_account_limit_is_shared_by_its_keys(limiter: RateLimiter) -> None:
    account = ("account:7", LimitSpec(rpm=3))
    for name in ("key:1", "key:1", "key:2"):
        admitted(limiter.admit([(name, LimitSpec(rpm=10)), account], tokens=1))
    refusal = refused(limiter.admit([("key:2", LimitSpec(rpm=10)), account], tokens=1))
    assert (refusal.limit, refusal.scope, refusal.subject, refusal.limit_value) == (
        "requests",
        "account",
        "account:7",
        3,
    )
    assert refusal.message.endswith("on your account. Retry after 1m0s.")


def test_qualified_subject_names_its_qualifier(limiter: RateLimiter) -> None:
    per_model = ("account:7:gpt-4o", LimitSpec(rpm=1))
    admitted(limiter.admit([("key:1", LimitSpec()), ("account:7", LimitSpec()), per_model], tokens=1))
    refusal = refused(limiter.admit([("key:2", LimitSpec()), ("account:7", LimitSpec()), per_model], tokens=1))
    assert (refusal.scope, refusal.subject) == ("account", "account:7:gpt-4o")
    assert refusal.message == (
        "Rate limit reached for requests per minute (limit 1) on your account for gpt-4o. Retry after 1m0s."
    )


def test_refusal_records_nothing_anywhere(limiter: RateLimiter) -> None:
    account = ("account:7", LimitSpec(rpm=2))
    admitted(limiter.admit([("key:1", LimitSpec(rpm=1)), account], tokens=1))
    assert refused(limiter.admit([("key:1", LimitSpec(rpm=1)), account], tokens=1)).scope == "key"
    admitted(limiter.admit([("key:2", LimitSpec(rpm=1)), account], tokens=1))  # account had one slot left


def test_refusal_reports_the_limit_that_clears_last(limiter: RateLimiter, clock: FakeClock) -> None:
    account = ("account:7", LimitSpec(tpm=100))
    admitted(limiter.admit([("key:1", LimitSpec(rpm=1)), account], tokens=10))
    clock.advance(30)
    admitted(limiter.admit([("key:2", LimitSpec(rpm=1)), account], tokens=90))
    clock.advance(1)
    refusal = refused(limiter.admit([("key:1", LimitSpec(rpm=1)), account], tokens=50))
    assert (refusal.limit, refusal.scope) == ("tokens", "account")  # the key would clear in 29 s
    assert wait(refusal) == pytest.approx(59)


def test_concurrency_cap_and_idempotent_release(limiter: RateLimiter) -> None:
    spec = LimitSpec(concurrency=2)
    first = admitted(limiter.admit(key(spec), tokens=1))
    admitted(limiter.admit(key(spec), tokens=1))
    refusal = refused(limiter.admit(key(spec), tokens=1))
    assert (refusal.limit, refusal.limit_value, refusal.retry_after) == (
        "concurrency",
        2,
        CONCURRENCY_RETRY_AFTER,
    )
    assert refusal.message == "Too many concurrent requests (limit 2) on your key. Retry after 1s."
    first.release()
    first.release()
    admitted(limiter.admit(key(spec), tokens=1))
    refused(limiter.admit(key(spec), tokens=1))


def test_sweep_forgets_idle_subjects_only(limiter: RateLimiter, clock: FakeClock) -> None:
    spec = LimitSpec(rpm=5, concurrency=5)
    admitted(limiter.admit([("key:idle", spec), ("account:1", spec)], tokens=1)).release()
    streaming = admitted(limiter.admit(key(spec, "key:streaming"), tokens=1))
    clock.advance(59)
    admitted(limiter.admit(key(spec, "key:recent"), tokens=1)).release()
    admitted(limiter.admit([("key:idle-soon", spec), ("account:1", spec)], tokens=1)).release()
    assert (limiter.sweep(), len(limiter)) == (0, 5)

    clock.advance(1)
    assert limiter.sweep() == 1  # key:idle; account:1 was used again, key:streaming is in flight
    assert len(limiter) == 4
    streaming.release()
    assert (limiter.sweep(), len(limiter)) == (1, 3)
    clock.advance(60)
    assert (limiter.sweep(), len(limiter)) == (3, 0)


def test_forgotten_subject_starts_afresh(limiter: RateLimiter, clock: FakeClock) -> None:
    spec = LimitSpec(rpm=1)
    admitted(limiter.admit(key(spec), tokens=1)).release()
    clock.advance(60)
    assert limiter.sweep() == 1
    admitted(limiter.admit(key(spec), tokens=1))


def test_limits_change_at_runtime_and_the_window_survives(limiter: RateLimiter, clock: FakeClock) -> None:
    for second in range(10):
        clock.now = 1000.0 + second
        admitted(limiter.admit(key(LimitSpec(rpm=10)), tokens=1))

    lowered = refused(limiter.admit(key(LimitSpec(rpm=5)), tokens=1))
    assert lowered.limit_value == 5
    assert lowered.retry_after == pytest.approx(1000 + 5 + 60 - 1009)  # the 6th oldest must leave

    for _ in range(10):
        admitted(limiter.admit(key(LimitSpec(rpm=20)), tokens=1))
    refused(limiter.admit(key(LimitSpec(rpm=20)), tokens=1))
    assert refused(limiter.admit(key(LimitSpec(rpm=10)), tokens=1)).retry_after == pytest.approx(60)

    clock.now = 1000.0 + 60 + 4
    refused(limiter.admit(key(LimitSpec(rpm=5)), tokens=1))  # the 5 newer ones plus 10 at t=1009
    admitted(limiter.admit(key(LimitSpec(rpm=0)), tokens=1))  # 0 is unlimited


def test_headers_report_the_most_restrictive_subject(limiter: RateLimiter, clock: FakeClock) -> None:
    account = ("account:1", LimitSpec(rpm=100, tpm=10_000))
    for _ in range(50):
        admitted(limiter.admit([("key:other", LimitSpec()), account], tokens=100))
    clock.advance(30.5)
    ticket = admitted(limiter.admit([("key:1", LimitSpec(rpm=60, tpm=1_000_000)), account], tokens=120))
    clock.advance(0.25)
    assert ticket.headers() == {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "49",
        "x-ratelimit-reset-requests": "59.75s",  # until the window is empty again
        "x-ratelimit-limit-tokens": "10000",
        "x-ratelimit-remaining-tokens": "4880",
        "x-ratelimit-reset-tokens": "59.75s",
    }


def test_token_reset_waits_only_for_entries_holding_tokens(limiter: RateLimiter, clock: FakeClock) -> None:
    spec = LimitSpec(rpm=10, tpm=1000)
    admitted(limiter.admit(key(spec), tokens=100))
    clock.advance(20)
    cached = admitted(limiter.admit(key(spec), tokens=100))
    cached.reconcile(0)
    headers = cached.headers()
    assert (headers["x-ratelimit-reset-requests"], headers["x-ratelimit-reset-tokens"]) == ("1m0s", "40s")


def test_headers_omit_unlimited_groups(limiter: RateLimiter) -> None:
    rpm_only = admitted(limiter.admit([("key:1", LimitSpec(rpm=60)), ("account:1", LimitSpec())], 5))
    assert rpm_only.headers() == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1m0s",
    }
    assert admitted(limiter.admit(key(LimitSpec(concurrency=3), "key:2"), 5)).headers() == {}


def test_refusal_headers_carry_retry_after(limiter: RateLimiter, clock: FakeClock) -> None:
    spec = LimitSpec(rpm=1, tpm=500)
    admitted(limiter.admit(key(spec), tokens=200))
    clock.advance(58.5)
    headers = refused(limiter.admit(key(spec), tokens=200)).headers()
    assert headers == {
        "x-ratelimit-limit-requests": "1",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1.5s",
        "x-ratelimit-limit-tokens": "500",
        "x-ratelimit-remaining-tokens": "300",
        "x-ratelimit-reset-tokens": "1.5s",
        "retry-after-ms": "1500",
        "Retry-After": "2",
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.0004, "1ms"),
        (0.012, "12ms"),
        (0.999, "999ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (59.5, "59.5s"),
        (60.0, "1m0s"),
        (90.25, "1m30.25s"),
        (360.0, "6m0s"),
        (3600.0, "1h0m0s"),
        (-1.0, "0s"),
    ],
)
def test_format_duration_like_openai(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_invalid_input_is_rejected(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError, match="limits must be >= 0"):
        LimitSpec(rpm=-1)
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        limiter.admit(key(LimitSpec()), tokens=-1)
    with pytest.raises(ValueError, match="actual_tokens must be >= 0"):
        admitted(limiter.admit(key(LimitSpec()), tokens=1)).reconcile(-5)
    with pytest.raises(ValueError, match="window must be > 0"):
        RateLimiter(window=0)


def test_other_window_lengths_say_so(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock, window=1.0)
    admitted(limiter.admit(key(LimitSpec(rpm=1)), tokens=1))
    refusal = refused(limiter.admit(key(LimitSpec(rpm=1)), tokens=1))
    assert refusal.message == "Rate limit reached for requests per 1s (limit 1) on your key. Retry after 1s."
    clock.advance(1.0)
    admitted(limiter.admit(key(LimitSpec(rpm=1)), tokens=1))

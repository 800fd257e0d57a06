"""Sliding-window rate limits on requests, tokens and concurrency, in memory, for one process.

Owns admission only: no aiohttp, no SQLite; time comes from an injected clock, so tests
drive it with a fake one and never sleep.

Usage::

    limiter = RateLimiter(clock=time.monotonic)
    outcome = limiter.admit([("key:12", key_spec), ("account:3", account_spec)], tokens=0)
    if isinstance(outcome, Refusal):
        ...  # 429 with outcome.message and outcome.headers(), before the body is even read
    try:
        refusal = limiter.extend(outcome, [("account:3:gpt-4o", model_spec)], tokens=estimate)
        ...  # a refusal is a 429; else respond, adding outcome.headers()
        outcome.reconcile(usage.total_tokens)
    finally:
        outcome.release()

A request is admitted in two steps because what it may cost is known only from its body: ``admit``
counts it (rpm) and takes its concurrency slots on the subjects known from its key, so a key at its
limit is refused before its body is read and a request that fails on a bad body still counts;
``extend`` then charges its token estimate to those subjects and admits it on the subjects its body
names (the model's), all or nothing.

Subjects are named ``"<scope>:<id>"`` or ``"<scope>:<id>:<qualifier>"`` ("key:12", "account:3",
"account:3:gpt-4o"); a refusal reports the scope, and its message says "on your account for gpt-4o".
Limits come with every call (``LimitSpec``; 0 means unlimited) while state is keyed by name, so a
config reload that raises or lowers a limit keeps the window it has: the log is trimmed by time
only, so a lowered limit counts every admission still in the window (and refuses until enough
leave), a raised one admits the difference at once. Admissions made while both rpm and tpm were
0 are not logged, so a limit switched on later starts from an empty window.

Invariants
- True sliding window: an admission at time t counts while ``now < t + window``. In every
  half-open span ``[a, a + window)`` a subject admits at most ``rpm`` requests and at most ``tpm``
  tokens (estimates, corrected by ``Ticket.reconcile``): no double burst at a boundary.
- All-or-nothing: every limit of every subject is checked before anything is recorded.
- ``Refusal.retry_after`` is exact: after that many seconds the refused request fits, as far as
  this limit is concerned (and the refusal reported is the one that clears last). Concurrency has
  no such time; it reports ``CONCURRENCY_RETRY_AFTER``.
- A request whose estimate alone exceeds ``tpm`` can never fit: it is refused at once with
  ``retry_after=None`` (``is_too_large``) and headers that tell OpenAI's SDK not to retry
  (``x-should-retry: false``, no Retry-After). OpenAI too answers "Request too large" with a 429.
- Memory follows active subjects: a log holds one (time, tokens) pair per admission in the
  window, 16 bytes each, only while rpm or tpm is set; with rpm set it never exceeds the largest
  rpm in force during the window. ``sweep()`` forgets subjects idle for a whole window; it
  visits only those (and old ones still in flight), as subjects are kept in order of last admission.

Headers follow OpenAI: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, reporting for
each group the most restrictive subject (lowest remaining). A reset is the time until that
subject's window is empty again, OpenAI's "resets to its initial state", written like Go
durations ("12ms", "1.5s", "6m0s"). A group no subject limits is left out.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, TypeVar

__all__ = [
    "CONCURRENCY_RETRY_AFTER",
    "Admission",
    "Limiter",
    "MemoryLimiter",
    "LimitName",
    "LimitSpec",
    "RateLimiter",
    "Refusal",
    "Ticket",
    "format_duration",
]

LimitName = Literal["requests", "tokens", "concurrency"]

CONCURRENCY_RETRY_AFTER = 1.0
"""Seconds to suggest when only the concurrency cap refuses: slots free on release, not on a clock."""

_REQUEST_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
_TOKEN_HEADERS = ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")

_COMPACT_AFTER = 16
"""Expired entries tolerated at the front of a log before it is compacted (amortised O(1))."""


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """Limits for one subject; 0 means unlimited."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0

    def __post_init__(self) -> None:
        if min(self.rpm, self.tpm, self.concurrency) < 0:
            raise ValueError(f"limits must be >= 0, got {self}")


class Window(NamedTuple):
    """One subject's use of its sliding window."""

    requests: int
    tokens: int
    in_flight: int


class _Subject:
    """Log of admissions still in the window, plus in-flight count, for one key or account.

    Entries live in ``times[head:]``/``tokens[head:]``; ``base`` is the sequence number of index 0,
    so a ticket can find its entry after compaction, or learn it has left.
    """

    __slots__ = ("times", "tokens", "head", "base", "token_sum", "in_flight", "last")

    def __init__(self) -> None:
        self.times = array("d")
        self.tokens = array("q")
        self.head = 0
        self.base = 0
        self.token_sum = 0
        self.in_flight = 0
        self.last = -math.inf

    @property
    def count(self) -> int:
        return len(self.times) - self.head

    def expire(self, cutoff: float) -> None:
        """Drop entries at or before ``cutoff``; they are out of the window."""
        times, head, end = self.times, self.head, len(self.times)
        if head == end or times[head] > cutoff:
            return
        tokens, freed = self.tokens, 0
        while head < end and times[head] <= cutoff:
            freed += tokens[head]
            head += 1
        self.token_sum -= freed
        if head == end or (head >= _COMPACT_AFTER and head * 4 >= end):
            del times[:head], tokens[:head]
            self.base += head
            head = 0
        self.head = head

    def record(self, now: float, tokens: int) -> int:
        self.times.append(now)
        self.tokens.append(tokens)
        self.token_sum += tokens
        return self.base + len(self.times) - 1

    def tokens_of(self, seq: int) -> int:
        """The tokens entry ``seq`` holds, 0 if it has left the window (or was never logged)."""
        index = seq - self.base
        return self.tokens[index] if seq >= 0 and self.head <= index < len(self.times) else 0

    def adjust(self, seq: int, tokens: int) -> None:
        """Set the tokens of entry ``seq`` if it is still logged (a late reconcile is moot)."""
        index = seq - self.base
        if self.head <= index < len(self.times):
            self.token_sum += tokens - self.tokens[index]
            self.tokens[index] = tokens

    def requests_free_at(self, rpm: int) -> float:
        """Time the entry must leave so that fewer than ``rpm`` remain."""
        return self.times[len(self.times) - rpm]

    def tokens_free_at(self, tpm: int, tokens: int) -> float:
        """Time the oldest entries must have left so that ``tokens`` more fit under ``tpm``."""
        excess, freed = self.token_sum + tokens - tpm, 0
        for index in range(self.head, len(self.times)):
            freed += self.tokens[index]
            if freed >= excess:
                return self.times[index]
        return self.times[-1]  # tokens <= tpm, so an empty window always fits

    def tokens_reset_at(self) -> float:
        """Time of the newest entry still holding tokens."""
        index = len(self.times) - 1
        while index > self.head and self.tokens[index] == 0:
            index -= 1
        return self.times[index]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was refused and when it may come back; ``retry_after`` None means never."""

    limit: LimitName
    scope: str
    subject: str
    limit_value: int
    retry_after: float | None
    message: str
    rate_headers: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_too_large(self) -> bool:
        return self.retry_after is None

    def headers(self) -> dict[str, str]:
        """The x-ratelimit-* headers plus Retry-After (whole seconds, >= 1) and retry-after-ms."""
        headers = dict(self.rate_headers)
        if self.retry_after is None:
            headers["x-should-retry"] = "false"
        else:
            millis = max(1, _ceil_ms(self.retry_after))
            headers["retry-after-ms"] = str(millis)
            headers["Retry-After"] = str(-(-millis // 1000))
        return headers


class Ticket:
    """An admitted request: its headers, its token correction and its concurrency slot."""

    __slots__ = ("_clock", "_window", "_entries", "_released", "_names")

    def __init__(
        self,
        clock: Callable[[], float],
        window: float,
        entries: list[tuple[LimitSpec, _Subject, int]],
        names: list[str],
    ) -> None:
        self._names = names
        self._clock = clock
        self._window = window
        self._entries = entries
        self._released = False

    def headers(self) -> dict[str, str]:
        """x-ratelimit-* headers as of now (this request included)."""
        return _rate_headers(((spec, state) for spec, state, _ in self._entries), self._clock(), self._window)

    def reconcile(self, actual_tokens: int) -> None:
        """Replace the token estimate by real usage in every subject's window (again: replace again)."""
        if actual_tokens < 0:
            raise ValueError(f"actual_tokens must be >= 0, got {actual_tokens}")
        for _, state, seq in self._entries:
            if seq >= 0:
                state.adjust(seq, actual_tokens)

    def finish(self, actual_tokens: int) -> None:
        """The request ended: its real tokens replace the estimate, and its slots are freed. Never awaits."""
        self.reconcile(actual_tokens)
        self.release()

    def release(self) -> None:
        """Free the concurrency slots; idempotent, so it belongs in a ``finally``."""
        if not self._released:
            self._released = True
            for _, state, _ in self._entries:
                state.in_flight -= 1


class RateLimiter:
    """Admits or refuses requests against the limits of every subject they belong to."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, window: float = 60.0) -> None:
        if not window > 0:
            raise ValueError(f"window must be > 0, got {window}")
        self._clock = clock
        self._window = window
        self._subjects: OrderedDict[str, _Subject] = OrderedDict()  # oldest admission first

    def __len__(self) -> int:
        return len(self._subjects)

    def window(self, name: str) -> Window:
        """Requests and tokens in ``name``'s window, and its requests in flight (all 0 if unknown)."""
        state = self._subjects.get(name)
        if state is None:
            return Window(0, 0, 0)
        state.expire(self._clock() - self._window)
        return Window(state.count, state.token_sum, state.in_flight)

    def admit(self, subjects: Sequence[tuple[str, LimitSpec]], tokens: int) -> Ticket | Refusal:
        """Record the request against every subject, or against none and say why not."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        now = self._clock()
        states, fits = self._look(subjects, tokens, now - self._window)
        if not fits:
            return self._refusal(subjects, states, tokens, now)
        return Ticket(self._clock, self._window, self._record(subjects, states, tokens, now),
                      [name for name, _ in subjects])

    def extend(self, ticket: Ticket, subjects: Sequence[tuple[str, LimitSpec]], tokens: int) -> Refusal | None:
        """Charge ``tokens`` to an admitted request and admit it on ``subjects`` too; all or nothing.

        On a refusal nothing changes: the ticket keeps its slots, its rpm entries and its tokens.
        """
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        now = self._clock()
        cutoff = now - self._window
        fits = True
        for spec, held, seq in ticket._entries:  # already counted: only their tokens can refuse
            held.expire(cutoff)
            if spec.tpm and held.token_sum - held.tokens_of(seq) + tokens > spec.tpm:
                fits = False
        states, fits_new = self._look(subjects, tokens, cutoff)
        if not (fits and fits_new):
            charged = [(name, LimitSpec(tpm=spec.tpm))
                       for name, (spec, _, _) in zip(ticket._names, ticket._entries, strict=True)]
            charged_states: list[_Subject | None] = [entry[1] for entry in ticket._entries]
            return self._refusal([*charged, *subjects], [*charged_states, *states], tokens, now)
        ticket.reconcile(tokens)
        ticket._entries += self._record(subjects, states, tokens, now)
        ticket._names += [name for name, _ in subjects]
        return None

    def _look(self, subjects: Sequence[tuple[str, LimitSpec]], tokens: int,
              cutoff: float) -> tuple[list[_Subject | None], bool]:
        """Each subject's state (None: never seen) and whether the request fits all of their limits."""
        known = self._subjects
        states: list[_Subject | None] = []
        fits = True
        for name, spec in subjects:
            state = known.get(name)
            states.append(state)
            if state is None:
                fits = fits and not (spec.tpm and tokens > spec.tpm)
                continue
            state.expire(cutoff)
            if (
                (spec.concurrency and state.in_flight >= spec.concurrency)
                or (spec.rpm and state.count >= spec.rpm)
                or (spec.tpm and state.token_sum + tokens > spec.tpm)
            ):
                fits = False
        return states, fits

    def _record(self, subjects: Sequence[tuple[str, LimitSpec]], states: list[_Subject | None], tokens: int,
                now: float) -> list[tuple[LimitSpec, _Subject, int]]:
        """Count the request against every subject (its window entry and its concurrency slot)."""
        known = self._subjects
        entries: list[tuple[LimitSpec, _Subject, int]] = []
        for (name, spec), maybe in zip(subjects, states, strict=True):
            if maybe is None:
                state = known[name] = _Subject()
            else:
                state = maybe
                known.move_to_end(name)
            seq = state.record(now, tokens) if spec.rpm or spec.tpm else -1
            state.in_flight += 1
            state.last = now
            entries.append((spec, state, seq))
        return entries

    def sweep(self) -> int:
        """Forget subjects with nothing in the window and nothing in flight; return how many."""
        cutoff = self._clock() - self._window
        idle = []
        for name, state in self._subjects.items():
            if state.last > cutoff:
                break  # the rest were admitted later still
            if not state.in_flight:
                idle.append(name)
        for name in idle:
            del self._subjects[name]
        return len(idle)

    def _refusal(
        self,
        subjects: Sequence[tuple[str, LimitSpec]],
        states: list[_Subject | None],
        tokens: int,
        now: float,
    ) -> Refusal:
        """The refusal that clears last, so waiting its retry_after is enough for all of them."""
        worst: tuple[float, LimitName, str, int, float | None, int] | None = None
        for (name, spec), state in zip(subjects, states, strict=True):
            for limit, value, retry in _blocking(spec, state, tokens, now, self._window):
                rank = math.inf if retry is None else retry
                if worst is None or rank > worst[0]:
                    used = state.token_sum if state is not None else 0
                    worst = (rank, limit, name, value, retry, used)
        if worst is None:
            raise RuntimeError("admit() saw a limit that _blocking() does not")
        _, limit, name, value, retry, used = worst
        scope, _, rest = name.partition(":")
        qualifier = rest.partition(":")[2]
        where = f"your {scope} for {qualifier}" if qualifier else f"your {scope}"
        return Refusal(
            limit=limit,
            scope=scope,
            subject=name,
            limit_value=value,
            retry_after=retry,
            message=_message(limit, where, value, retry, used, tokens, self._window),
            rate_headers=_rate_headers(zip((spec for _, spec in subjects), states, strict=True), now, self._window),
        )


def _blocking(
    spec: LimitSpec, state: _Subject | None, tokens: int, now: float, window: float
) -> Iterable[tuple[LimitName, int, float | None]]:
    """Each limit this subject refuses, with its retry_after (None: the request can never fit)."""
    if spec.tpm and tokens > spec.tpm:
        yield "tokens", spec.tpm, None
    if state is None:
        return
    if spec.concurrency and state.in_flight >= spec.concurrency:
        yield "concurrency", spec.concurrency, CONCURRENCY_RETRY_AFTER
    if spec.rpm and state.count >= spec.rpm:
        yield "requests", spec.rpm, _until_out(state.requests_free_at(spec.rpm), now, window)
    if spec.tpm and tokens <= spec.tpm and state.token_sum + tokens > spec.tpm:
        yield "tokens", spec.tpm, _until_out(state.tokens_free_at(spec.tpm, tokens), now, window)


def _until_out(logged_at: float, now: float, window: float) -> float:
    """Seconds until an entry logged at ``logged_at`` leaves the window, exactly as admit() sees it."""
    retry = logged_at + window - now
    while logged_at > (now + retry) - window:  # float rounding must not make us early
        retry = math.nextafter(retry, math.inf)
    return retry


def _message(
    limit: LimitName, where: str, value: int, retry: float | None, used: int, tokens: int, window: float
) -> str:
    per = "per minute" if window == 60 else f"per {window:g}s"
    if retry is None:
        return (
            f"Request too large for tokens {per} (limit {value}, requested {tokens}) on {where}. "
            "Reduce the prompt or max_tokens; retrying will not help."
        )
    after = f"Retry after {format_duration(retry)}."
    if limit == "concurrency":
        return f"Too many concurrent requests (limit {value}) on {where}. {after}"
    if limit == "tokens":
        detail = f"limit {value}, used {used}, requested {tokens}"
        return f"Rate limit reached for tokens {per} ({detail}) on {where}. {after}"
    return f"Rate limit reached for requests {per} (limit {value}) on {where}. {after}"


def _rate_headers(pairs: Iterable[tuple[LimitSpec, _Subject | None]], now: float, window: float) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the most restrictive subject of each group."""
    requests: tuple[int, float, int] | None = None  # (remaining, -reset, limit): min is the tightest
    tokens: tuple[int, float, int] | None = None
    for spec, state in pairs:
        if state is not None:
            state.expire(now - window)
        if spec.rpm:
            used = state.count if state is not None else 0
            reset = state.times[-1] + window - now if state is not None and used else 0.0
            candidate = (max(0, spec.rpm - used), -reset, spec.rpm)
            requests = candidate if requests is None else min(requests, candidate)
        if spec.tpm:
            used = state.token_sum if state is not None else 0
            reset = state.tokens_reset_at() + window - now if state is not None and used else 0.0
            candidate = (max(0, spec.tpm - used), -reset, spec.tpm)
            tokens = candidate if tokens is None else min(tokens, candidate)
    headers: dict[str, str] = {}
    for names, best in ((_REQUEST_HEADERS, requests), (_TOKEN_HEADERS, tokens)):
        if best is not None:
            remaining, reset, limit = best
            headers[names[0]] = str(limit)
            headers[names[1]] = str(remaining)
            headers[names[2]] = format_duration(-reset)
    return headers


def _ceil_ms(seconds: float) -> int:
    """Whole milliseconds, rounded up, ignoring float noise (12.000000000000002 ms is 12 ms)."""
    return math.ceil(seconds * 1000 - 1e-6)


def format_duration(seconds: float) -> str:
    """A duration as OpenAI (Go) writes it: "0s", "12ms", "1.5s", "59.5s", "6m0s", "1h0m0s"."""
    millis = _ceil_ms(seconds)
    if millis <= 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    secs, millis = divmod(millis, 1000)
    minutes, secs = divmod(secs, 60)
    hours, minutes = divmod(minutes, 60)
    fraction = f".{millis:03d}".rstrip("0") if millis else ""
    if hours:
        return f"{hours}h{minutes}m{secs}{fraction}s"
    if minutes:
        return f"{minutes}m{secs}{fraction}s"
    return f"{secs}{fraction}s"


class Admission(Protocol):
    """An admitted request, as the relay holds it."""

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers as of now."""
        ...

    def finish(self, actual_tokens: int) -> None:
        """Replace the token estimate by ``actual_tokens`` and free the concurrency slots; idempotent for
        the slots, and it never awaits (the relay calls it in ``finally``)."""
        ...


AdmissionT = TypeVar("AdmissionT", bound=Admission)


class Limiter(Protocol[AdmissionT]):
    """Admission against rpm, tpm and concurrency limits, per subject ("key:12", "account:3", ...).

    An implementation keeps the invariants stated in this module's docstring (true sliding window,
    all-or-nothing admission, exact ``retry_after``), whatever the concurrency and however many
    servers share it: ``admit`` and ``extend`` check and record as one step.
    """

    async def admit(self, subjects: Sequence[tuple[str, LimitSpec]], tokens: int,
                    request_id: str) -> AdmissionT | Refusal:
        """Count the request against every subject (rpm, its concurrency slot, ``tokens``), or against none."""
        ...

    async def extend(self, ticket: AdmissionT, subjects: Sequence[tuple[str, LimitSpec]],
                     tokens: int) -> Refusal | None:
        """Charge ``tokens`` to an admitted request and admit it on ``subjects`` too; on a refusal nothing changes."""
        ...

    def sweep(self) -> int:
        """Forget what no longer matters (idle subjects); never awaits."""
        ...

    def window(self, name: str) -> Window:
        """What subject ``name`` has used of its window now (the Usage page's live panel); never awaits."""
        ...


class MemoryLimiter:
    """The :class:`Limiter` of one process: :class:`RateLimiter`'s windows behind the async seam.

    Its async methods never suspend (no ``await`` inside), so check-and-record cannot interleave.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, window: float = 60.0) -> None:
        self.windows = RateLimiter(clock=clock, window=window)

    def __len__(self) -> int:
        return len(self.windows)

    async def admit(self, subjects: Sequence[tuple[str, LimitSpec]], tokens: int,
                    request_id: str) -> Ticket | Refusal:
        return self.windows.admit(subjects, tokens)

    async def extend(self, ticket: Ticket, subjects: Sequence[tuple[str, LimitSpec]],
                     tokens: int) -> Refusal | None:
        return self.windows.extend(ticket, subjects, tokens)

    def sweep(self) -> int:
        return self.windows.sweep()

    def window(self, name: str) -> Window:
        return self.windows.window(name)

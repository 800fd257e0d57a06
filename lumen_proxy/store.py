"""What Lumen keeps, whatever keeps it: the :class:`Store` protocol, its rows and its errors.

:class:`Store` is the one way the rest of Lumen reaches accounts, keys, coins and the usage log;
``sqlite_store.SqliteStore`` is its implementation (the zero-setup default), and
``tests/conformance`` the tests every implementation passes. Nothing here names an engine: a foreign
error (``sqlite3.*``...) is mapped to this module's error tree inside the implementation, in one place.

    StoreError                one line for a user or an operator; nothing changed
    ├── NoSuchRecord          no account or key by that name or id
    ├── ServerLocked          :meth:`Store.claim`: another server already serves this store
    ├── StorageFailure        the storage cannot do it now (busy, disk full, I/O, read-only, closed): retry later
    └── StoreDataError        :meth:`Store.write_batch`: a value in the batch cannot be stored, however often retried

Invariant every implementation keeps, after every commit, for each account (integers, micro-coins):
``sum(ledger.amount) - sum(usage.cost) == balance``, because a ledger entry and its balance change,
or a batch of usage rows and their debits, commit together or not at all.
A usage row fits only if each of its integer values is an int in 0..2**63-1 (:func:`usage_row_problem`
says why not); a batch whose debits or daily totals would leave 64-bit integers fails as a whole
(:class:`StoreDataError`), never stored inexactly.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

BUSY_TIMEOUT = 5.0  # seconds a write waits for another writer's lock before failing as busy


class StoreError(Exception):
    """A problem the store reports (unknown account, duplicate name...): one line, nothing changed."""


class NoSuchRecord(StoreError):
    """No account or key by that name or id."""


class ServerLocked(StoreError):
    """Another lumen-proxy server already serves this store (:meth:`Store.claim`)."""


class StorageFailure(StoreError):
    """The storage could not do it now (another writer kept it busy, disk full, I/O, read-only, closed):
    nothing changed, and the same call may succeed later.

    ``str()`` is what the storage said (for logs); :meth:`problem` the one line for an operator.
    ``busy`` says, when another writer held the lock past the wait, for how long and what to look for.
    """

    def __init__(self, message: str, *, where: str = "", busy: str | None = None) -> None:
        super().__init__(message)
        self.where, self.busy = where, busy

    def problem(self, doing: str = "write") -> str:
        """``cannot <doing> the database <where>: ...``, one line."""
        if self.busy is not None:
            return f"cannot write the database {self.where}: {self.busy}; try again"
        return f"cannot {doing} the database {self.where}: {self}"


class TooManyKeys(StoreError):
    """``create_key`` with ``max_active``: the account holds that many active keys already."""

    def __init__(self, active: int) -> None:
        super().__init__(f"the account holds {active} active keys already")
        self.active = active


class StoreDataError(StoreError):
    """A value in a usage batch cannot be stored: the same rows fail however often they are retried."""


@dataclass(frozen=True, slots=True)
class AccountRow:

    id: int
    name: str
    models: tuple[str, ...] | None
    enabled: bool
    created_at: float
    balance: int
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    group: str | None = None
    allowance: int = 0  # micro-coins left of the current period's allowance (spent before the balance)
    allowance_start: float | None = None  # UTC start of the period it was granted for; None: never granted
    email: str | None = None  # matched (case-insensitively) by the portal's sign-in


@dataclass(frozen=True, slots=True)
class Refill:
    """One account's allowance for a new period: ``grant`` replaces what is left, except ``carry``, the
    coins requests in flight may still spend (their holds and unwritten costs), which stays until settled."""

    account_id: int
    start: float  # the new period's UTC start: applied only if the account's is older (exactly once)
    grant: int
    carry: int
    note: str  # the ledger note of the grant, e.g. "allowance 2026-12 (students)"


@dataclass(frozen=True, slots=True)
class ImportRow:
    """One line of ``accounts import``: an account to create, or to bring to this group (and models)."""

    line: int
    name: str
    group: str | None
    coins: int | None = None  # initial coins of a new account; an existing account's balance is left alone
    models: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class KeyRow:
    id: int
    account_id: int
    hash: str
    prefix: str
    label: str | None
    created_at: float
    last_used_at: float | None
    expires_at: float | None
    revoked_at: float | None
    delegate: bool = False  # a shared front end's key: its requests may name the person they are for


@dataclass(slots=True)
class UsageRow:
    """One request, as the usage log keeps it."""

    request_id: str
    time: float
    account_id: int
    key_id: int
    model: str
    endpoint: str
    status: int
    backend: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: int = 0
    estimated: bool = False
    partial: bool = False
    capped: bool = False  # the backend's reported usage was cut to the request's bound
    duration_ms: float = 0.0
    ttfb_ms: float | None = None
    details: dict[str, Any] | None = field(default=None)


INT64_MAX = 2**63 - 1  # the largest integer every engine stores exactly (SQLite INTEGER, SQL BIGINT)
_INT_FIELDS = (("prompt_tokens", INT64_MAX), ("completion_tokens", INT64_MAX), ("cost", INT64_MAX),
               ("status", 999), ("account_id", INT64_MAX), ("key_id", INT64_MAX))


def usage_row_problem(row: UsageRow) -> str | None:
    """Why ``row`` cannot go into the usage table (an INTEGER value that is not an int in range), or None."""
    r, top = row, INT64_MAX  # every request passes here: the common case 3x faster than the loop below
    if (type(r.prompt_tokens) is int and type(r.completion_tokens) is int and type(r.cost) is int
            and type(r.status) is int and type(r.account_id) is int and type(r.key_id) is int
            and 0 <= r.prompt_tokens <= top and 0 <= r.completion_tokens <= top and 0 <= r.cost <= top
            and 0 <= r.status <= 999 and 0 <= r.account_id <= top and 0 <= r.key_id <= top):
        return None
    for name, top in _INT_FIELDS:
        value = getattr(row, name)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name} is {type(value).__name__}, not an integer"
        if not 0 <= value <= top:
            return f"{name} = {value} is outside 0..{top}"
    return None


class UsageBatch:
    """Usage rows prepared one at a time as requests end, written together by ``Store.write_batch``.

    Preparing each row when its request ends spreads the work evenly; preparing a whole batch at
    flush time stalled the event loop for milliseconds every flush (seen as a p99 spike). The rows
    themselves stay in ``usage`` so that a batch the store refuses can be split (:meth:`split`).
    """

    __slots__ = ("usage", "rows", "debits", "daily", "last_used")

    def __init__(self, usage: Iterable[UsageRow] = ()) -> None:
        self.usage: list[UsageRow] = []
        self.rows: list[tuple[Any, ...]] = []
        self.debits: dict[int, int] = {}
        self.daily: dict[tuple[str, int, str, int], list[int]] = {}
        self.last_used: dict[int, float] = {}
        for row in usage:
            self.add(row)

    def __len__(self) -> int:
        return len(self.rows)

    def split(self) -> tuple[UsageBatch, UsageBatch]:
        """Two halves, in order (a batch of one row cannot be split)."""
        middle = len(self.usage) // 2
        return UsageBatch(self.usage[:middle]), UsageBatch(self.usage[middle:])

    def without(self, request_ids: set[str]) -> UsageBatch:
        """The rows whose request id is not in ``request_ids``, with their own debits and totals."""
        return UsageBatch(r for r in self.usage if r.request_id not in request_ids)

    def add(self, r: UsageRow) -> None:
        """Prepare ``r``; if that raises (a value it cannot convert), the batch is left as it was."""
        prepared = (
            r.request_id, r.time, r.account_id, r.key_id, r.model, r.backend, r.endpoint, r.status,
            r.prompt_tokens, r.completion_tokens, r.cost, int(r.estimated), int(r.partial), int(r.capped),
            round(r.duration_ms, 3), None if r.ttfb_ms is None else round(r.ttfb_ms, 3),
            json.dumps(r.details) if r.details else None,
        )
        key = (utc_day(r.time), r.account_id, r.model, r.key_id)
        self.usage.append(r)
        self.rows.append(prepared)
        self.debits[r.account_id] = self.debits.get(r.account_id, 0) + r.cost
        agg = self.daily.get(key)
        if agg is None:
            agg = self.daily[key] = [0, 0, 0, 0, 0]
        agg[0] += 1
        agg[1] += r.status >= 400
        agg[2] += r.prompt_tokens
        agg[3] += r.completion_tokens
        agg[4] += r.cost
        if r.time > self.last_used.get(r.key_id, 0.0):
            self.last_used[r.key_id] = r.time


def parse_utc(text: str) -> float:
    """``YYYY-MM-DD`` (00:00 UTC) or an ISO 8601 time (UTC unless it says otherwise) -> Unix time.

    Raises ValueError; the CLI and the HTTP API each turn that into their own one-line error.
    """
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def utc_day(ts: float) -> str:
    return _day_name(int(ts // 86400))


@functools.lru_cache(maxsize=64)
def _day_name(day_number: int) -> str:
    """Formatting a date costs microseconds per usage row; a day has one name, so cache it."""
    return datetime.fromtimestamp(day_number * 86400, UTC).strftime("%Y-%m-%d")


class Claim(Protocol):
    """Proof that this server is the one serving the store, until :meth:`release`."""

    async def release(self) -> None: ...


class Store(Protocol):
    """Accounts, keys, coins and the usage log; every implementation keeps, and tests/conformance checks:

    - ledger = balance (the module docstring), after every commit, whoever commits;
    - :meth:`write_batch` is ONE transaction, all or nothing, and idempotent per request id: a row
      whose request id the usage log already holds is skipped with its debit, so a batch retried after
      a lost reply (committed, but the caller saw a failure) charges nothing twice;
    - :meth:`changes`: every commit by another writer (another Store on the same storage: the admin
      CLI, another server) becomes visible within the poll interval;
    - :meth:`claim`: at most one server per store at a time;
    - only this module's errors leave a method: :class:`NoSuchRecord` for a missing account or key,
      :class:`StorageFailure` when the storage cannot do it now, :class:`StoreDataError` for a batch
      value it refuses, :class:`StoreError` for any other refusal (a duplicate name...).
    """

    # -- life: claim (servers only), connect, close ---------------------------------------------------------
    async def claim(self) -> Claim:
        """Become the one server of this store until the claim is released (or the process ends), or
        raise :class:`ServerLocked`: at most one server per store at a time, since limits and holds
        live in a server's memory. Admin commands do not claim: they write beside the server."""
        ...

    async def connect(self) -> None:
        """Open the storage and apply the migrations it lacks (recorded by name); refuse, with one
        :class:`StoreError` line, storage that cannot be opened or is newer than this program."""
        ...

    async def close(self) -> None: ...

    async def check_writable(self, within: float = BUSY_TIMEOUT) -> None:
        """Commit a heartbeat, waiting at most ``within`` seconds for another writer (a server's start check);
        a rolled-back write is no proof: a full disk may only show at commit."""
        ...

    async def set_write_wait(self, seconds: float) -> None:
        """How long a write waits for another writer before failing as busy (:class:`StorageFailure`)."""
        ...

    # -- what the server serves from memory, and how it learns of changes -----------------------------------
    async def generation(self) -> int:
        """A number that changes whenever another writer has committed (this Store's own commits may
        leave it alone: who writes through this Store reloads what it needs)."""
        ...

    def changes(self, interval: float) -> AsyncIterator[int | StorageFailure]:
        """Look every ``interval`` seconds, for ever: each look yields :meth:`generation`, or the
        :class:`StorageFailure` that kept it from being read (the feed goes on). A commit by another
        writer shows in the first look that starts after it."""
        ...

    async def load_view(self) -> tuple[list[AccountRow], list[KeyRow]]:
        """Every account, and every key not revoked."""
        ...

    # -- accounts, keys, coins (the admin commands) ---------------------------------------------------------
    async def account(self, name: str) -> AccountRow: ...
    async def account_by_id(self, account_id: int) -> AccountRow: ...
    async def accounts(self, group: str | None = None) -> list[AccountRow]:
        """Every account by name, or those of ``group``."""
        ...

    async def add_account(self, name: str, coins: int = 0, models: Sequence[str] | None = None,
                          *, group: str | None = None, now: float | None = None) -> AccountRow:
        """A new account with its starting ``coins`` in the ledger."""
        ...

    async def update_account(self, name: str, **fields: Any) -> AccountRow:
        """Set ``enabled``, ``models`` (list or None = all), ``rpm``, ``tpm``, ``concurrency``, ``group``
        (a new group's allowance starts at once: the old period's is replaced at the next refill)."""
        ...

    async def add_coins(self, name: str, amount: int, note: str | None = None,
                        *, now: float | None = None) -> AccountRow:
        """A ledger entry and its balance change, together (negative ``amount`` deducts)."""
        ...

    async def add_coins_to_group(self, group: str, amount: int, note: str | None = None,
                                 *, now: float | None = None) -> int:
        """``add_coins`` for every account of ``group``, in one transaction; how many accounts."""
        ...

    async def import_accounts(self, rows: Sequence[ImportRow], *, dry_run: bool = False,
                              now: float | None = None) -> dict[str, list[str]]:
        """Create the accounts that do not exist and set group (and models, when given) of those that do,
        in one transaction; ``{"created": [...], "changed": [...], "unchanged": [...]}`` by name. Re-running
        it changes nothing. ``dry_run``: the same answer, nothing written."""
        ...

    async def group_usage(self, group: str, since: float) -> tuple[int, int]:
        """(requests, cost) of the accounts of ``group`` since the instant ``since``: whole UTC days from
        the daily totals, the part of the first day from the raw log (exact while its rows are kept)."""
        ...

    async def refill(self, refills: Sequence[Refill], *, now: float | None = None) -> list[Refill]:
        """Give each account its new period's allowance, in one transaction, with its ledger rows (the grant,
        and what expired unspent); each applies only if the account's period is older than ``start``, so a
        period is granted exactly once whoever asks. Returns those applied."""
        ...

    async def create_key(self, account_name: str, label: str | None = None, expires_at: float | None = None,
                         *, now: float | None = None, max_active: int | None = None,
                         delegate: bool = False) -> tuple[str, KeyRow]:
        """A new key: returned once in full; only its hash is stored. With ``max_active``, refused
        (:class:`TooManyKeys`) when the account already holds that many keys neither revoked nor expired,
        checked and inserted in one transaction, so two creations at once cannot both pass."""
        ...

    async def find_key(self, key_or_id: str) -> KeyRow: ...
    async def set_delegate(self, key_or_id: str, delegate: bool) -> KeyRow:
        """Make a key a delegating key (or an ordinary one again)."""
        ...
    async def revoke_key(self, key_or_id: str, *, now: float | None = None) -> KeyRow: ...
    async def keys(self, account_name: str | None = None) -> list[tuple[KeyRow, str]]: ...

    # -- the usage log --------------------------------------------------------------------------------------
    async def write_batch(self, batch: UsageBatch) -> dict[int, int]:
        """Insert the rows, debit the balances, add to the daily totals and the keys' last use, in ONE
        transaction: all or nothing, so ledger = balance after it as before it. Idempotent per request
        id: a row whose request id the usage log already holds is skipped, with its debit and totals.

        Returns the micro-coins debited per account by this call. Raises :class:`StoreDataError` when a
        value in the batch cannot be stored (nothing is), :class:`StorageFailure` when the storage fails
        (whether it committed may be unknown: retrying the same batch is safe).
        """
        ...

    async def write_usage(self, rows: Sequence[UsageRow]) -> dict[int, int]:
        """:meth:`write_batch` of ``rows``."""
        ...

    async def present_request_ids(self, request_ids: Sequence[str]) -> set[str]:
        """Which of ``request_ids`` already have a row in the usage log (committed)."""
        ...

    async def usage_rows(self, request_id: str) -> list[dict[str, Any]]:
        """The stored rows of one request, column by column."""
        ...

    async def usage_report(self, account_id: int | None = None, *, since: str | None = None,
                           until: str | None = None, by: str = "day") -> list[dict[str, Any]]:
        """The daily totals (never the raw log), grouped by day, model, key or account; committed data only,
        never waiting for the usage writer."""
        ...

    async def prune_usage(self, before: float, batch: int = 5000) -> int:
        """Delete raw rows older than ``before``, a few at a time (the server keeps writing); daily totals stay."""
        ...


def store_for(database: Path) -> Store:
    """The :class:`Store` the config's ``database`` names (today always a SQLite file), not yet connected.

    Here rather than in ``runtime`` because the admin CLI needs it too, without importing aiohttp.
    """
    from .sqlite_store import SqliteStore  # the implementations import this module

    return SqliteStore(database)

"""All SQL lives here: opening and migrating the database, admin operations, the usage batch, reports.

Invariant kept by every write: for each account,
``sum(ledger.amount) - sum(usage.cost) == accounts.balance`` (all integers, micro-coins), because a
ledger row and its balance change, or a batch of usage rows and their debits, share one transaction.
A usage row fits the schema only if each of its INTEGER values is an int in 0..2**63-1
(:func:`usage_row_problem` says why not), and a batch whose debits or daily totals would leave
SQLite's 64-bit integers fails as a whole (a NOT NULL error, never a silent REAL): SQLite would
otherwise turn an overflowing sum into an inexact float.

Storage fails closed: :meth:`Store.check_writable` commits a heartbeat before a server serves (a
database it cannot write refuses the start), and :func:`storage_problem` turns SQLite's errors into
one line for an operator. Reports read committed data only: they run on a read-only connection of
their own, never inside (nor waiting for) the usage writer's transaction on the main connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from .keys import hash_key, looks_like_key, new_key, visible_prefix
from .migrations import MIGRATIONS, SCHEMA_VERSION

BUSY_TIMEOUT = 5.0  # seconds a statement waits for another connection's write lock before "database is locked"


class StoreError(Exception):
    """A user-facing problem (unknown account, duplicate name...): one line, nothing changed."""


def is_locked(exc: BaseException) -> bool:
    """SQLite gave up waiting for another connection's lock (SQLITE_BUSY)."""
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def storage_problem(path: Path | str | None, exc: BaseException, *, waited: float = BUSY_TIMEOUT,
                    doing: str = "write") -> str:
    """One line for an operator: what SQLite said about the database ``path``, and what it means."""
    if is_locked(exc):
        return (f"cannot write the database {path}: another connection held its write lock for over {waited:g} s "
                "(a long transaction, an open sqlite3 shell?); try again")
    return f"cannot {doing} the database {path}: {exc}"


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


SQLITE_INT_MAX = 2**63 - 1
_INT_FIELDS = (("prompt_tokens", SQLITE_INT_MAX), ("completion_tokens", SQLITE_INT_MAX), ("cost", SQLITE_INT_MAX),
               ("status", 999), ("account_id", SQLITE_INT_MAX), ("key_id", SQLITE_INT_MAX))


def usage_row_problem(row: UsageRow) -> str | None:
    """Why ``row`` cannot go into the usage table (an INTEGER value that is not an int in range), or None."""
    r, top = row, SQLITE_INT_MAX  # every request passes here: the common case 3x faster than the loop below
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
    themselves stay in ``usage`` so that a batch SQLite refuses can be split (:meth:`split`).
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


def _exact(expression: str) -> str:
    """``expression`` if SQLite computes it as an integer, else NULL: on overflow SQLite returns an
    inexact REAL, and NULL in these NOT NULL columns makes the statement fail instead."""
    return f"CASE WHEN typeof({expression}) = 'integer' THEN {expression} END"


_INSERT_USAGE = (
    "INSERT INTO usage (request_id, time, account_id, key_id, model, backend, endpoint, status, prompt_tokens,"
    " completion_tokens, cost, estimated, partial, capped, duration_ms, ttfb_ms, details)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_DEBIT = f"UPDATE accounts SET balance = {_exact('balance - ?1')} WHERE id = ?2"
_ADD_DAILY = (
    "INSERT INTO usage_daily (day, account_id, model, key_id, requests, errors, prompt_tokens, completion_tokens,"
    " cost) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, account_id, model, key_id) DO UPDATE SET "
    + ", ".join(f"{c} = {_exact(f'{c} + excluded.{c}')}"
                for c in ("requests", "errors", "prompt_tokens", "completion_tokens", "cost"))
)


def is_data_error(exc: BaseException) -> bool:
    """True when writing a batch failed because of a value in it (the same rows fail again however
    often they are retried); False for the database's own state (OperationalError: locked, disk full,
    I/O, read-only) and for a closed connection (aiosqlite's plain ValueError), worth retrying later."""
    if isinstance(exc, sqlite3.ProgrammingError):  # also "closed database": only a bad binding is data
        return str(exc).startswith("Error binding parameter")
    return isinstance(exc, sqlite3.IntegrityError | sqlite3.InterfaceError | sqlite3.DataError
                      | OverflowError | UnicodeError | TypeError)


_ACCOUNT_COLS = "id, name, models, enabled, created_at, balance, rpm, tpm, concurrency"
_KEY_COLS = "id, account_id, hash, prefix, label, created_at, last_used_at, expires_at, revoked_at"


def _account(row: Sequence[Any]) -> AccountRow:
    models = tuple(json.loads(row[2])) if row[2] is not None else None
    return AccountRow(row[0], row[1], models, bool(row[3]), row[4], row[5], row[6], row[7], row[8])


def _key(row: Sequence[Any]) -> KeyRow:
    return KeyRow(*row)


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


async def open_db(path: Path) -> aiosqlite.Connection:
    """Open (creating if needed) and migrate the database; refuse one newer than this program."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from None
    try:
        await conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = NORMAL")
        await conn.execute("PRAGMA foreign_keys = ON")
        await migrate(conn, path)
    except sqlite3.Error as exc:
        await conn.close()
        raise StoreError(f"cannot use database {path}: {exc}") from None
    except BaseException:
        await conn.close()
        raise
    return conn


async def migrate(conn: aiosqlite.Connection, path: Path | str = "database") -> int:
    """Apply missing migrations; return the number applied."""
    async with conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {version}, newer than this lumen-proxy understands "
            f"({SCHEMA_VERSION}): upgrade lumen-proxy, or restore a backup made by this version"
        )
    for number in range(version, SCHEMA_VERSION):
        _name, sql = MIGRATIONS[number]
        try:  # one transaction per migration, its version bump included
            await conn.executescript(f"BEGIN IMMEDIATE;\n{sql};\nPRAGMA user_version = {number + 1};\nCOMMIT;")
        except BaseException:
            if conn.in_transaction:
                await conn.rollback()
            raise
    return SCHEMA_VERSION - version


def _read_only_uri(path: Path) -> str:
    return f"{Path(os.path.abspath(path)).as_uri()}?mode=ro"


async def open_reader(path: Path) -> aiosqlite.Connection:
    """A read-only connection: in WAL mode it sees the last commit, never a transaction in progress."""
    conn = await aiosqlite.connect(_read_only_uri(path), uri=True, isolation_level=None)
    try:
        await conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    except BaseException:
        await conn.close()
        raise
    return conn


class Store:
    """Typed operations over one aiosqlite connection (aiosqlite serialises them on its thread), and
    reports over a read-only one opened on first use."""

    def __init__(self, conn: aiosqlite.Connection, path: Path | None = None) -> None:
        self.conn = conn
        self.path = path  # the database file, when opened from one
        # aiosqlite orders statements, not transactions: two BEGINs on one connection must queue.
        self._tx_lock = asyncio.Lock()
        self._reader: aiosqlite.Connection | None = None
        self._reader_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Store:
        return cls(await open_db(path), path)

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        await self.conn.close()

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection reports read on: the read-only one; without a file (a bare connection handed
        in), the main one, but only between transactions, so a report never sees uncommitted rows."""
        if self.path is None:
            async with self._tx_lock:
                yield self.conn
            return
        async with self._reader_lock:
            if self._reader is None:
                self._reader = await open_reader(self.path)
        yield self._reader

    async def check_writable(self, within: float = BUSY_TIMEOUT) -> None:
        """Commit the heartbeat row, waiting at most ``within`` seconds for another connection's lock.

        A real committed write, because a rolled-back ``BEGIN IMMEDIATE`` passes on a full disk (the
        write-ahead log is only appended at commit). Raises :class:`StoreError` with one line.
        """
        await self.set_busy_timeout(within)
        try:
            async with self.transaction():
                await self.conn.execute(
                    "INSERT INTO heartbeat (id, pid, time) VALUES (1, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, time = excluded.time",
                    (os.getpid(), time.time()))
        except sqlite3.Error as exc:
            raise StoreError(storage_problem(self.path, exc, waited=within)) from None
        finally:
            await self.set_busy_timeout(BUSY_TIMEOUT)

    async def _one(self, sql: str, params: Iterable[Any] = ()) -> Any:
        async with self.conn.execute(sql, tuple(params)) as cur:
            return await cur.fetchone()

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        async with self.conn.execute(sql, tuple(params)) as cur:
            return list(await cur.fetchall())

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """One write transaction at a time on this connection; rolled back on any failure or cancel."""
        async with self._tx_lock:
            try:
                await self.conn.execute("BEGIN IMMEDIATE")
                yield
                await self.conn.commit()
            except BaseException:
                if self.conn.in_transaction:
                    await self.conn.rollback()
                raise

    async def _transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        async with self.transaction():
            for sql, params in statements:
                await self.conn.execute(sql, params)

    # -- change detection ---------------------------------------------------------------------------
    async def data_version(self) -> int:
        """Changes when another connection (the admin CLI) commits; our own writes leave it alone."""
        row = await self._one("PRAGMA data_version")
        return int(row[0])

    async def load_view(self) -> tuple[list[AccountRow], list[KeyRow]]:
        accounts = [_account(r) for r in await self._all(f"SELECT {_ACCOUNT_COLS} FROM accounts")]
        keys = [_key(r) for r in await self._all(f"SELECT {_KEY_COLS} FROM keys WHERE revoked_at IS NULL")]
        return accounts, keys

    # -- accounts -----------------------------------------------------------------------------------
    async def account(self, name: str) -> AccountRow:
        row = await self._one(f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE name = ?", (name,))
        if row is None:
            raise StoreError(f"no account named {name!r} (see: lumen-proxy accounts list)")
        return _account(row)

    async def account_by_id(self, account_id: int) -> AccountRow:
        row = await self._one(f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE id = ?", (account_id,))
        if row is None:
            raise StoreError(f"no account with id {account_id}")
        return _account(row)

    async def accounts(self) -> list[AccountRow]:
        return [_account(r) for r in await self._all(f"SELECT {_ACCOUNT_COLS} FROM accounts ORDER BY name")]

    async def add_account(self, name: str, coins: int = 0, models: Sequence[str] | None = None,
                          *, now: float | None = None) -> AccountRow:
        now = time.time() if now is None else now
        if await self._one("SELECT 1 FROM accounts WHERE name = ?", (name,)):
            raise StoreError(f"an account named {name!r} already exists")
        models_json = json.dumps(sorted(set(models))) if models is not None else None
        try:
            async with self.transaction():
                cur = await self.conn.execute(
                    "INSERT INTO accounts (name, models, created_at, balance) VALUES (?, ?, ?, ?)",
                    (name, models_json, now, coins),
                )
                await self.conn.execute(
                    "INSERT INTO ledger (account_id, time, amount, note) VALUES (?, ?, ?, ?)",
                    (cur.lastrowid, now, coins, "initial coins"),
                )
        except sqlite3.IntegrityError:
            raise StoreError(f"an account named {name!r} already exists") from None
        return await self.account(name)

    async def update_account(self, name: str, **fields: Any) -> AccountRow:
        """Set ``enabled``, ``models`` (list or None = all), ``rpm``, ``tpm``, ``concurrency``."""
        account = await self.account(name)
        allowed = {"enabled", "models", "rpm", "tpm", "concurrency"}
        sets, params = [], []
        for column, value in fields.items():
            if column not in allowed:
                raise ValueError(column)
            if column == "models" and value is not None:
                value = json.dumps(sorted(set(value)))
            sets.append(f"{column} = ?")
            params.append(int(value) if isinstance(value, bool) else value)
        if sets:
            await self._transaction([(f"UPDATE accounts SET {', '.join(sets)} WHERE id = ?",
                                      (*params, account.id))])
        return await self.account(name)

    async def add_coins(self, name: str, amount: int, note: str | None = None,
                        *, now: float | None = None) -> AccountRow:
        account = await self.account(name)
        await self._transaction([
            ("INSERT INTO ledger (account_id, time, amount, note) VALUES (?, ?, ?, ?)",
             (account.id, time.time() if now is None else now, amount, note)),
            ("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, account.id)),
        ])
        return await self.account(name)

    # -- keys ---------------------------------------------------------------------------------------
    async def create_key(self, account_name: str, label: str | None = None,
                         expires_at: float | None = None, *, now: float | None = None) -> tuple[str, KeyRow]:
        """Create a key; the full key is returned once and only its hash is stored."""
        account = await self.account(account_name)
        key = new_key()
        now = time.time() if now is None else now
        await self._transaction([(
            "INSERT INTO keys (account_id, hash, prefix, label, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
            (account.id, hash_key(key), visible_prefix(key), label, now, expires_at),
        )])
        row = await self._one(f"SELECT {_KEY_COLS} FROM keys WHERE hash = ?", (hash_key(key),))
        return key, _key(row)

    async def find_key(self, key_or_id: str) -> KeyRow:
        if looks_like_key(key_or_id):
            row = await self._one(f"SELECT {_KEY_COLS} FROM keys WHERE hash = ?", (hash_key(key_or_id),))
        elif key_or_id.isdigit():
            row = await self._one(f"SELECT {_KEY_COLS} FROM keys WHERE id = ?", (int(key_or_id),))
        else:
            raise StoreError(f"{key_or_id!r} is neither a key (sk_...) nor a key id (see: lumen-proxy keys list)")
        if row is None:
            raise StoreError("no such key (see: lumen-proxy keys list)")
        return _key(row)

    async def revoke_key(self, key_or_id: str, *, now: float | None = None) -> KeyRow:
        key = await self.find_key(key_or_id)
        if key.revoked_at is None:
            await self._transaction([("UPDATE keys SET revoked_at = ? WHERE id = ?",
                                      (time.time() if now is None else now, key.id))])
        return await self.find_key(str(key.id))

    async def keys(self, account_name: str | None = None) -> list[tuple[KeyRow, str]]:
        sql = (f"SELECT {', '.join('k.' + c.strip() for c in _KEY_COLS.split(','))}, a.name "
               "FROM keys k JOIN accounts a ON a.id = k.account_id")
        params: tuple[Any, ...] = ()
        if account_name is not None:
            await self.account(account_name)
            sql += " WHERE a.name = ?"
            params = (account_name,)
        return [(_key(r[:9]), r[9]) for r in await self._all(sql + " ORDER BY k.id", params)]

    # -- usage --------------------------------------------------------------------------------------
    async def write_usage(self, rows: Sequence[UsageRow]) -> dict[int, int]:
        """Insert rows, debit balances, update daily aggregates and key use, in ONE transaction.

        Returns the micro-coins debited per account, so the in-memory wallets can follow.
        """
        return await self.write_batch(UsageBatch(rows))

    async def set_busy_timeout(self, seconds: float) -> None:
        """How long a write waits for another connection's lock before failing with "database is locked"."""
        await self.conn.execute(f"PRAGMA busy_timeout = {max(0, int(seconds * 1000))}")

    async def write_batch(self, batch: UsageBatch) -> dict[int, int]:
        """Raises what SQLite raises; a data error (:func:`is_data_error`) means some row cannot be stored."""
        async with self.transaction():  # a cancel while BEGIN is queued still rolls back
            await self.conn.executemany(_INSERT_USAGE, batch.rows)
            await self.conn.executemany(
                _DEBIT, [(cost, account_id) for account_id, cost in batch.debits.items() if cost])
            await self.conn.executemany(_ADD_DAILY, [(*k, *v) for k, v in batch.daily.items()])
            await self.conn.executemany(
                "UPDATE keys SET last_used_at = max(coalesce(last_used_at, 0), ?) WHERE id = ?",
                [(t, key_id) for key_id, t in batch.last_used.items()],
            )
        return batch.debits

    async def usage_report(self, account_id: int | None = None, *, since: str | None = None,
                           until: str | None = None, by: str = "day") -> list[dict[str, Any]]:
        """Sum the daily aggregate (never the raw log), grouped by day, model, key or account."""
        group = {"day": "day", "model": "model", "key": "key_id", "account": "account_id"}[by]
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if account_id is not None:
            where.append("account_id = ?")
            params.append(account_id)
        if since:
            where.append("day >= ?")
            params.append(since)
        if until:
            where.append("day <= ?")
            params.append(until)
        async with self._reading() as conn:
            async with conn.execute(
                f"SELECT {group}, sum(requests), sum(errors), sum(prompt_tokens), sum(completion_tokens), sum(cost)"
                f" FROM usage_daily WHERE {' AND '.join(where)} GROUP BY {group} ORDER BY {group}",
                params,
            ) as cur:
                rows = list(await cur.fetchall())
            names: dict[int, str] = {}
            if by == "account":
                async with conn.execute("SELECT id, name FROM accounts") as cur:
                    names = {r[0]: r[1] for r in await cur.fetchall()}
        return [{by: names.get(r[0], r[0]) if names else r[0], "requests": r[1], "errors": r[2],
                 "prompt_tokens": r[3], "completion_tokens": r[4], "cost": r[5]} for r in rows]

    async def prune_usage(self, before: float, batch: int = 5000) -> int:
        """Delete raw rows older than ``before`` in small transactions (the server keeps writing)."""
        deleted = 0
        while True:
            async with self.transaction():
                cur = await self.conn.execute(
                    "DELETE FROM usage WHERE id IN (SELECT id FROM usage WHERE time < ? LIMIT ?)", (before, batch)
                )
                count = cur.rowcount
            deleted += count
            if count < batch:
                return deleted

    async def present_request_ids(self, request_ids: Sequence[str]) -> set[str]:
        """Which of ``request_ids`` already have a row in the usage log (committed)."""
        present: set[str] = set()
        for start in range(0, len(request_ids), 500):  # SQLite's limit on bound parameters is 999 or more
            chunk = request_ids[start:start + 500]
            rows = await self._all(
                f"SELECT request_id FROM usage WHERE request_id IN ({', '.join('?' * len(chunk))})", chunk)
            present.update(r[0] for r in rows)
        return present

    async def usage_rows(self, request_id: str) -> list[dict[str, Any]]:
        async with self.conn.execute("SELECT * FROM usage WHERE request_id = ?", (request_id,)) as cur:
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]

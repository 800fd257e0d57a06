"""The SQLite :class:`~.store.Store`: all SQL, the PRAGMAs, the migrations and the one-server lock.

One aiosqlite connection writes (aiosqlite serialises statements on its thread; ``transaction``
serialises transactions); reports read committed data on a read-only connection of their own, never
inside (nor waiting for) the usage writer's transaction. WAL lets the admin CLI write beside a
running server; ``PRAGMA data_version`` is the generation (it moves when another connection commits).

Every SQLite error leaves through :meth:`SqliteStore._foreign`, the one place it becomes a Lumen
store error (``raise ... from`` the original): :class:`~.store.StoreDataError` for a value in a
usage batch SQLite refuses, :class:`~.store.StorageFailure` for everything else (locked, disk full,
I/O, read-only, a closed connection). A batch whose debits or daily totals would overflow SQLite's
64-bit INTEGER fails as a whole (a NOT NULL error, never a silent REAL).

Migrations (``migrations.MIGRATIONS``) are recorded by name in the ``migrations`` table, one
transaction each, their record included; ``PRAGMA user_version`` still counts them, for releases
that predate the names. A database an older release migrated (no table, a ``user_version``) gets
its first ``user_version`` names recorded; a database with names, or a ``user_version``, this
program does not know is newer and refused.

``claim`` takes an exclusive ``flock`` on ``<database>.lock`` for the life of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import aiosqlite

from .keys import hash_key, looks_like_key, new_key, visible_prefix
from .migrations import MIGRATIONS
from .store import (
    BUSY_TIMEOUT,
    AccountRow,
    ImportRow,
    KeyRow,
    NoSuchRecord,
    Refill,
    ServerLocked,
    StorageFailure,
    StoreDataError,
    StoreError,
    TooManyKeys,
    UsageBatch,
    UsageRow,
    parse_utc,
    utc_day,
)

F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, Any]])


def _is_locked(exc: BaseException) -> bool:
    """SQLite gave up waiting for another connection's lock (SQLITE_BUSY)."""
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def _is_data_error(exc: BaseException) -> bool:
    """True when writing a batch failed because of a value in it (the same rows fail again however
    often they are retried); False for the database's own state (OperationalError: locked, disk full,
    I/O, read-only) and for a closed connection (aiosqlite's plain ValueError), worth retrying later."""
    if isinstance(exc, sqlite3.ProgrammingError):  # also "closed database": only a bad binding is data
        return str(exc).startswith("Error binding parameter")
    return isinstance(exc, sqlite3.IntegrityError | sqlite3.InterfaceError | sqlite3.DataError
                      | OverflowError | UnicodeError | TypeError)


_BATCH_ERRORS = (sqlite3.Error, ValueError, OverflowError, UnicodeError, TypeError)


def _translated(method: F) -> F:
    """``method`` with its SQLite errors turned into Lumen's by :meth:`SqliteStore._foreign`."""
    @functools.wraps(method)
    async def translated(self: SqliteStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise self._foreign(exc) from exc
    return cast(F, translated)


def _exact(expression: str) -> str:
    """``expression`` if SQLite computes it as an integer, else NULL: on overflow SQLite returns an
    inexact REAL, and NULL in these NOT NULL columns makes the statement fail instead."""
    return f"CASE WHEN typeof({expression}) = 'integer' THEN {expression} END"


_INSERT_USAGE = (
    "INSERT INTO usage (request_id, time, account_id, key_id, model, backend, endpoint, status, prompt_tokens,"
    " completion_tokens, cost, estimated, partial, capped, duration_ms, ttfb_ms, details)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The allowance is spent first (both right-hand sides read the old allowance): balance + allowance falls by
# exactly the cost, and only the part beyond the allowance leaves the balance.
_DEBIT = ("UPDATE accounts SET allowance = max(allowance - ?1, 0), "
          f"balance = {_exact('balance - max(?1 - allowance, 0)')} WHERE id = ?2")
_ADD_DAILY = (
    "INSERT INTO usage_daily (day, account_id, model, key_id, requests, errors, prompt_tokens, completion_tokens,"
    " cost) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, account_id, model, key_id) DO UPDATE SET "
    + ", ".join(f"{c} = {_exact(f'{c} + excluded.{c}')}"
                for c in ("requests", "errors", "prompt_tokens", "completion_tokens", "cost"))
)
_ACCOUNT_COLS = ("id, name, models, enabled, created_at, balance, rpm, tpm, concurrency, group_name, allowance,"
                 " allowance_start, email")
_KEY_COLS = "id, account_id, hash, prefix, label, created_at, last_used_at, expires_at, revoked_at, delegate"
_IN_CHUNK = 500  # bound parameters per IN (...): SQLite's limit is 999 or more


def _account(row: Sequence[Any]) -> AccountRow:
    models = tuple(json.loads(row[2])) if row[2] is not None else None
    return AccountRow(row[0], row[1], models, bool(row[3]), row[4], row[5], row[6], row[7], row[8], row[9], row[10],
                      row[11], row[12])


def _key(row: Sequence[Any]) -> KeyRow:
    return KeyRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], bool(row[9]))


# -- migrations --------------------------------------------------------------------------------------------
async def _recorded(conn: aiosqlite.Connection, path: Path) -> tuple[list[str], bool]:
    """The names of the migrations this database has had, and whether it records them by name (an
    older release counted them in ``user_version``); refuse a database newer than this program."""
    known = [name for name, _sql in MIGRATIONS]
    async with conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'migrations'") as cur:
        by_name = await cur.fetchone() is not None
    if by_name:
        async with conn.execute("SELECT name FROM migrations") as cur:
            names = [str(r[0]) for r in await cur.fetchall()]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise StoreError(f"{path} has migrations this lumen-proxy does not know ({', '.join(unknown)}), "
                             "so it is newer: upgrade lumen-proxy, or restore a backup made by this version")
        return names, True
    async with conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    version = int(row[0]) if row else 0
    if version > len(known):
        raise StoreError(
            f"{path} has schema version {version}, newer than this lumen-proxy understands "
            f"({len(known)}): upgrade lumen-proxy, or restore a backup made by this version"
        )
    return known[:version], False


def _record(names: Iterable[str], count: int) -> str:
    """SQL recording ``names`` as applied, and their count for older releases (names match
    ``m###_[a-z0-9_]+``: tests/test_migrations.py checks it, so they need no quoting)."""
    now = time.time()
    rows = "".join(f"INSERT INTO migrations (name, applied_at) VALUES ('{name}', {now!r});\n" for name in names)
    return f"{rows}PRAGMA user_version = {count};\n"


async def _script(conn: aiosqlite.Connection, sql: str) -> None:
    """``sql`` in one transaction, rolled back on any failure."""
    try:
        await conn.executescript(f"BEGIN IMMEDIATE;\n{sql}\nCOMMIT;")
    except BaseException:
        if conn.in_transaction:
            await conn.rollback()
        raise


async def migrate(conn: aiosqlite.Connection, path: Path) -> int:
    """Apply the missing migrations, one transaction each, their record included; return how many ran."""
    names, by_name = await _recorded(conn, path)
    if not by_name:  # a new database, or one an older release migrated: record what it has had
        await _script(conn, "CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL);\n"
                      + _record(names, len(names)))
    done = set(names)
    missing = [(name, sql) for name, sql in MIGRATIONS if name not in done]
    for name, sql in missing:
        done.add(name)
        await _script(conn, f"{sql};\n{_record([name], len(done))}")
    return len(missing)


# -- the one-server lock -----------------------------------------------------------------------------------
class _LockFile:
    """The open, flock-ed ``<database>.lock``: released by closing it (or by the process ending)."""

    def __init__(self, handle: IO[str]) -> None:
        self.handle = handle

    async def release(self) -> None:
        self.handle.close()


def _lock(path: Path) -> _LockFile:
    """Hold an exclusive lock on ``<database>.lock`` for the life of the server (CLI commands skip it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(f"{path}.lock", "a+")  # noqa: SIM115 - held open until the server stops
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ServerLocked(
            f"another lumen-proxy server is already running on {path}: limits and coin holds live in "
            "one process's memory, so only one server may serve a database"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return _LockFile(handle)


def _read_only_uri(path: Path) -> str:
    return f"{Path(os.path.abspath(path)).as_uri()}?mode=ro"


class SqliteStore:
    """The :class:`~.store.Store` over one SQLite file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: aiosqlite.Connection | None = None
        self._write_wait = BUSY_TIMEOUT
        # aiosqlite orders statements, not transactions: two BEGINs on one connection must queue.
        self._tx_lock = asyncio.Lock()
        self._reader: aiosqlite.Connection | None = None
        self._reader_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        """A connected store on ``path`` (created and migrated if need be)."""
        store = cls(path)
        await store.connect()
        return store

    @property
    def conn(self) -> aiosqlite.Connection:
        """The writing connection."""
        if self._conn is None:
            raise StorageFailure("not connected", where=str(self.path))
        return self._conn

    def _foreign(self, exc: BaseException, *, batch: bool = False) -> StoreError:
        """The one place an error of SQLite's (or aiosqlite's) becomes a Lumen store error."""
        if batch and _is_data_error(exc):
            return StoreDataError(f"SQLite refused the row: {type(exc).__name__}: {exc}")
        busy = None
        if _is_locked(exc):
            busy = (f"another connection held its write lock for over {self._write_wait:g} s "
                    "(a long transaction, an open sqlite3 shell?)")
        return StorageFailure(str(exc), where=str(self.path), busy=busy)

    # -- life --------------------------------------------------------------------------------------------
    async def claim(self) -> _LockFile:
        """An exclusive ``flock`` on ``<database>.lock``, held until released or the process ends."""
        return _lock(self.path)

    async def connect(self) -> None:
        path = self.path
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
        self._conn, self._write_wait = conn, BUSY_TIMEOUT

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def check_writable(self, within: float = BUSY_TIMEOUT) -> None:
        """A real committed write, because a rolled-back ``BEGIN IMMEDIATE`` passes on a full disk (the
        write-ahead log is only appended at commit)."""
        await self.set_write_wait(within)
        try:
            async with self.transaction():
                await self.conn.execute(
                    "INSERT INTO heartbeat (id, pid, time) VALUES (1, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, time = excluded.time",
                    (os.getpid(), time.time()))
        except sqlite3.Error as exc:
            raise self._foreign(exc) from exc  # while the wait it names is still ``within``
        finally:
            await self.set_write_wait(BUSY_TIMEOUT)

    @_translated
    async def set_write_wait(self, seconds: float) -> None:
        self._write_wait = max(0.0, seconds)
        await self.conn.execute(f"PRAGMA busy_timeout = {max(0, int(seconds * 1000))}")

    # -- plumbing ----------------------------------------------------------------------------------------
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

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[aiosqlite.Connection]:
        """The read-only connection (in WAL mode it sees the last commit, never a transaction in progress)."""
        async with self._reader_lock:
            if self._reader is None:
                reader = await aiosqlite.connect(_read_only_uri(self.path), uri=True, isolation_level=None)
                try:
                    await reader.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
                except BaseException:
                    await reader.close()
                    raise
                self._reader = reader
        yield self._reader

    # -- change detection --------------------------------------------------------------------------------
    @_translated
    async def generation(self) -> int:
        """``PRAGMA data_version``: it moves when another connection commits; our own writes leave it alone."""
        row = await self._one("PRAGMA data_version")
        return int(row[0])

    async def changes(self, interval: float) -> AsyncIterator[int | StorageFailure]:
        """:meth:`generation` every ``interval`` seconds (one cheap PRAGMA: ~70 µs, bench/bench_auth_view.py)."""
        while True:
            await asyncio.sleep(interval)
            try:
                yield await self.generation()
            except StorageFailure as exc:
                yield exc

    @_translated
    async def load_view(self) -> tuple[list[AccountRow], list[KeyRow]]:
        accounts = [_account(r) for r in await self._all(f"SELECT {_ACCOUNT_COLS} FROM accounts")]
        keys = [_key(r) for r in await self._all(f"SELECT {_KEY_COLS} FROM keys WHERE revoked_at IS NULL")]
        return accounts, keys

    # -- accounts ----------------------------------------------------------------------------------------
    @_translated
    async def account(self, name: str) -> AccountRow:
        row = await self._one(f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE name = ?", (name,))
        if row is None:
            raise NoSuchRecord(f"no account named {name!r} (see: lumen-proxy accounts list)")
        return _account(row)

    @_translated
    async def account_by_id(self, account_id: int) -> AccountRow:
        row = await self._one(f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE id = ?", (account_id,))
        if row is None:
            raise NoSuchRecord(f"no account with id {account_id}")
        return _account(row)

    @_translated
    async def accounts(self, group: str | None = None) -> list[AccountRow]:
        if group is None:
            return [_account(r) for r in await self._all(f"SELECT {_ACCOUNT_COLS} FROM accounts ORDER BY name")]
        return [_account(r) for r in await self._all(
            f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE group_name = ? ORDER BY name", (group,))]

    @_translated
    async def add_account(self, name: str, coins: int = 0, models: Sequence[str] | None = None,
                          *, group: str | None = None, now: float | None = None) -> AccountRow:
        now = time.time() if now is None else now
        if await self._one("SELECT 1 FROM accounts WHERE name = ?", (name,)):
            raise StoreError(f"an account named {name!r} already exists")
        try:
            async with self.transaction():
                await self._insert_account(name, coins, models, group, now)
        except sqlite3.IntegrityError:
            raise StoreError(f"an account named {name!r} already exists") from None
        return await self.account(name)

    async def _insert_account(self, name: str, coins: int, models: Sequence[str] | None, group: str | None,
                              now: float) -> None:
        """Inside a transaction: the account and its "initial coins" ledger row."""
        models_json = json.dumps(sorted(set(models))) if models is not None else None
        cur = await self.conn.execute(
            "INSERT INTO accounts (name, models, created_at, balance, group_name) VALUES (?, ?, ?, ?, ?)",
            (name, models_json, now, coins, group),
        )
        await self.conn.execute("INSERT INTO ledger (account_id, time, amount, note) VALUES (?, ?, ?, ?)",
                                (cur.lastrowid, now, coins, "initial coins"))

    @_translated
    async def update_account(self, name: str, **fields: Any) -> AccountRow:
        account = await self.account(name)
        allowed = {"enabled", "models", "rpm", "tpm", "concurrency", "group", "email"}
        sets, params = [], []
        for column, value in fields.items():
            if column not in allowed:
                raise ValueError(column)
            if column == "models" and value is not None:
                value = json.dumps(sorted(set(value)))
            if column == "group":
                if value == account.group:
                    continue
                column = "group_name"
                sets.append("allowance_start = NULL")  # the new group's allowance starts now
            sets.append(f"{column} = ?")
            params.append(int(value) if isinstance(value, bool) else value)
        if sets:
            await self._transaction([(f"UPDATE accounts SET {', '.join(sets)} WHERE id = ?",
                                      (*params, account.id))])
        return await self.account(name)

    @_translated
    async def add_coins(self, name: str, amount: int, note: str | None = None,
                        *, now: float | None = None) -> AccountRow:
        account = await self.account(name)
        await self._transaction([
            ("INSERT INTO ledger (account_id, time, amount, note) VALUES (?, ?, ?, ?)",
             (account.id, time.time() if now is None else now, amount, note)),
            ("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, account.id)),
        ])
        return await self.account(name)

    @_translated
    async def add_coins_to_group(self, group: str, amount: int, note: str | None = None,
                                 *, now: float | None = None) -> int:
        now = time.time() if now is None else now
        async with self.transaction():
            await self.conn.execute(
                "INSERT INTO ledger (account_id, time, amount, note) SELECT id, ?, ?, ? FROM accounts"
                " WHERE group_name = ?", (now, amount, note, group))
            cur = await self.conn.execute("UPDATE accounts SET balance = balance + ? WHERE group_name = ?",
                                          (amount, group))
            return int(cur.rowcount)

    @_translated
    async def import_accounts(self, rows: Sequence[ImportRow], *, dry_run: bool = False,
                              now: float | None = None) -> dict[str, list[str]]:
        now = time.time() if now is None else now
        plan: dict[str, list[str]] = {"created": [], "changed": [], "unchanged": []}
        async with self.transaction():
            existing = {a.name: a for a in (_account(r) for r in await self._all(
                f"SELECT {_ACCOUNT_COLS} FROM accounts"))}
            for row in rows:
                account = existing.get(row.name)
                if account is None:
                    plan["created"].append(row.name)
                    if not dry_run:
                        await self._insert_account(row.name, row.coins or 0, row.models, row.group, now)
                    continue
                changes: list[tuple[str, Any]] = []
                if row.group != account.group:
                    changes += [("group_name", row.group), ("allowance_start", None)]
                if row.models is not None and tuple(sorted(set(row.models))) != account.models:
                    changes.append(("models", json.dumps(sorted(set(row.models)))))
                plan["changed" if changes else "unchanged"].append(row.name)
                if changes and not dry_run:
                    await self.conn.execute(
                        f"UPDATE accounts SET {', '.join(f'{c} = ?' for c, _ in changes)} WHERE id = ?",
                        (*(v for _, v in changes), account.id))
        return plan

    @_translated
    async def group_usage(self, group: str, since: float) -> tuple[int, int]:
        next_day = utc_day(since + 86400) if since % 86400 else utc_day(since)
        day_start = parse_utc(next_day)
        async with self.reading() as conn:
            async with conn.execute(
                    "SELECT count(*), coalesce(sum(u.cost), 0) FROM usage u JOIN accounts a ON a.id = u.account_id"
                    " WHERE a.group_name = ? AND u.time >= ? AND u.time < ?", (group, since, day_start)) as cur:
                part = await cur.fetchone()
            async with conn.execute(
                    "SELECT coalesce(sum(d.requests), 0), coalesce(sum(d.cost), 0) FROM usage_daily d"
                    " JOIN accounts a ON a.id = d.account_id WHERE a.group_name = ? AND d.day >= ?",
                    (group, next_day)) as cur:
                days = await cur.fetchone()
        assert part is not None and days is not None
        return int(part[0]) + int(days[0]), int(part[1]) + int(days[1])

    @_translated
    async def refill(self, refills: Sequence[Refill], *, now: float | None = None) -> list[Refill]:
        now = time.time() if now is None else now
        applied = []
        async with self.transaction():
            for refill in refills:
                row = await self._one(
                    "SELECT allowance FROM accounts WHERE id = ? AND (allowance_start IS NULL OR allowance_start < ?)",
                    (refill.account_id, refill.start))
                if row is None:  # granted already (this period or a later one), or the account is gone
                    continue
                left = int(row[0])
                kept = min(left, refill.carry)
                await self.conn.execute("UPDATE accounts SET allowance = ?, allowance_start = ? WHERE id = ?",
                                        (refill.grant + kept, refill.start, refill.account_id))
                ledger = [(refill.account_id, now, -(left - kept), "allowance expired unspent")] if left > kept else []
                if refill.grant:
                    ledger.append((refill.account_id, now, refill.grant, refill.note))
                await self.conn.executemany(
                    "INSERT INTO ledger (account_id, time, amount, note) VALUES (?, ?, ?, ?)", ledger)
                applied.append(refill)
        return applied

    # -- keys --------------------------------------------------------------------------------------------
    @_translated
    async def create_key(self, account_name: str, label: str | None = None, expires_at: float | None = None,
                         *, now: float | None = None, max_active: int | None = None,
                         delegate: bool = False) -> tuple[str, KeyRow]:
        account = await self.account(account_name)
        key = new_key()
        now = time.time() if now is None else now
        async with self.transaction():
            if max_active is not None:
                active = int((await self._one(
                    "SELECT count(*) FROM keys WHERE account_id = ? AND revoked_at IS NULL"
                    " AND (expires_at IS NULL OR expires_at > ?)", (account.id, now)))[0])
                if active >= max_active:
                    raise TooManyKeys(active)
            await self.conn.execute(
                "INSERT INTO keys (account_id, hash, prefix, label, created_at, expires_at, delegate)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (account.id, hash_key(key), visible_prefix(key), label, now, expires_at, int(delegate)))
        row = await self._one(f"SELECT {_KEY_COLS} FROM keys WHERE hash = ?", (hash_key(key),))
        return key, _key(row)

    @_translated
    async def find_key(self, key_or_id: str) -> KeyRow:
        if looks_like_key(key_or_id):
            row = await self._one(f"SELECT {_KEY_COLS} FROM keys WHERE hash = ?", (hash_key(key_or_id),))
        elif key_or_id.isdigit():
            row = await self._one(f"SELECT {_KEY_COLS} FROM keys WHERE id = ?", (int(key_or_id),))
        else:
            raise StoreError(f"{key_or_id!r} is neither a key (sk_...) nor a key id (see: lumen-proxy keys list)")
        if row is None:
            raise NoSuchRecord("no such key (see: lumen-proxy keys list)")
        return _key(row)

    @_translated
    async def revoke_key(self, key_or_id: str, *, now: float | None = None) -> KeyRow:
        key = await self.find_key(key_or_id)
        if key.revoked_at is None:
            await self._transaction([("UPDATE keys SET revoked_at = ? WHERE id = ?",
                                      (time.time() if now is None else now, key.id))])
        return await self.find_key(str(key.id))

    @_translated
    async def set_delegate(self, key_or_id: str, delegate: bool) -> KeyRow:
        key = await self.find_key(key_or_id)
        await self._transaction([("UPDATE keys SET delegate = ? WHERE id = ?", (int(delegate), key.id))])
        return await self.find_key(str(key.id))

    @_translated
    async def keys(self, account_name: str | None = None) -> list[tuple[KeyRow, str]]:
        sql = (f"SELECT {', '.join('k.' + c.strip() for c in _KEY_COLS.split(','))}, a.name "
               "FROM keys k JOIN accounts a ON a.id = k.account_id")
        params: tuple[Any, ...] = ()
        if account_name is not None:
            await self.account(account_name)
            sql += " WHERE a.name = ?"
            params = (account_name,)
        return [(_key(r[:10]), r[10]) for r in await self._all(sql + " ORDER BY k.id", params)]

    # -- usage -------------------------------------------------------------------------------------------
    async def write_usage(self, rows: Sequence[UsageRow]) -> dict[int, int]:
        return await self.write_batch(UsageBatch(rows))

    async def write_batch(self, batch: UsageBatch) -> dict[int, int]:
        try:
            async with self.transaction():  # a cancel while BEGIN is queued still rolls back
                present = await self._present([r.request_id for r in batch.usage])
                if present:  # a retry of a batch already (partly) committed: only its new rows
                    batch = batch.without(present)
                await self.conn.executemany(_INSERT_USAGE, batch.rows)
                await self.conn.executemany(
                    _DEBIT, [(cost, account_id) for account_id, cost in batch.debits.items() if cost])
                await self.conn.executemany(_ADD_DAILY, [(*k, *v) for k, v in batch.daily.items()])
                await self.conn.executemany(
                    "UPDATE keys SET last_used_at = max(coalesce(last_used_at, 0), ?) WHERE id = ?",
                    [(t, key_id) for key_id, t in batch.last_used.items()],
                )
        except _BATCH_ERRORS as exc:
            raise self._foreign(exc, batch=True) from exc
        return batch.debits

    async def _present(self, request_ids: Sequence[str]) -> set[str]:
        present: set[str] = set()
        for start in range(0, len(request_ids), _IN_CHUNK):
            chunk = request_ids[start:start + _IN_CHUNK]
            rows = await self._all(
                f"SELECT request_id FROM usage WHERE request_id IN ({', '.join('?' * len(chunk))})", chunk)
            present.update(r[0] for r in rows)
        return present

    @_translated
    async def present_request_ids(self, request_ids: Sequence[str]) -> set[str]:
        return await self._present(request_ids)

    @_translated
    async def usage_report(self, account_id: int | None = None, *, since: str | None = None,
                           until: str | None = None, by: str = "day") -> list[dict[str, Any]]:
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
        async with self.reading() as conn:
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

    @_translated
    async def prune_usage(self, before: float, batch: int = 5000) -> int:
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

    @_translated
    async def usage_rows(self, request_id: str) -> list[dict[str, Any]]:
        async with self.conn.execute("SELECT * FROM usage WHERE request_id = ?", (request_id,)) as cur:
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]

"""What the portal keeps in SQLite: sessions, one-time sign-in links, and the Usage page's queries.

Secrets never reach the database: a session id and a link token are 256-bit random strings the
browser (or the admin's terminal) holds; the tables keep their SHA-256 (as for API keys, a hash of a
high-entropy secret needs no slow password hash). A link is spent by one conditional UPDATE, so two
clicks racing (or a server and the CLI) cannot both sign in with it. The Usage page reads on the
store's read-only connection, never waiting for the usage writer's transaction.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..keys import hash_key
from ..sqlite_store import SqliteStore
from ..store import AccountRow, NoSuchRecord, StoreError

LINK_MINUTES = 15.0


@dataclass(frozen=True, slots=True)
class Session:
    account_id: int
    csrf: str
    method: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class LinkUse:
    """The outcome of spending a sign-in link: the account, or why not."""

    account_id: int | None
    problem: str | None = None


class PortalRecords:
    """Sessions, sign-in links and usage queries over the server's :class:`SqliteStore`."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    async def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        try:
            async with self.store.transaction():
                cur = await self.store.conn.execute(sql, params)
                return int(cur.rowcount)
        except sqlite3.Error as exc:
            raise self.store._foreign(exc) from exc

    async def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            async with self.store.reading() as conn, conn.execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise self.store._foreign(exc) from exc

    # -- sessions ----------------------------------------------------------------------------------------
    async def open_session(self, account_id: int, method: str, hours: float, *, now: float | None = None,
                           ) -> tuple[str, Session]:
        """A new session: its id (for the cookie, never stored) and its record."""
        now = time.time() if now is None else now
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        session = Session(account_id, csrf, method, now + hours * 3600)
        try:
            async with self.store.transaction():
                conn = self.store.conn
                await conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
                await conn.execute("DELETE FROM login_links WHERE expires_at <= ?", (now - 86400,))
                await conn.execute(
                    "INSERT INTO sessions (hash, account_id, csrf, method, created_at, expires_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)", (hash_key(sid), account_id, csrf, method, now, session.expires_at))
        except sqlite3.Error as exc:
            raise self.store._foreign(exc) from exc
        return sid, session

    async def session(self, sid: str, *, now: float | None = None) -> Session | None:
        now = time.time() if now is None else now
        rows = await self._read("SELECT account_id, csrf, method, expires_at FROM sessions"
                                " WHERE hash = ? AND expires_at > ?", (hash_key(sid), now))
        return Session(*rows[0]) if rows else None

    async def close_session(self, sid: str) -> None:
        await self._write("DELETE FROM sessions WHERE hash = ?", (hash_key(sid),))

    async def close_sessions(self, account_id: int) -> int:
        return await self._write("DELETE FROM sessions WHERE account_id = ?", (account_id,))

    # -- sign-in links -----------------------------------------------------------------------------------
    async def create_link(self, account_name: str, minutes: float = LINK_MINUTES, *,
                          now: float | None = None) -> tuple[str, float]:
        """A token for ``/login/link/<token>`` and when it expires; the account must exist and be enabled."""
        account = await self.store.account(account_name)
        if not account.enabled:
            raise StoreError(f"the account {account_name!r} is disabled (lumen-proxy accounts enable {account_name})")
        now = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        await self._write("INSERT INTO login_links (hash, account_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                          (hash_key(token), account.id, now, now + minutes * 60))
        return token, now + minutes * 60

    async def use_link(self, token: str, *, now: float | None = None) -> LinkUse:
        """Spend ``token`` once; a second use, an expired or an unknown token says which."""
        now = time.time() if now is None else now
        digest = hash_key(token)
        try:
            async with self.store.transaction():
                cur = await self.store.conn.execute(
                    "UPDATE login_links SET used_at = ? WHERE hash = ? AND used_at IS NULL AND expires_at > ?"
                    " RETURNING account_id", (now, digest, now))
                row = await cur.fetchone()
        except sqlite3.Error as exc:
            raise self.store._foreign(exc) from exc
        if row is not None:
            return LinkUse(int(row[0]))
        seen = await self._read("SELECT used_at FROM login_links WHERE hash = ?", (digest,))
        if not seen:
            return LinkUse(None, "This sign-in link is not valid. Check that it was copied whole, "
                                 "or ask your administrator for a new one.")
        if seen[0][0] is not None:
            return LinkUse(None, "This sign-in link was already used. Each link signs in once: "
                                 "ask your administrator for a new one.")
        return LinkUse(None, "This sign-in link has expired (links are valid for a short time, 15 minutes "
                             "unless your administrator chose otherwise): ask your administrator for a new one.")

    # -- accounts named by a sign-in ---------------------------------------------------------------------
    async def find_account(self, who: str) -> AccountRow | None:
        """The account named ``who``, else the one whose email is ``who`` (case-insensitively)."""
        try:
            return await self.store.account(who)
        except NoSuchRecord:
            pass
        rows = await self._read("SELECT name FROM accounts WHERE lower(email) = lower(?)", (who,))
        return await self.store.account(rows[0][0]) if rows else None

    async def set_email(self, account_id: int, email: str) -> None:
        await self._write("UPDATE accounts SET email = ? WHERE id = ? AND email IS NULL"
                          " AND NOT EXISTS (SELECT 1 FROM accounts WHERE lower(email) = lower(?))",
                          (email, account_id, email))

    # -- the Usage page ----------------------------------------------------------------------------------
    async def daily(self, account_id: int, since_day: str) -> list[tuple[str, str, int, int, int, int]]:
        """(day, model, requests, prompt tokens, completion tokens, cost) from the daily totals."""
        return await self._read(
            "SELECT day, model, sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cost)"
            " FROM usage_daily WHERE account_id = ? AND day >= ? GROUP BY day, model ORDER BY day, model",
            (account_id, since_day))

    async def by_key(self, account_id: int, since_day: str) -> list[tuple[int, str | None, str | None, int, int,
                                                                          int]]:
        """(key id, prefix, label, requests, tokens, cost) per key since ``since_day``."""
        return await self._read(
            "SELECT d.key_id, k.prefix, k.label, sum(d.requests), sum(d.prompt_tokens + d.completion_tokens),"
            " sum(d.cost) FROM usage_daily d LEFT JOIN keys k ON k.id = d.key_id"
            " WHERE d.account_id = ? AND d.day >= ? GROUP BY d.key_id ORDER BY sum(d.cost) DESC, d.key_id",
            (account_id, since_day))

    async def recent(self, account_id: int, limit: int = 50) -> list[tuple[Any, ...]]:
        """The newest requests: time, model, endpoint, prompt, completion, cost, status, duration, key prefix."""
        return await self._read(
            "SELECT u.time, u.model, u.endpoint, u.prompt_tokens, u.completion_tokens, u.cost, u.status,"
            " u.duration_ms, k.prefix FROM usage u LEFT JOIN keys k ON k.id = u.key_id"
            " WHERE u.account_id = ? ORDER BY u.time DESC LIMIT ?", (account_id, limit))

    async def request_row(self, account_id: int, request_id: str) -> tuple[Any, ...] | None:
        """(model, status, prompt, completion, cost, partial) of the account's request ``request_id``."""
        rows = await self._read("SELECT model, status, prompt_tokens, completion_tokens, cost, partial FROM usage"
                                " WHERE request_id = ? AND account_id = ?", (request_id[:64], account_id))
        return tuple(rows[0]) if rows else None

    async def export(self, account_id: int, since: float, until: float,
                     chunk: int = 2000) -> AsyncIterator[list[tuple[Any, ...]]]:
        """Every request of the period, oldest first, in chunks (a year of heavy use never sits in memory)."""
        after = since
        after_id = 0
        while True:
            rows = await self._read(
                "SELECT u.id, u.time, u.request_id, u.model, u.endpoint, k.prefix, u.status, u.prompt_tokens,"
                " u.completion_tokens, u.cost, u.duration_ms FROM usage u LEFT JOIN keys k ON k.id = u.key_id"
                " WHERE u.account_id = ? AND (u.time, u.id) > (?, ?) AND u.time < ?"
                " ORDER BY u.time, u.id LIMIT ?", (account_id, after, after_id, until, chunk))
            if not rows:
                return
            yield [row[1:] for row in rows]
            after, after_id = rows[-1][1], rows[-1][0]
            if len(rows) < chunk:
                return

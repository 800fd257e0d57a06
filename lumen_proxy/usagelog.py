"""The usage log writer: request rows and their debits, batched off the request path.

``record`` never awaits and never raises (a cancelled handler can always call it) and prepares the
row and its log line right away, so no flush stalls the event loop. A background task commits what
was recorded every ``interval`` seconds in ONE transaction per batch (rows + debits + daily
aggregate), then moves the debits from pending into the in-memory balances under the same lock the
key/account view reloads with.

A bad row never blocks the others. A row that does not fit the schema (an INTEGER value that is not
an int in 0..2**63-1, see ``store.usage_row_problem``) is quarantined by ``record`` and never enters
a batch. A batch that SQLite refuses because of its data (``store.is_data_error``) is split in
halves until each refused row is alone; that row is quarantined and every other row commits, in
order. Quarantined means: one JSON line (the row as recorded, integers exact however large, and the
reason) appended to ``<database>.quarantine.jsonl`` (mode 0600), one ERROR log line naming the
request id and the reason (never a prompt or a key), and the row is not billed: its cost leaves
``Wallets.pending`` (``record`` takes ``row.cost`` to be what the relay settled) and the balance
keeps those coins, so balance = ledger - committed costs stays exact.
A failure of the database itself (locked, disk full, I/O error, read-only) keeps the rows and
retries them first, in order.

``close`` (a graceful stop) flushes everything, retrying while the database is busy for at most
``CLOSE_WITHIN`` seconds, and returns how many rows it could not write (also kept in ``unwritten``):
the server then logs an ERROR and exits 1 instead of "usage log flushed".
What a hard kill (SIGKILL, power loss) can lose: the rows of requests that ended in the last
``interval`` seconds (at most one batch), and with them their debits: never half a batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import orjson

from .billing import Wallets, to_coins
from .store import Store, UsageBatch, UsageRow, is_data_error, usage_row_problem

log = logging.getLogger("lumen_proxy")
CLOSE_WITHIN = 5.0  # seconds a graceful stop keeps trying to write the rest of the usage log
RETRY_PAUSE = 0.2


def quarantine_path(database: Path) -> Path:
    return Path(f"{database}.quarantine.jsonl")


def _json_line(fields: dict[str, Any]) -> bytes:
    """orjson, or the standard library for an int beyond 64 bits (orjson refuses it): exact either way."""
    try:
        return orjson.dumps(fields, default=str)
    except TypeError:
        return json.dumps(fields, default=str).encode()


def _log_fields(row: UsageRow, account: str, prompt: Any) -> dict[str, Any]:
    fields = {
        "time": round(row.time, 3), "request_id": row.request_id, "account": account,
        "key_id": row.key_id, "model": row.model, "endpoint": row.endpoint, "backend": row.backend,
        "status": row.status, "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens, "cost": to_coins(row.cost),
        "estimated": row.estimated, "partial": row.partial, "capped": row.capped,
        "duration_ms": round(row.duration_ms, 2),
        "ttfb_ms": None if row.ttfb_ms is None else round(row.ttfb_ms, 2),
    }
    if prompt is not None:
        fields["prompt"] = prompt
    return fields


def _access_line(row: UsageRow, account: str, prompt: Any) -> bytes:
    try:
        return _json_line(_log_fields(row, account, prompt))
    except (TypeError, ValueError, OverflowError):  # a value of the wrong type: logged as it came
        raw = {name: getattr(row, name) for name in ("time", "request_id", "key_id", "model", "endpoint",
                                                      "backend", "status", "prompt_tokens", "completion_tokens",
                                                      "cost", "estimated", "partial", "capped")}
        return _json_line({**raw, "account": account})


class UsageLog:
    def __init__(self, store: Store, wallets: Wallets, lock: asyncio.Lock, *, interval: float = 0.1,
                 access_log: TextIO | None = sys.stdout, quarantine: Path | None = None) -> None:
        self.store, self.wallets, self.lock, self.interval = store, wallets, lock, interval
        self.access_log = access_log
        if quarantine is None and store.path is not None:
            quarantine = quarantine_path(store.path)
        self.quarantine = quarantine
        self._batch = UsageBatch()
        self._queue: list[UsageBatch] = []  # batches waiting for a commit (a failed one first), in order
        self._lines: list[bytes] = []
        self.written = 0
        self.failures = 0
        self.quarantined = 0
        self.unwritten = 0  # rows ``close`` could not write

    def record(self, row: UsageRow, account_name: str, *, prompt: Any = None) -> None:
        """Prepare the row and its log line now (a few µs per request, not a stall per batch).

        A row that cannot be stored is quarantined here, so it never reaches a batch.
        """
        if self.access_log is not None:
            self._lines.append(_access_line(row, account_name, prompt))
        problem = usage_row_problem(row)
        if problem is None:
            try:
                self._batch.add(row)
                return
            except (TypeError, ValueError, OverflowError) as exc:  # e.g. a time that is not a number
                problem = f"cannot prepare the row: {exc}"
        self._quarantine(row, problem)

    def _quarantine(self, row: UsageRow, reason: str) -> None:
        """Set ``row`` aside for good: in the quarantine file, in the error log, not billed."""
        self.quarantined += 1
        if isinstance(row.cost, int) and isinstance(row.account_id, int):
            self.wallets.dropped(row.account_id, row.cost)
        line = _json_line({"quarantined_at": round(time.time(), 3), "reason": reason,
                           "row": dataclasses.asdict(row)})
        log.error("usage row %s quarantined %s, not billed: %s", row.request_id, self._set_aside(line), reason)

    def _set_aside(self, line: bytes) -> str:
        """Append ``line`` to the quarantine file; say where it went (into the log itself if not there)."""
        if self.quarantine is None:
            return f"(no quarantine file; the row: {line.decode()})"
        try:
            fd = os.open(self.quarantine, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line + b"\n")
            finally:
                os.close(fd)
        except OSError as exc:
            return f"(cannot write {self.quarantine}: {exc.strerror}; the row: {line.decode()})"
        return f"in {self.quarantine}"

    def write_access_log(self) -> None:
        """One JSON line per request, written a batch at a time (one write call, off the request path).

        Never the key; the prompt only when ``log_prompts`` is on; never the completion.
        """
        if self.access_log is None or not self._lines:
            return
        lines, self._lines = self._lines, []
        try:
            self.access_log.write(b"\n".join(lines).decode() + "\n")
            self.access_log.flush()
        except (OSError, ValueError):  # a closed stdout must not fail anything
            pass

    @property
    def queued(self) -> int:
        return len(self._batch) + sum(len(b) for b in self._queue)

    async def flush(self) -> int:
        """Write what is queued, one transaction per batch. Shielded: a caller cancelled while SQLite
        commits (the writer task at shutdown) must not requeue committed rows, to be billed twice."""
        return await asyncio.shield(self._flush())

    async def _flush(self, deadline: float | None = None) -> int:
        """Commit the queued batches in order; a database failure stops here and keeps the rest queued.

        With a ``deadline`` (loop time), waiting for another connection's lock ends there.
        """
        self.write_access_log()
        async with self.lock:
            if deadline is not None:
                await self.store.set_busy_timeout(deadline - asyncio.get_running_loop().time())
            if len(self._batch):
                self._queue.append(self._batch)
                self._batch = UsageBatch()
            done = 0
            while self._queue:
                batch = self._queue[0]
                try:
                    debits = await self.store.write_batch(batch)
                except Exception as exc:
                    if not is_data_error(exc):
                        raise
                    self._isolate(exc)
                    continue
                self._queue.pop(0)
                self.wallets.committed(debits)
                self.written += len(batch)
                done += len(batch)
            return done

    def _isolate(self, exc: Exception) -> None:
        """SQLite refused the first queued batch because of its data: halve it, or quarantine its one row."""
        batch = self._queue[0]
        if len(batch) > 1:
            self._queue[0:1] = batch.split()
        else:
            self._queue.pop(0)
            self._quarantine(batch.usage[0], f"SQLite refused the row: {type(exc).__name__}: {exc}")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception as exc:
                self.failures += 1
                log.error("cannot write the usage log (will retry, %d rows waiting): %s", self.queued, exc)

    async def close(self, within: float = CLOSE_WITHIN) -> int:
        """Flush everything (a graceful stop); return how many rows could not be written.

        Retried while the database is busy, for at most ``within`` seconds counted from now (a write
        already under way when the stop began finishes first: at most the store's busy timeout).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        for attempt in range(1, 6):
            try:
                await asyncio.shield(self._flush(deadline))
                break
            except Exception as exc:
                log.error("usage log flush failed (attempt %d): %s", attempt, exc)
            if loop.time() + RETRY_PAUSE >= deadline:
                break
            await asyncio.sleep(RETRY_PAUSE)
        self.unwritten = self.queued
        return self.unwritten

"""The usage log writer: request rows and their debits, batched off the request path.

``record`` never awaits and never raises (a cancelled handler can always call it) and prepares the
row and its log line right away, so no flush stalls the event loop. A background task commits what
was recorded every ``interval`` seconds in ONE transaction per batch (rows + debits + daily
aggregate), then moves the debits from pending into the in-memory balances under the same lock the
key/account view reloads with.

A bad row never blocks the others. A row that does not fit the schema (an INTEGER value that is not
an int in 0..2**63-1, see ``store.usage_row_problem``) is quarantined by ``record`` and never enters
a batch. A batch the store refuses because of its data (:class:`~.store.StoreDataError`) is split
in halves until each refused row is alone; that row is quarantined and every other row commits, in
order. Quarantined means: one JSON line (the row as recorded, integers exact however large, and the
reason) appended to ``<database>.quarantine.jsonl`` (mode 0600, fsynced like the spill file), one
ERROR log line naming the request id and the reason (never a prompt or a key), and the row is not
billed: its cost leaves ``Wallets.pending`` (``record`` takes ``row.cost`` to be what the relay settled) and the balance
keeps those coins, so balance = ledger - committed costs stays exact.
A failure of the storage itself (:class:`~.store.StorageFailure`: locked, disk full, I/O error,
read-only), or any other error, keeps the rows and retries them first, in order; the store skips a
row whose request id it already holds, so a retry after a commit whose reply was lost bills nothing twice.

Storage fails closed. While writes fail, ``health`` says so (``/healthz`` turns 503), and once they
have failed for longer than ``backlog.seconds`` or ``backlog.rows`` rows wait, ``refusal``
returns the 503 (``storage_unavailable``, ``Retry-After``) the relay raises for every new request
until a commit succeeds: no request is served that could not be billed. ``refusal`` costs one
attribute test while writes work (it is on every request's path).

``close`` (a graceful stop) flushes everything, retrying while the database is busy for at most
``CLOSE_WITHIN`` seconds. What it still cannot commit goes whole, or not at all, to the spill file
``<database>.spill.jsonl`` (mode 0600, appended, fsynced): ``spilled`` rows, not lost; ``unwritten``
counts rows lost because even the spill failed. ``replay`` (at the next start, before anything is
served) commits the spilled rows with their debits, daily totals and key use, then removes the
file; a row whose request id the usage log already holds is skipped, so a replay interrupted after
its commit, or run twice, bills each request exactly once.
What a hard kill (SIGKILL, power loss) can lose: the rows of requests that ended in the last
``interval`` seconds (at most one batch), and with them their debits: never half a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import orjson

from .billing import Coins, to_coins
from .config import UsageBacklog
from .errors import StorageUnavailable
from .store import StorageFailure, Store, StoreDataError, StoreError, UsageBatch, UsageRow, usage_row_problem

log = logging.getLogger("lumen_proxy")
CLOSE_WITHIN = 5.0  # seconds a graceful stop keeps trying to write the rest of the usage log
RETRY_PAUSE = 0.2
RETRY_AFTER = 5  # seconds a 503 storage_unavailable asks clients to wait
LOG_EVERY = 10.0  # seconds between two "cannot write the usage log" lines while writes keep failing


def quarantine_path(database: Path) -> Path:
    return Path(f"{database}.quarantine.jsonl")


def spill_path(database: Path) -> Path:
    return Path(f"{database}.spill.jsonl")


def _json_line(fields: dict[str, Any]) -> bytes:
    """orjson, or the standard library for an int beyond 64 bits (orjson refuses it): exact either way."""
    try:
        return orjson.dumps(fields, default=str)
    except TypeError:
        return json.dumps(fields, default=str).encode()


def append_durably(path: Path, data: bytes) -> None:
    """Append ``data`` whole or not at all (a failed write is cut off again), then fsync it and the folder."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the file's name, when this append created it
    finally:
        os.close(folder)


def coins_text(micro: int) -> str:
    return f"{Decimal(micro).scaleb(-6).normalize():f}"


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
    def __init__(self, store: Store, wallets: Coins, lock: asyncio.Lock, *, interval: float = 0.1,
                 access_log: TextIO | None = sys.stdout, quarantine: Path | None = None, spill: Path | None = None,
                 backlog: UsageBacklog | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.wallets, self.lock, self.interval = store, wallets, lock, interval
        self.access_log = access_log
        self.quarantine, self.spill = quarantine, spill  # files beside the database; None: no such file
        self.backlog, self.clock = backlog or UsageBacklog(), clock
        self._batch = UsageBatch()
        self._queue: list[UsageBatch] = []  # batches waiting for a commit (a failed one first), in order
        self._queue_rows = 0  # rows in ``_queue``, so ``queued`` stays O(1) however many batches wait
        self._lines: list[bytes] = []
        self._failing_since: float | None = None  # clock time the first failed write began; None: writes work
        self._refusing = False  # as last logged
        self._logged_at = -math.inf
        self.written = 0
        self.failures = 0
        self.quarantined = 0
        self.spilled = 0  # rows ``close`` wrote to the spill file: not lost, the next start replays them
        self.unwritten = 0  # rows ``close`` could neither commit nor spill: lost
        self.spill_problem: str | None = None  # why the spill failed

    def record(self, row: UsageRow, account_name: str, *, prompt: Any = None) -> None:
        """Prepare the row and its log line now (a few µs per request, not a stall per batch).

        A row that cannot be stored is quarantined here, so it never reaches a batch.
        """
        if self.access_log is not None:
            self._lines.append(_access_line(row, account_name, prompt))
        self._enqueue(row)

    def _enqueue(self, row: UsageRow) -> None:
        problem = usage_row_problem(row)
        if problem is None:
            try:
                self._batch.add(row)
                return
            except (TypeError, ValueError, OverflowError) as exc:  # e.g. a time that is not a number
                problem = f"cannot prepare the row: {exc}"
        self._quarantine(row, problem)

    # -- storage health ---------------------------------------------------------------------------------
    def refusal(self) -> StorageUnavailable | None:
        """The 503 a new request gets while the backlog is over its bound; None otherwise.

        While writes work this is one attribute test: the relay calls it for every request.
        """
        if self._failing_since is None:
            return None
        if not self.is_over_bound():
            return None
        return StorageUnavailable("Usage cannot be recorded right now, so no request can be billed. "
                                  f"Retry in {RETRY_AFTER} seconds.", headers={"Retry-After": str(RETRY_AFTER)})

    def is_over_bound(self) -> bool:
        """Writes are failing, for longer than ``backlog.seconds`` or with ``backlog.rows`` rows waiting."""
        since = self._failing_since
        return since is not None and (self.clock() - since > self.backlog.seconds or self.queued >= self.backlog.rows)

    def health(self) -> dict[str, Any]:
        """For /healthz: ok while writes work; else for how long they have failed, what waits, and
        whether new requests are refused."""
        since = self._failing_since
        return {"ok": since is None, "failing_for_s": 0.0 if since is None else round(self.clock() - since, 3),
                "rows_waiting": self.queued, "refusing": self.is_over_bound()}

    def _note_failure(self, exc: Exception) -> None:
        """Log a failed write: the first one, a change to or from refusing, then every ``LOG_EVERY`` s."""
        self.failures += 1
        now, refusing = self.clock(), self.is_over_bound()
        if refusing == self._refusing and now - self._logged_at < LOG_EVERY:
            return
        self._refusing, self._logged_at = refusing, now
        since = now if self._failing_since is None else self._failing_since
        then = ("new requests get 503 until a write succeeds" if refusing else
                f"requests are refused after {self.backlog.seconds:g} s or {self.backlog.rows} waiting rows")
        log.error("cannot write the usage log for %.1f s (%d rows waiting, will retry; %s): %s",
                  now - since, self.queued, then, exc)

    def _note_success(self) -> None:
        if self._failing_since is None:
            return
        log.warning("usage log written again after failing for %.1f s; serving requests",
                    self.clock() - self._failing_since)
        self._failing_since, self._refusing, self._logged_at = None, False, -math.inf

    # -- quarantine --------------------------------------------------------------------------------------
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
            append_durably(self.quarantine, line + b"\n")
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

    # -- writing -----------------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._batch) + self._queue_rows

    async def flush(self) -> int:
        """Write what is queued, one transaction per batch. Shielded: a caller cancelled while the
        store commits (the writer task at shutdown) must not requeue committed rows, to be billed twice."""
        return await asyncio.shield(self._flush())

    async def _flush(self, deadline: float | None = None) -> int:
        """Commit the queued batches in order; a database failure stops here and keeps the rest queued.

        With a ``deadline`` (loop time), waiting for another connection's lock ends there.
        """
        self.write_access_log()
        async with self.lock:
            started = self.clock()
            try:
                done = await self._commit_queue(deadline)
            except Exception:
                if self._failing_since is None:
                    self._failing_since = started
                raise
            self._note_success()
            return done

    async def _commit_queue(self, deadline: float | None) -> int:
        if deadline is not None:
            await self.store.set_write_wait(deadline - asyncio.get_running_loop().time())
        if len(self._batch):
            self._queue.append(self._batch)
            self._queue_rows += len(self._batch)
            self._batch = UsageBatch()
        done = 0
        while self._queue:
            batch = self._queue[0]
            try:
                await self.store.write_batch(batch)
            except StoreDataError as exc:
                self._isolate(exc)
                continue
            self._queue.pop(0)
            self._queue_rows -= len(batch)
            # The whole batch's debits: rows an earlier attempt committed (its reply lost) were skipped
            # now, but their costs still wait in pending. Should a reload have taken the balance since,
            # it is short by them until the next reload: fewer coins, never more.
            self.wallets.committed(batch.debits)
            self.written += len(batch)
            done += len(batch)
        return done

    def _isolate(self, exc: StoreDataError) -> None:
        """The store refused the first queued batch because of its data: halve it, or quarantine its one row."""
        batch = self._queue[0]
        if len(batch) > 1:
            self._queue[0:1] = batch.split()
        else:
            self._queue.pop(0)
            self._queue_rows -= 1
            self._quarantine(batch.usage[0], str(exc))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception as exc:
                self._note_failure(exc)

    # -- a stop, and the next start ----------------------------------------------------------------------
    async def close(self, within: float = CLOSE_WITHIN) -> int:
        """Flush everything (a graceful stop); return how many rows could not be committed.

        Retried while the database is busy, for at most ``within`` seconds counted from now (a write
        already under way when the stop began finishes first: at most the store's busy timeout). The
        rows left then go to the spill file (``spilled``), or, if even that fails, are lost
        (``unwritten``, and ``spill_problem`` says why).
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
        rows = [row for batch in (*self._queue, self._batch) for row in batch.usage]
        self._queue, self._queue_rows, self._batch = [], 0, UsageBatch()
        if rows:
            self._spill(rows)
        return len(rows)

    def _spill(self, rows: list[UsageRow]) -> None:
        """Append ``rows`` to the spill file, all or none; count them as spilled, or as lost."""
        if self.spill is None:
            self.unwritten, self.spill_problem = len(rows), "no spill file (the database has no path)"
            return
        at = round(time.time(), 3)
        data = b"".join(_json_line({"spilled_at": at, "row": dataclasses.asdict(row)}) + b"\n" for row in rows)
        try:
            append_durably(self.spill, data)
        except OSError as exc:
            self.unwritten, self.spill_problem = len(rows), f"cannot write {self.spill}: {exc.strerror or exc}"
            return
        self.spilled = len(rows)

    async def replay(self) -> tuple[int, int] | None:
        """Commit the rows a stop spilled (before anything is served), then remove the spill file.

        Returns (rows, micro-coins) replayed, or None without a spill file. A request id the usage log
        already holds is skipped (billed once, however often this runs). Raises :class:`StoreError`
        when the file cannot be read or the rows cannot be committed: the file is kept, nothing is lost.
        """
        path = self.spill
        if path is None or not path.exists():
            return None
        rows = self._read_spill(path)
        try:
            present = await self.store.present_request_ids([r.request_id for r in rows])
        except StorageFailure as exc:
            raise StoreError(f"cannot replay {path}: {exc.problem()}") from None
        fresh = list({r.request_id: r for r in rows if r.request_id not in present}.values())
        for row in fresh:
            if isinstance(row.cost, int) and isinstance(row.account_id, int):  # pending, as the relay left it
                self.wallets.owe(row.account_id, row.cost)
            self._enqueue(row)
        try:
            await self._flush()
        except StorageFailure as exc:
            raise StoreError(f"cannot replay {path}: {exc.problem()}") from None
        total = sum(r.cost for r in fresh if isinstance(r.cost, int))
        try:
            path.unlink()
        except OSError as exc:  # its rows are committed: the next replay skips them
            log.error("cannot remove %s after replaying it: %s", path, exc.strerror or exc)
        billed = sum(1 for r in rows if r.request_id in present)
        skipped = [f"{billed} already in the usage log"] if billed else []
        if len(rows) - billed - len(fresh):
            skipped.append(f"{len(rows) - billed - len(fresh)} repeated")
        log.warning("replayed %d usage rows (%s coins) from %s%s", len(fresh), coins_text(total), path,
                    f"; skipped {' and '.join(skipped)}" if skipped else "")
        return len(fresh), total

    def _read_spill(self, path: Path) -> list[UsageRow]:
        """The spilled rows; a line that is not one (cut short, edited) is quarantined as it is."""
        try:
            lines = path.read_bytes().splitlines()
        except OSError as exc:
            raise StoreError(f"cannot read the spill file {path}: {exc.strerror or exc}") from None
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = UsageRow(**json.loads(line)["row"])  # json, not orjson: ints beyond 64 bits
                if not isinstance(row.request_id, str | None):
                    raise TypeError(f"request_id is {type(row.request_id).__name__}")
                rows.append(row)
            except (ValueError, TypeError, KeyError) as exc:
                reason = f"line {number} of {path} is not a usage row: {exc}"
                self.quarantined += 1
                entry = _json_line({"quarantined_at": round(time.time(), 3), "reason": reason,
                                    "line": line.decode(errors="replace")})
                log.error("a spilled usage row was quarantined %s, not billed: %s", self._set_aside(entry), reason)
        return rows

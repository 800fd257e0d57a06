"""The usage log writer: request rows and their debits, batched off the request path.

``record`` never awaits (a cancelled handler can always call it) and prepares the row and its log
line right away, so no flush stalls the event loop. A background task commits what was recorded
every ``interval`` seconds in ONE transaction per batch (rows + debits + daily aggregate), then
moves the debits from pending into the in-memory balances under the same lock the key/account view
reloads with. A failed commit keeps the rows and retries; ``close`` flushes everything.
What a hard kill (SIGKILL, power loss) can lose: the rows of requests that ended in the last
``interval`` seconds (at most one batch), and with them their debits: never half a batch.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, TextIO

import orjson

from .billing import Wallets, to_coins
from .store import Store, UsageBatch, UsageRow

log = logging.getLogger("lumen_proxy")


def _log_fields(row: UsageRow, account: str, prompt: Any) -> dict[str, Any]:
    fields = {
        "time": round(row.time, 3), "request_id": row.request_id, "account": account,
        "key_id": row.key_id, "model": row.model, "endpoint": row.endpoint, "backend": row.backend,
        "status": row.status, "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens, "cost": to_coins(row.cost),
        "estimated": row.estimated, "partial": row.partial, "duration_ms": round(row.duration_ms, 2),
        "ttfb_ms": None if row.ttfb_ms is None else round(row.ttfb_ms, 2),
    }
    if prompt is not None:
        fields["prompt"] = prompt
    return fields


class UsageLog:
    def __init__(self, store: Store, wallets: Wallets, lock: asyncio.Lock, *, interval: float = 0.1,
                 access_log: TextIO | None = sys.stdout) -> None:
        self.store, self.wallets, self.lock, self.interval = store, wallets, lock, interval
        self.access_log = access_log
        self._batch = UsageBatch()
        self._failed: list[UsageBatch] = []  # batches a failed commit kept, retried first, in order
        self._lines: list[bytes] = []
        self.written = 0
        self.failures = 0

    def record(self, row: UsageRow, account_name: str, *, prompt: Any = None) -> None:
        """Prepare the row and its log line now (a few µs per request, not a stall per batch)."""
        self._batch.add(row)
        if self.access_log is not None:
            self._lines.append(orjson.dumps(_log_fields(row, account_name, prompt), default=str))

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
        return len(self._batch) + sum(len(b) for b in self._failed)

    async def flush(self) -> int:
        """Write what is queued, one transaction per batch. Shielded: a caller cancelled while SQLite
        commits (the writer task at shutdown) must not requeue committed rows, to be billed twice."""
        return await asyncio.shield(self._flush())

    async def _flush(self) -> int:
        self.write_access_log()
        async with self.lock:
            if len(self._batch):
                self._failed.append(self._batch)
                self._batch = UsageBatch()
            done = 0
            while self._failed:
                batch = self._failed[0]
                debits = await self.store.write_batch(batch)  # on failure the batch stays queued
                self._failed.pop(0)
                self.wallets.committed(debits)
                self.written += len(batch)
                done += len(batch)
            return done

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception as exc:
                self.failures += 1
                log.error("cannot write the usage log (will retry, %d rows waiting): %s", self.queued, exc)

    async def close(self) -> None:
        """Flush everything (a graceful stop); retried a few times if the database is busy."""
        for attempt in range(5):
            try:
                await self.flush()
                return
            except Exception as exc:
                log.error("usage log flush failed (attempt %d): %s", attempt + 1, exc)
                await asyncio.sleep(0.2)

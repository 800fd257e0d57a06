"""The usage log writer: request rows and their debits, batched off the request path.

``record`` never awaits (a cancelled handler can always call it). A background task commits the
queue every ``interval`` seconds in ONE transaction per batch (rows + debits + daily aggregate), then
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

from .billing import Wallets
from .store import Store, UsageRow

log = logging.getLogger("lumen_proxy")


def _log_fields(row: UsageRow, account: str, prompt: Any) -> dict[str, Any]:
    fields = {
        "time": round(row.time, 3), "request_id": row.request_id, "account": account,
        "key_id": row.key_id, "model": row.model, "endpoint": row.endpoint, "backend": row.backend,
        "status": row.status, "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens, "cost": row.cost / 1_000_000,
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
        self._queue: list[UsageRow] = []
        self._log_queue: list[tuple[UsageRow, str, Any]] = []
        self.written = 0
        self.failures = 0

    def record(self, row: UsageRow, account_name: str, *, prompt: Any = None) -> None:
        self._queue.append(row)
        if self.access_log is not None:
            self._log_queue.append((row, account_name, prompt))

    def write_access_log(self) -> None:
        """One JSON line per request, written a batch at a time (one write call, off the request path).

        Never the key; the prompt only when ``log_prompts`` is on; never the completion.
        """
        if self.access_log is None or not self._log_queue:
            return
        entries, self._log_queue = self._log_queue, []
        lines = [orjson.dumps(_log_fields(row, account, prompt), default=str) for row, account, prompt in entries]
        try:
            self.access_log.write(b"\n".join(lines).decode() + "\n")
            self.access_log.flush()
        except (OSError, ValueError):  # a closed stdout must not fail anything
            pass

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def flush(self) -> int:
        """Write the queue in one transaction. Shielded: a caller cancelled while SQLite commits (the
        writer task at shutdown) must not put committed rows back in the queue, to be billed twice."""
        return await asyncio.shield(self._flush())

    async def _flush(self) -> int:
        self.write_access_log()
        async with self.lock:
            if not self._queue:
                return 0
            batch, self._queue = self._queue, []
            try:
                debits = await self.store.write_usage(batch)
            except BaseException:
                self._queue[:0] = batch  # keep them for the next try, in order
                raise
            self.wallets.committed(debits)
            self.written += len(batch)
            return len(batch)

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

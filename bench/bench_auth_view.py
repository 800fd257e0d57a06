"""Why keys and accounts are served from memory: the in-memory view against a SQLite query per request.

    python bench/bench_auth_view.py

Builds a database with 1,000 accounts and 5,000 keys, then times, in one run:
- ``view``: ``AccessView.authenticate`` (SHA-256 of the key + two dict lookups), what the server does;
- ``sqlite``: the same lookup as one aiosqlite query per request (what the view avoids);
- ``poll``: one ``PRAGMA data_version`` (``SqliteStore.generation``) through aiosqlite, which the
  server runs every 0.25 s to notice admin changes (so its cost is per quarter second, not per request).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lumen_proxy.auth import AccessView  # noqa: E402
from lumen_proxy.billing import Wallets  # noqa: E402
from lumen_proxy.keys import hash_key  # noqa: E402
from lumen_proxy.sqlite_store import SqliteStore  # noqa: E402

ACCOUNTS, KEYS_PER_ACCOUNT, ROUNDS = 1000, 5, 20_000


async def per_call_us(fn: object, rounds: int) -> float:
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            result = fn()  # type: ignore[operator]
            if asyncio.iscoroutine(result):
                await result
        samples.append((time.perf_counter() - start) / rounds * 1e6)
    return statistics.median(samples)


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = await SqliteStore.open(Path(tmp) / "lumen.db")
        keys = []
        for a in range(ACCOUNTS):
            await store.add_account(f"acct{a:04d}", 1_000_000)
            for _ in range(KEYS_PER_ACCOUNT):
                key, _row = await store.create_key(f"acct{a:04d}")
                keys.append(key)
        view = AccessView(store, Wallets(), asyncio.Lock())
        await view.reload()
        header = f"Bearer {keys[len(keys) // 2]}"
        key = keys[len(keys) // 2]

        async def sqlite_lookup() -> None:
            async with store.conn.execute(
                "SELECT k.id, k.expires_at, a.enabled, a.models FROM keys k JOIN accounts a ON a.id = k.account_id"
                " WHERE k.hash = ? AND k.revoked_at IS NULL", (hash_key(key),)
            ) as cur:
                await cur.fetchone()

        view_us = await per_call_us(lambda: view.authenticate(header), ROUNDS)
        sqlite_us = await per_call_us(sqlite_lookup, ROUNDS // 10)
        poll_us = await per_call_us(store.generation, ROUNDS // 10)
        await store.close()
    print(f"{len(keys):,} keys in {ACCOUNTS:,} accounts")
    print("| lookup | per call (µs) |\n|---|---|")
    print(f"| in-memory view (`AccessView.authenticate`) | {view_us:.2f} |")
    print(f"| one aiosqlite query per request | {sqlite_us:.1f} |")
    print(f"| `PRAGMA data_version` poll (every 0.25 s, not per request) | {poll_us:.1f} |")


if __name__ == "__main__":
    asyncio.run(main())

"""The portal's Usage page for an account with a year of heavy use: does it render in under 300 ms?

    python bench/bench_usage_page.py [--rows-per-day 3000]

Builds a database where one account made ``--rows-per-day`` requests every day for 365 days, over
3 models and 4 keys (1.1 million usage rows and their daily totals at the default), beside 200 other
accounts' lighter traffic, then times through the real app on a real port, signed in with a session
cookie as a browser is:
- ``GET /usage`` (30 days, the default), ``/usage?days=90``, ``/keys`` and ``/usage/live.json``;
- ``GET /usage.csv?days=7`` (every request of a week, streamed).
Each figure is the median and the worst of 15 requests after one warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lumen_proxy.app import create_app  # noqa: E402
from lumen_proxy.config import parse_config  # noqa: E402
from lumen_proxy.portal.guard import COOKIE, PORTAL  # noqa: E402
from lumen_proxy.runtime import RUNTIME  # noqa: E402
from lumen_proxy.sqlite_store import SqliteStore  # noqa: E402

MODELS = ("gpt-4o", "llama-3.1-8b", "text-embedding-3-small")
DAY = 86400.0


def fill(path: Path, rows_per_day: int, now: float) -> None:
    """The heavy account (id 1) and 200 light ones, a year of usage rows and daily totals."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    rng = random.Random(7)
    with conn:
        conn.executemany("INSERT INTO accounts (name, created_at, balance) VALUES (?, ?, ?)",
                         [(f"user{i}", now - 400 * DAY, 10**9) for i in range(201)])
        conn.executemany("INSERT INTO keys (account_id, hash, prefix, label, created_at) VALUES (?, ?, ?, ?, ?)",
                         [(1 + i // 4 if i < 4 else i - 2, f"h{i}", f"sk_{i:05d}", f"key {i}", now - 400 * DAY)
                          for i in range(204)])
    for day in range(365, -1, -1):
        start = now - day * DAY
        rows, daily = [], {}
        for n in range(rows_per_day + 200):
            account = 1 if n < rows_per_day else 2 + n % 200
            key = 1 + n % 4 if account == 1 else account + 2
            model = MODELS[n % 3]
            t = start + rng.random() * (DAY - 1) if day else now - rng.random() * 3600
            p, c = rng.randint(50, 4000), rng.randint(0, 800)
            cost = p * 2 + c * 10
            rows.append((f"req_{day}_{n}", t, account, key, model, "b", "/v1/chat/completions", 200, p, c, cost,
                         0, 0, 900.0, 120.0))
            k = (time.strftime("%Y-%m-%d", time.gmtime(t)), account, model, key)
            d = daily.setdefault(k, [0, 0, 0, 0])
            d[0] += 1
            d[1] += p
            d[2] += c
            d[3] += cost
        with conn:
            conn.executemany(
                "INSERT INTO usage (request_id, time, account_id, key_id, model, backend, endpoint, status,"
                " prompt_tokens, completion_tokens, cost, estimated, partial, duration_ms, ttfb_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.executemany(
                "INSERT INTO usage_daily (day, account_id, model, key_id, requests, errors, prompt_tokens,"
                " completion_tokens, cost) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?) ON CONFLICT DO UPDATE SET"
                " requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = completion_tokens + excluded.completion_tokens, cost = cost + excluded.cost",
                [(*k, *v[:3], v[3]) for k, v in daily.items()])
    conn.close()


async def timed(http: aiohttp.ClientSession, url: str, runs: int = 15) -> tuple[float, float, int]:
    async with http.get(url) as response:
        size = len(await response.read())
        assert response.status == 200, (url, response.status)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        async with http.get(url) as response:
            await response.read()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), max(samples), size


async def main(rows_per_day: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "lumen.db"
        store = await SqliteStore.open(db)  # migrated schema
        await store.close()
        began = time.perf_counter()
        fill(db, rows_per_day, time.time())
        count = sqlite3.connect(db).execute("SELECT count(*) FROM usage WHERE account_id = 1").fetchone()[0]
        print(f"database: {count:,} usage rows of the heavy account, {db.stat().st_size / 2**20:,.0f} MiB, "
              f"filled in {time.perf_counter() - began:.0f} s")
        config = parse_config({"database": str(db), "models": [
            {"name": m, "backends": [{"url": "builtin:echo"}], "price": {"prompt": 1, "completion": 1}}
            for m in MODELS]}, "bench", Path(tmp))
        app = create_app(config)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            sid, _ = await app[PORTAL].records.open_session(1, "link", 1)
            origin = f"http://127.0.0.1:{server.port}"
            async with aiohttp.ClientSession(cookies={COOKIE: sid}) as http:
                print(f"{'page':28} {'median ms':>10} {'worst ms':>9} {'bytes':>10}")
                for path in ("/usage", "/usage?days=90", "/keys", "/usage/live.json", "/usage.csv?days=7"):
                    median, worst, size = await timed(http, origin + path, runs=5 if "csv" in path else 15)
                    print(f"{path:28} {median:10.1f} {worst:9.1f} {size:10,}")
            assert app[RUNTIME].view is not None
        finally:
            await server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-per-day", type=int, default=3000)
    asyncio.run(main(parser.parse_args().rows_per_day))

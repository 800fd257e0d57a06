"""Does ``lumen-proxy usage`` answer well under a second over millions of usage rows?

Builds a scratch database with lumen's own migrations (through ``lumen-proxy accounts add``), fills it
directly with sqlite3 as a year of traffic would (2,000,000 ``usage`` rows by default, the matching
``usage_daily`` aggregate, balances debited), then times the report commands end to end: a new
process each time, so interpreter start-up and opening the database are included.

    python bench/bench_usage_report.py [--rows 2000000] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import targets

BENCH = Path(__file__).resolve().parent
README = BENCH / "README.md"
README_START, README_END = "<!-- usage-report:start -->", "<!-- usage-report:end -->"
MODELS = ("gpt-4o", "gpt-4o-mini", "o3-mini", "claude-sonnet", "llama-3.1-70b", "qwen2.5-72b")
PRICES = {m: (2_500_000, 10_000_000) for m in MODELS}  # micro-coins per million tokens
USAGE_COLUMNS = ("request_id", "time", "account_id", "key_id", "model", "backend", "endpoint", "status",
                 "prompt_tokens", "completion_tokens", "cost", "estimated", "partial", "duration_ms", "ttfb_ms")
LIMIT_S = 1.0


def require_schema(conn: sqlite3.Connection) -> None:
    """Fail clearly if lumen's schema moved away from what this script writes."""
    for table, needed in (("usage", USAGE_COLUMNS), ("usage_daily", ("day", "account_id", "model", "key_id",
                          "requests", "errors", "prompt_tokens", "completion_tokens", "cost"))):
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        missing = set(needed) - have
        if missing:
            sys.exit(f"lumen's {table} table has no column(s) {sorted(missing)}: update {Path(__file__).name}")


def add_accounts(conn: sqlite3.Connection, count: int, keys_per_account: int) -> list[tuple[int, int]]:
    """Accounts and keys as the admin CLI makes them; return (account_id, key_id) pairs."""
    now = time.time()
    with conn:
        for i in range(1, count):
            cur = conn.execute("INSERT INTO accounts (name, created_at, balance) VALUES (?, ?, ?)",
                               (f"acct{i:04d}", now, 10**12))
            conn.execute("INSERT INTO ledger (account_id, time, amount, note) VALUES (?, ?, ?, ?)",
                         (cur.lastrowid, now, 10**12, "initial coins"))
        accounts = [row[0] for row in conn.execute("SELECT id FROM accounts")]
        for account_id in accounts:
            for k in range(keys_per_account):
                digest = hashlib.sha256(f"{account_id}-{k}".encode()).hexdigest()
                conn.execute("INSERT INTO keys (account_id, hash, prefix, created_at) VALUES (?, ?, ?, ?)",
                             (account_id, digest, "sk_bench" + digest[:4], now))
    return [(row[0], row[1]) for row in conn.execute("SELECT account_id, id FROM keys")]


def usage_rows(count: int, days: int, pairs: list[tuple[int, int]]) -> Iterator[tuple[object, ...]]:
    """``count`` rows in time order over the last ``days`` days; about 2% errors."""
    rng = random.Random(42)
    end = time.time()
    start = end - days * 86400
    for i in range(count):
        account_id, key_id = rng.choice(pairs)
        model = rng.choice(MODELS)
        status = 200 if rng.random() > 0.02 else rng.choice((400, 429, 499, 502))
        prompt, completion = (rng.randint(10, 4000), rng.randint(1, 1000)) if status == 200 else (0, 0)
        price_prompt, price_completion = PRICES[model]
        cost = -(-(prompt * price_prompt + completion * price_completion) // 1_000_000)
        yield (f"req_{i:024x}", start + (end - start) * i / count, account_id, key_id, model,
               "http://127.0.0.1:8000/v1", "/v1/chat/completions", status, prompt, completion, cost, 0, 0,
               rng.uniform(50, 5000), rng.uniform(20, 500))


def fill(db: Path, rows: int, days: int, accounts: int, keys_per_account: int) -> int:
    """Insert the synthetic traffic; return the number of usage_daily rows it aggregates into."""
    with sqlite3.connect(db) as conn:
        require_schema(conn)
        pairs = add_accounts(conn, accounts, keys_per_account)
        placeholders = ", ".join("?" * len(USAGE_COLUMNS))
        conn.execute("BEGIN")
        conn.executemany(f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) VALUES ({placeholders})",
                         usage_rows(rows, days, pairs))
        # what the usage writer maintains row by row, in one statement
        conn.execute(
            "INSERT INTO usage_daily (day, account_id, model, key_id, requests, errors, prompt_tokens,"
            " completion_tokens, cost) SELECT strftime('%Y-%m-%d', time, 'unixepoch'), account_id, model,"
            " key_id, count(*), sum(status >= 400), sum(prompt_tokens), sum(completion_tokens), sum(cost)"
            " FROM usage GROUP BY 1, 2, 3, 4")
        conn.execute("UPDATE accounts SET balance = balance - coalesce((SELECT sum(cost) FROM usage"
                     " WHERE usage.account_id = accounts.id), 0)")
        conn.commit()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(conn.execute("SELECT count(*) FROM usage_daily").fetchone()[0])


def timed(config: Path, args: list[str], repeat: int) -> tuple[list[float], int]:
    """Wall-clock seconds of ``repeat`` runs, and how many rows the last one printed."""
    times, lines = [], 0
    for _ in range(repeat):
        began = time.perf_counter()
        done = subprocess.run([*targets.lumen_argv(), "--config", str(config), *args], capture_output=True,
                              text=True, cwd=config.parent, timeout=120)
        times.append(time.perf_counter() - began)
        if done.returncode != 0:
            sys.exit(f"lumen-proxy {' '.join(args)} failed:\n{done.stderr[-2000:]}")
        lines = _rows(done.stdout)
    return times, lines


def _rows(output: str) -> int:
    """Rows in a JSON report (a list, or the first list inside an object); else output lines."""
    try:
        data = json.loads(output)
    except ValueError:
        return len(output.splitlines())
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    return len(data) if isinstance(data, list) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--keys-per-account", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="lumen-usage-bench-"))
    try:
        config = workdir / "lumen.yaml"
        config.write_text(targets.LUMEN_CONFIG.format(port=8080, upstream="http://127.0.0.1:9"))
        targets.lumen_admin(config, "accounts", "add", "acct0000", "--coins", "1000000")
        began = time.perf_counter()
        daily = fill(workdir / "lumen.db", args.rows, args.days, args.accounts, args.keys_per_account)
        filled = time.perf_counter() - began
        size = (workdir / "lumen.db").stat().st_size / 2**20
        print(f"filled {args.rows:,} usage rows ({daily:,} daily aggregates, {size:.0f} MiB) in {filled:.0f}s",
              file=sys.stderr)
        commands = [
            ("`--version` (start-up only)", ["--version"]),
            ("`usage --json` (by day)", ["usage", "--json"]),
            ("`usage --json --by model`", ["usage", "--json", "--by", "model"]),
            ("`usage --json --by account`", ["usage", "--json", "--by", "account"]),
            ("`usage --json --by key`", ["usage", "--json", "--by", "key"]),
            ("`usage acct0001 --json --by model`", ["usage", "acct0001", "--json", "--by", "model"]),
        ]
        lines = [
            f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; {args.rows:,} usage rows over {args.days} days, "
            f"{args.accounts} accounts × {args.keys_per_account} keys, {len(MODELS)} models "
            f"→ {daily:,} usage_daily rows; database {size:.0f} MiB",
            f"- wall time of a fresh `lumen-proxy` process, best and worst of {args.repeat}; target < {LIMIT_S:.0f} s",
            "",
            "| command | rows out | best (s) | worst (s) | median (s) | < 1 s? |",
            "|---|---|---|---|---|---|",
        ]
        for label, command in commands:
            times, count = timed(config, command, args.repeat)
            verdict = "yes" if max(times) < LIMIT_S else "**no**"
            lines.append(f"| {label} | {count} | {min(times):.3f} | {max(times):.3f} | "
                         f"{statistics.median(times):.3f} | {verdict} |")
    finally:
        if args.keep:
            print(f"scratch database kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    markdown = "\n".join(lines)
    print(markdown)
    text = README.read_text() if README.exists() else ""
    start, end = text.find(README_START), text.find(README_END)
    if not args.no_readme and start >= 0 and end >= 0:
        README.write_text(text[:start + len(README_START)] + "\n" + markdown + "\n" + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())

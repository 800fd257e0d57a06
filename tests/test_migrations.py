"""The schema is built by append-only migrations; opening a database brings it up to date.

An older database (made here with plain ``sqlite3`` from the first migrations only) is upgraded with
its data kept; a newer one is refused with one clear line; a failing migration changes nothing.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from lumen_proxy import sqlite_store
from lumen_proxy.keys import hash_key, new_key, visible_prefix
from lumen_proxy.migrations import MIGRATIONS, SCHEMA_VERSION
from lumen_proxy.sqlite_store import SqliteStore
from lumen_proxy.store import StoreError
from tests.conftest import MakeProxy, build_config, cli, config_dict, write_config
from tests.fake_upstream import UpstreamServer

COLUMNS = {
    "accounts": {"id", "name", "models", "enabled", "created_at", "balance", "rpm", "tpm", "concurrency",
                 "group_name", "allowance", "allowance_start", "email"},
    "keys": {"id", "account_id", "hash", "prefix", "label", "created_at", "last_used_at", "expires_at",
             "revoked_at", "delegate"},
    "ledger": {"id", "account_id", "time", "amount", "note"},
    "usage": {"id", "request_id", "time", "account_id", "key_id", "model", "backend", "endpoint", "status",
              "prompt_tokens", "completion_tokens", "cost", "estimated", "partial", "capped", "duration_ms",
              "ttfb_ms", "details"},
    "usage_daily": {"day", "account_id", "model", "key_id", "requests", "errors", "prompt_tokens",
                    "completion_tokens", "cost"},
    "heartbeat": {"id", "pid", "time"},
    "sessions": {"hash", "account_id", "csrf", "method", "created_at", "expires_at"},
    "login_links": {"hash", "account_id", "created_at", "expires_at", "used_at"},
    "migrations": {"name", "applied_at"},
}


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def schema(path: Path) -> dict[str, set[str]]:
    with sqlite3.connect(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")} for t in tables}


def old_database(path: Path, version: int, key: str) -> None:
    """A database as lumen-proxy left it after the first ``version`` migrations, with some data."""
    with sqlite3.connect(path) as conn:
        for _name, sql in MIGRATIONS[:version]:
            conn.executescript(sql)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("INSERT INTO accounts (name, models, enabled, created_at) VALUES (?, ?, 1, 1700000000)",
                     ("old", json.dumps(["echo"])))
        conn.execute("INSERT INTO keys (account_id, hash, prefix, label, created_at) VALUES (1, ?, ?, 'kept', 1)",
                     (hash_key(key), visible_prefix(key)))
        if version >= 2:
            conn.execute("UPDATE accounts SET balance = 7000000 WHERE id = 1")
            conn.execute("INSERT INTO ledger (account_id, time, amount, note) VALUES (1, 1, 7000000, 'start')")


def test_migration_names_are_numbered_in_order() -> None:
    names = [name for name, _sql in MIGRATIONS]
    assert [name[:4] for name in names] == [f"m{i:03d}" for i in range(1, len(names) + 1)]
    assert all(re.fullmatch(r"m\d{3}_[a-z0-9_]+", name) for name in names)
    assert SCHEMA_VERSION == len(MIGRATIONS)


async def test_empty_database_gets_the_whole_schema(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    store = await SqliteStore.open(path)
    await store.close()
    assert user_version(path) == SCHEMA_VERSION
    tables = schema(path)
    assert set(tables) == set(COLUMNS)
    for table, columns in COLUMNS.items():
        assert tables[table] == columns, table
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"keys_account", "ledger_account", "usage_time", "usage_request", "usage_account_time",
            "accounts_email", "sessions_account"} <= indexes


async def test_reopening_a_current_database_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "lumen.db"
    store = await SqliteStore.open(path)
    await store.add_account("alice", 5)
    await store.close()
    with sqlite3.connect(path) as conn:
        before = list(conn.iterdump())
    store = await SqliteStore.open(path)
    await store.close()
    with sqlite3.connect(path) as conn:
        assert list(conn.iterdump()) == before


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
async def test_older_database_is_upgraded_with_its_data(tmp_path: Path, version: int) -> None:
    path = tmp_path / "old.db"
    key = new_key()
    old_database(path, version, key)
    store = await SqliteStore.open(path)
    try:
        account = await store.account("old")
        found = await store.find_key(key)
    finally:
        await store.close()
    assert user_version(path) == SCHEMA_VERSION
    assert schema(path) == COLUMNS
    assert (account.models, account.enabled, account.balance) == (("echo",), True, 7000000 if version >= 2 else 0)
    assert (found.account_id, found.label) == (account.id, "kept")


async def test_usage_rows_written_before_m006_read_as_not_capped(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old_database(path, 5, new_key())
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO usage (request_id, time, account_id, key_id, model, status, prompt_tokens)"
                     " VALUES ('req_before', 1, 1, 1, 'echo', 200, 7)")
    store = await SqliteStore.open(path)
    try:
        [row] = await store.usage_rows("req_before")
    finally:
        await store.close()
    assert (row["prompt_tokens"], row["capped"]) == (7, 0)
    assert MIGRATIONS[5][0] == "m006_usage_capped"


async def test_upgraded_database_serves_its_old_key(
        tmp_path: Path, make_proxy: MakeProxy, upstream: UpstreamServer) -> None:
    key = new_key()
    old_database(tmp_path / "lumen.db", 1, key)
    config_file = write_config(tmp_path, config_dict(tmp_path, [upstream.base_url]))
    shown = cli("accounts", "show", "old", "--json", config=config_file)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["coins"] == 0
    assert user_version(tmp_path / "lumen.db") == SCHEMA_VERSION
    proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url])))
    await proxy.rt.store.add_coins("old", 1_000_000)
    await proxy.rt.view.reload()
    reply = await proxy.sdk(key).chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "still here"}])
    assert reply.choices[0].message.content is not None and "still here" in reply.choices[0].message.content


async def test_newer_database_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "lumen.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 999")
    config_file = write_config(tmp_path, config_dict(tmp_path, ["http://127.0.0.1:9/v1"]))
    done = cli("accounts", "list", config=config_file)
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1
    assert "999" in done.stderr and "newer" in done.stderr
    assert user_version(path) == 999
    assert schema(path) == {}
    with pytest.raises(StoreError, match="newer"):
        await SqliteStore.open(path)


async def test_failing_migration_leaves_the_database_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lumen.db"
    store = await SqliteStore.open(path)
    await store.add_account("alice", 5)
    await store.close()
    broken = ("m999_broken", "CREATE TABLE half_done (x INTEGER);\nINSERT INTO no_such_table VALUES (1)")
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", (*MIGRATIONS, broken))
    with pytest.raises(StoreError, match="no_such_table"):
        await SqliteStore.open(path)
    assert user_version(path) == SCHEMA_VERSION
    assert "half_done" not in schema(path)

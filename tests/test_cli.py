"""The admin CLI as an admin uses it: ``python -m lumen_proxy`` on the database the config names.

Keys are shown once (alone on stdout) and stored nowhere in full; bad input, or a database another
connection keeps locked, prints one line on stderr, exits 1 or 2, and leaves the database
byte-for-byte as it was (compared as a SQL dump).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import pytest

from lumen_proxy.sqlite_store import SqliteStore
from lumen_proxy.store import BUSY_TIMEOUT
from tests.conftest import cli, config_dict, write_config

KEY = re.compile(r"sk_[A-Za-z0-9]{32,}")


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path, config_dict(tmp_path, ["http://127.0.0.1:9/v1"]))


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "lumen.db"


def run(config_file: Path, *args: str) -> str:
    done = cli(*args, config=config_file)
    assert done.returncode == 0, done.stderr
    return done.stdout


def dump(database: Path) -> list[str]:
    with sqlite3.connect(database) as conn:
        return list(conn.iterdump())


def stored_bytes(database: Path) -> bytes:
    """The database file and its WAL: everything SQLite keeps on disk."""
    return b"".join(p.read_bytes() for p in (database, Path(f"{database}-wal")) if p.exists())


@pytest.fixture
async def alice_db(database: Path) -> Path:
    """A database with the account alice (10 coins, all models) and one key, made in-process (fast)."""
    store = await SqliteStore.open(database)
    try:
        await store.add_account("alice", 10_000_000)
        await store.create_key("alice", "laptop")
    finally:
        await store.close()
    return database


def test_keys_create_prints_the_key_alone(config_file: Path, database: Path) -> None:
    run(config_file, "accounts", "add", "alice")
    done = cli("keys", "create", "alice", "--label", "laptop", "--expires", "2099-01-01", config=config_file)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1
    key = done.stdout.strip()
    assert KEY.fullmatch(key)
    assert key not in done.stderr
    [listed] = json.loads(run(config_file, "keys", "list", "--json"))
    assert (listed["label"], listed["expires"], listed["prefix"]) == ("laptop", "2099-01-01T00:00:00+00:00", key[:8])


def test_no_full_key_is_listed_or_stored(config_file: Path, database: Path) -> None:
    run(config_file, "accounts", "add", "alice", "--coins", "5")
    keys = [run(config_file, "keys", "create", "alice").strip() for _ in range(2)]
    keys.append(json.loads(run(config_file, "keys", "create", "alice", "--json"))["key"])
    listings = "".join(run(config_file, *args) for args in (
        ("accounts", "list", "--json"), ("keys", "list", "--json"), ("keys", "list"),
        ("accounts", "show", "alice", "--json"),
    ))
    dumped = "\n".join(dump(database))
    raw = stored_bytes(database)
    for key in keys:
        assert key not in listings
        assert key not in dumped
        assert key.encode() not in raw and key[8:].encode() not in raw
    assert KEY.search(listings) is None and KEY.search(dumped) is None
    assert [k["prefix"] for k in json.loads(run(config_file, "keys", "list", "--json"))] == [k[:8] for k in keys]


def test_accounts_show_json_includes_coins(config_file: Path) -> None:
    run(config_file, "accounts", "add", "alice", "--coins", "12.5", "--models", "gpt-4o,echo")
    shown = json.loads(run(config_file, "accounts", "show", "alice", "--json"))
    assert shown["coins"] == 12.5
    assert shown["models"] == ["echo", "gpt-4o"]
    assert shown["enabled"] is True
    listed = json.loads(run(config_file, "accounts", "list", "--json"))
    assert [(a["name"], a["coins"]) for a in listed] == [("alice", 12.5)]


def test_keys_revoke_takes_the_full_key_or_its_id(config_file: Path, alice_db: Path) -> None:
    key = run(config_file, "keys", "create", "alice").strip()
    by_key = json.loads(run(config_file, "keys", "revoke", key, "--json"))
    assert by_key["revoked"] is not None
    assert key not in json.dumps(by_key)
    other = json.loads(run(config_file, "keys", "list", "alice", "--json"))[0]
    assert other["revoked"] is None
    run(config_file, "keys", "revoke", str(other["id"]))
    assert all(k["revoked"] for k in json.loads(run(config_file, "keys", "list", "--json")))


BAD_INPUT = {
    "duplicate account": ("accounts", "add", "alice"),
    "unknown model in --models": ("accounts", "add", "bob", "--models", "gpt-4o,gpt-9"),
    "coins not a number": ("accounts", "add", "bob", "--coins", "ten"),
    "negative starting coins": ("accounts", "add", "bob", "--coins", "-5"),
    "coins below a micro-coin": ("accounts", "add", "bob", "--coins", "1.0000001"),
    "key for unknown account": ("keys", "create", "nobody"),
    "unparseable --expires": ("keys", "create", "alice", "--expires", "next tuesday"),
    "--expires in the past": ("keys", "create", "alice", "--expires", "2001-01-01"),
    "revoke unknown key": ("keys", "revoke", "sk_" + "x" * 40),
    "revoke unknown id": ("keys", "revoke", "999"),
    "revoke neither key nor id": ("keys", "revoke", "laptop"),
    "coins for unknown account": ("coins", "add", "nobody", "5"),
    "bad coins amount": ("coins", "add", "alice", "5 coins"),
    "infinite coins": ("coins", "add", "alice", "Infinity"),
    "NaN coins": ("accounts", "add", "bob", "--coins", "NaN"),
    "coins beyond a 64-bit balance": ("coins", "add", "alice", "1e30"),
    "unknown model in set-models": ("accounts", "set-models", "alice", "gpt-9"),
    "disable unknown account": ("accounts", "disable", "nobody"),
    "bad limit": ("accounts", "set-limits", "alice", "--rpm", "fast"),
    "usage of unknown account": ("usage", "nobody"),
    "prune with a bad date": ("usage", "prune", "--before", "last spring"),
}


@pytest.mark.parametrize("args", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_changes_nothing(config_file: Path, alice_db: Path, args: tuple[str, ...]) -> None:
    before = dump(alice_db)
    done = cli(*args, config=config_file)
    assert done.returncode in (1, 2)
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("lumen-proxy: ")
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert dump(alice_db) == before


def test_unreadable_config_is_one_line_exit_2(tmp_path: Path) -> None:
    done = cli("accounts", "list", config=tmp_path / "missing.yaml")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "missing.yaml" in done.stderr


def test_a_locked_database_gives_a_bounded_wait_then_one_line(config_file: Path, alice_db: Path) -> None:
    """Another connection holds the write lock (a long transaction, an admin's sqlite3 shell): a write
    waits the busy timeout, then fails with one line; reads are not held up (WAL)."""
    before = dump(alice_db)
    locker = sqlite3.connect(alice_db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        done = cli("coins", "add", "alice", "5", config=config_file)
        waited = time.monotonic() - started
        listed = cli("accounts", "list", "--json", config=config_file)
    finally:
        locker.rollback()
        locker.close()
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"lumen-proxy: cannot write the database {alice_db}: another connection held its write lock for over "
        f"{BUSY_TIMEOUT:g} s (a long transaction, an open sqlite3 shell?); try again"]
    assert done.stdout == ""
    assert BUSY_TIMEOUT <= waited < BUSY_TIMEOUT + 5
    assert listed.returncode == 0 and [a["coins"] for a in json.loads(listed.stdout)] == [10]
    assert dump(alice_db) == before

"""Groups through the admin CLI, as an admin uses it: accounts join groups (``accounts add --group``,
``set-group``, ``import``), get coins by group, hold at most ``max_keys`` keys, and ``groups list/show``
report them. An import is all or nothing: every bad line is named, and a bad file changes nothing
(compared as a SQL dump); a good one, run twice, changes nothing the second time.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import openai
import pytest

from lumen_proxy.periods import next_start, period_start
from lumen_proxy.sqlite_store import SqliteStore
from lumen_proxy.store import UsageRow
from tests.conftest import (
    MakeProxy,
    admin,
    build_config,
    cli,
    config_dict,
    eventually,
    query,
    write_config,
)
from tests.fake_upstream import UpstreamServer
from tests.test_cli import run

BERLIN = ZoneInfo("Europe/Berlin")
GROUPS = [
    {"name": "students", "models": ["gpt-4o", "echo"], "limits": {"rpm": 20, "tpm": 40000, "concurrency": 2},
     "allowance": {"coins": 100, "every": "month"}, "max_keys": 2},
    {"name": "staff", "limits": {"rpm": 120}},
]


def groups_dict(tmp_path: Path, backend: str = "http://127.0.0.1:9/v1") -> dict[str, Any]:
    return config_dict(tmp_path, [backend], timezone="Europe/Berlin", default_group="students", groups=GROUPS)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path, groups_dict(tmp_path))


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "lumen.db"


def run_json(config_file: Path, *args: str) -> Any:
    return json.loads(run(config_file, *args, "--json"))


def refused(config_file: Path, *args: str, code: int = 2) -> str:
    """Run a command that must fail: one exit code, lines on stderr only; returns stderr."""
    done = cli(*args, config=config_file)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    return done.stderr


def dump(database: Path) -> list[str]:
    with sqlite3.connect(database) as conn:
        return list(conn.iterdump())


def write_csv(path: Path, lines: list[str], *, bom: bool = False, crlf: bool = False) -> Path:
    text = ("\r\n" if crlf else "\n").join(lines) + ("\r\n" if crlf else "\n")
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


def roster(count: int) -> list[str]:
    """A header and ``count`` accounts: every fifth in staff, the others in the default group (empty cell);
    coins 0, 1 or 2; every seventh with its own models."""
    return ["name,group,coins,models"] + [
        f"user{i:04d},{'staff' if i % 5 == 0 else ''},{i % 3},{'gpt-4o;echo' if i % 7 == 0 else ''}"
        for i in range(count)
    ]


def group_counts(database: Path) -> dict[str | None, int]:
    return {r[0]: r[1] for r in query(database, "SELECT group_name, count(*) FROM accounts GROUP BY group_name")}


# -- accounts add, set-group, list, show ---------------------------------------------------------------
def test_accounts_add_joins_the_default_group(config_file: Path, database: Path) -> None:
    out = run(config_file, "accounts", "add", "alice")
    assert "in group students" in out and "allowance of 100 coins a month" in out
    run(config_file, "accounts", "add", "bob", "--group", "staff", "--coins", "5")
    alice = run_json(config_file, "accounts", "show", "alice")
    assert alice["group"] == "students"
    assert alice["coins"] == 0
    assert alice["models"] == ["gpt-4o", "echo"]  # the group's
    refills = next_start(time.time(), "month", BERLIN)  # next month's first midnight in Berlin
    assert alice["allowance"] == {"coins": 100, "left": 0, "every": "month", "granted": False,
                                  "resets_at": datetime.fromtimestamp(refills, BERLIN).isoformat()}
    bob = run_json(config_file, "accounts", "show", "bob")
    assert (bob["group"], bob["allowance"], bob["coins"]) == ("staff", None, 5)
    show = run(config_file, "accounts", "show", "alice")
    assert "group    students, allowance 100 coins a month" in show
    assert "Europe/Berlin" in show


def test_accounts_add_to_an_unknown_group_names_the_groups(config_file: Path, database: Path) -> None:
    run(config_file, "accounts", "add", "alice")
    before = dump(database)
    err = refused(config_file, "accounts", "add", "bob", "--group", "teachers")
    assert err.splitlines() == [f"lumen-proxy: no group named 'teachers' (groups in {config_file}: students, staff)"]
    assert dump(database) == before


@pytest.mark.parametrize("name", ["=cmd()", "+1", "-x", "@SUM(A1)", "new\nline", "esc\x1b[2J", " alice", "",
                                  "a" * 65, "ali ce", "müller"])
def test_accounts_add_refuses_a_name_outside_the_rules(config_file: Path, database: Path, name: str) -> None:
    run(config_file, "accounts", "add", "alice")
    before = dump(database)
    err = refused(config_file, "accounts", "add", "--", name)
    assert len(err.splitlines()) == 1 and "invalid account name" in err
    assert "\x1b" not in err
    assert dump(database) == before


def test_set_group_moves_an_account_to_staff_and_out(config_file: Path, database: Path) -> None:
    for name in ("alice", "bob"):
        run(config_file, "accounts", "add", name)
    out = run(config_file, "accounts", "set-group", "alice", "staff")
    assert out.strip() == "account alice moved to group staff"
    assert run_json(config_file, "accounts", "show", "alice")["group"] == "staff"
    assert [a["name"] for a in run_json(config_file, "accounts", "list", "--group", "staff")] == ["alice"]
    assert [a["name"] for a in run_json(config_file, "accounts", "list", "--group", "students")] == ["bob"]
    back = run(config_file, "accounts", "set-group", "alice", "students")
    assert "allowance of 100 coins a month starts within a second" in back
    assert query(database, "SELECT allowance_start FROM accounts WHERE name = 'alice'")[0][0] is None
    assert run(config_file, "accounts", "set-group", "alice", "--none").startswith("account alice is in no group")
    assert group_counts(database) == {None: 1, "students": 1}
    before = dump(database)
    assert "give a GROUP, or --none" in refused(config_file, "accounts", "set-group", "alice")
    assert "give a GROUP, or --none" in refused(config_file, "accounts", "set-group", "alice", "staff", "--none")
    assert "no group named 'teachers'" in refused(config_file, "accounts", "set-group", "alice", "teachers")
    assert "no account named 'nobody'" in refused(config_file, "accounts", "set-group", "nobody", "staff", code=1)
    assert "no group named 'teachers'" in refused(config_file, "accounts", "list", "--group", "teachers")
    assert dump(database) == before


def test_accounts_list_shows_group_and_allowance_left(config_file: Path, database: Path) -> None:
    run(config_file, "accounts", "add", "alice")
    run(config_file, "accounts", "add", "bob", "--group", "staff")
    with sqlite3.connect(database) as conn:  # as the server leaves it after granting and some spending
        conn.execute("UPDATE accounts SET allowance = 42500000, allowance_start = ? WHERE name = 'alice'",
                     (time.time() - 1,))
    listed = {a["name"]: a for a in run_json(config_file, "accounts", "list")}
    assert listed["alice"]["group"] == "students"
    assert (listed["alice"]["allowance"]["left"], listed["alice"]["allowance"]["granted"]) == (42.5, True)
    assert (listed["bob"]["group"], listed["bob"]["allowance"]) == ("staff", None)
    table = run(config_file, "accounts", "list").splitlines()
    assert table[0].split()[:4] == ["NAME", "GROUP", "ALLOWANCE", "LEFT"]
    assert table[1].split()[:3] == ["alice", "students", "42.5"]
    assert table[2].split()[:3] == ["bob", "staff", "-"]


# -- accounts import ---------------------------------------------------------------------------------------
def test_import_500_accounts_then_again_changes_nothing(config_file: Path, database: Path, tmp_path: Path) -> None:
    csv_file = write_csv(tmp_path / "roster.csv", roster(500), bom=True, crlf=True)
    out = run(config_file, "accounts", "import", str(csv_file))
    assert out.startswith(f"{csv_file}: 500 created, 0 changed, 0 unchanged")
    assert group_counts(database) == {"students": 400, "staff": 100}
    user7 = run_json(config_file, "accounts", "show", "user0007")
    assert (user7["group"], user7["coins"], user7["models"]) == ("students", 1, ["echo", "gpt-4o"])
    assert run_json(config_file, "accounts", "show", "user0005")["group"] == "staff"
    [(ledger, balances)] = query(database, "SELECT (SELECT sum(amount) FROM ledger), (SELECT sum(balance) "
                                           "FROM accounts)")
    assert ledger == balances == sum(i % 3 for i in range(500)) * 1_000_000
    before = dump(database)
    again = run(config_file, "accounts", "import", str(csv_file))
    assert again.startswith(f"{csv_file}: 0 created, 0 changed, 500 unchanged")
    assert dump(database) == before


def test_import_with_bad_lines_names_them_all_and_imports_nothing(
        config_file: Path, database: Path, tmp_path: Path) -> None:
    run(config_file, "accounts", "add", "alice")
    lines = roster(500)
    lines[10] = "user0009,teachers,1,"     # line 11: unknown group
    lines[250] = "user0249,staff,ten,"     # line 251: bad coins
    lines[500] = "user0499,,1,gpt-4o;gpt-9"  # line 501: unknown model
    csv_file = write_csv(tmp_path / "bad.csv", lines)
    before = dump(database)
    err = refused(config_file, "accounts", "import", str(csv_file))
    assert err.splitlines() == [
        f"lumen-proxy: {csv_file}:11: no group named 'teachers' (groups in {config_file}: students, staff)",
        f"lumen-proxy: {csv_file}:251: invalid coin amount 'ten': give a number like 10 or 2.5",
        f"lumen-proxy: {csv_file}:501: unknown model(s) 'gpt-9' (models in {config_file}: gpt-4o, "
        "text-embedding-3-small, echo)",
        f"lumen-proxy: {csv_file}: 3 bad line(s), nothing imported",
    ]
    assert dump(database) == before


def test_import_dry_run_writes_nothing(config_file: Path, database: Path, tmp_path: Path) -> None:
    run(config_file, "accounts", "add", "user0001", "--group", "staff")
    csv_file = write_csv(tmp_path / "roster.csv", roster(4))
    before = dump(database)
    out = run(config_file, "accounts", "import", str(csv_file), "--dry-run").splitlines()
    assert out == ["create user0000 in staff with 0 coins, models gpt-4o,echo",
                   "change user0001: group staff -> students",
                   "create user0002 in students with 2 coins",
                   "create user0003 in students with 0 coins",
                   "dry run, nothing written: 3 to create, 1 to change, 0 unchanged"]
    plan = run_json(config_file, "accounts", "import", str(csv_file), "--dry-run")
    assert plan == {"dry_run": True, "created": ["user0000", "user0002", "user0003"], "changed": ["user0001"],
                    "unchanged": []}
    assert dump(database) == before
    assert run_json(config_file, "accounts", "import", str(csv_file))["dry_run"] is False
    assert group_counts(database) == {"students": 3, "staff": 1}


def test_import_fields_quoted_in_any_column_order(config_file: Path, database: Path, tmp_path: Path) -> None:
    csv_file = write_csv(tmp_path / "roster.csv", [
        "Group,Name,Models", 'staff,"carol","gpt-4o echo"', '"",dave,', 'staff,"e.ve+x@uni.example",'])
    run(config_file, "accounts", "import", str(csv_file))
    listed = {a["name"]: (a["group"], a["models"]) for a in run_json(config_file, "accounts", "list")}
    assert listed == {"carol": ("staff", ["echo", "gpt-4o"]), "dave": ("students", ["gpt-4o", "echo"]),
                      "e.ve+x@uni.example": ("staff", "all")}


def test_import_refuses_hostile_input_line_by_line(config_file: Path, database: Path, tmp_path: Path) -> None:
    lines = [
        "name,group,coins,models",
        "ok1,staff,1,",
        "big,staff,1," + "x" * 10_000_000,   # line 3: a 10 MB line
        "=cmd(),staff,1,",                   # line 4: a formula
        '"new',                              # line 5: a quoted name with a newline in it...
        'line",staff,1,',                    # ...which runs to line 6
        "esc\x1b[2J,staff,1,",               # line 7: a terminal escape
        "nul\x00x,staff,1,",                 # line 8
        '"a""b",staff,1,',                   # line 9: a quote in the name
        "ok2,staff,1,,surplus",              # line 10: a cell more than the header
        "ok1,staff,2,",                      # line 11: a name twice
        '"unterminated,staff,1,',            # line 12: a quote never closed
    ]
    csv_file = write_csv(tmp_path / "hostile.csv", lines)
    run(config_file, "accounts", "add", "alice")
    before = dump(database)
    err = refused(config_file, "accounts", "import", str(csv_file)).splitlines()
    assert [line.split(":")[2] for line in err[:-1]] == ["3", "4", "5", "7", "8", "9", "10", "11", "12"]
    assert err[0].endswith("3: not valid CSV (a cell over 131072 characters)")
    assert "invalid account name '=cmd()'" in err[1]
    assert "invalid account name 'new\\nline'" in err[2]
    assert "'esc\\x1b[2J'" in err[3] and "\x1b" not in "".join(err)
    assert err[-1] == f"lumen-proxy: {csv_file}: 9 bad line(s), nothing imported"
    assert max(len(line) for line in err) < 300
    assert dump(database) == before


@pytest.mark.parametrize("header", ["name,group,email", "name,coins", "name,group,name", "alice,staff"])
def test_import_refuses_a_header_it_does_not_know(config_file: Path, database: Path, tmp_path: Path,
                                                  header: str) -> None:
    csv_file = write_csv(tmp_path / "roster.csv", [header, "alice,staff,x"])
    err = refused(config_file, "accounts", "import", str(csv_file))
    assert err.startswith(f"lumen-proxy: {csv_file}:1: the first line must be the header")
    assert query(database, "SELECT count(*) FROM accounts")[0][0] == 0


def test_import_refuses_a_file_that_is_not_utf8(config_file: Path, tmp_path: Path) -> None:
    csv_file = tmp_path / "latin1.csv"
    csv_file.write_bytes("name,group\nalice,staff\nm\xfcller,staff\n".encode("latin-1"))
    assert refused(config_file, "accounts", "import", str(csv_file)).strip() == \
        f"lumen-proxy: {csv_file}:3: not UTF-8 (save the file as UTF-8 CSV)"


def test_import_of_5000_rows_takes_seconds(config_file: Path, database: Path, tmp_path: Path) -> None:
    csv_file = write_csv(tmp_path / "roster.csv", roster(5000), crlf=True)
    started = time.monotonic()
    out = run(config_file, "accounts", "import", str(csv_file))
    assert time.monotonic() - started < 20
    assert out.startswith(f"{csv_file}: 5000 created, 0 changed, 0 unchanged")
    assert sum(group_counts(database).values()) == 5000


# -- coins add --group, groups list/show, max_keys ------------------------------------------------------
def test_coins_add_to_a_group(config_file: Path, database: Path, tmp_path: Path) -> None:
    run(config_file, "accounts", "import", str(write_csv(tmp_path / "roster.csv", roster(10))))
    out = run(config_file, "coins", "add", "--group", "students", "2.5", "--note", "term 2")
    assert out.strip() == "added 2.5 coins to each account of group students (8 accounts)"
    assert run_json(config_file, "coins", "add", "--group", "staff", "-1") == \
        {"group": "staff", "accounts": 2, "amount": -1.0}
    balances = {r[0]: r[1] for r in query(database, "SELECT name, balance FROM accounts")}
    assert balances["user0001"] == 1_000_000 + 2_500_000
    assert balances["user0005"] == 2_000_000 - 1_000_000
    assert query(database, "SELECT count(*) FROM ledger WHERE note = 'term 2'")[0][0] == 8
    assert query(database, "SELECT count(*) FROM ledger WHERE note = 'group staff'")[0][0] == 2
    before = dump(database)
    assert "no group named 'teachers'" in refused(config_file, "coins", "add", "--group", "teachers", "5")
    assert "give an ACCOUNT, or --group" in refused(config_file, "coins", "add", "user0001", "5", "--group", "staff")
    assert "give an ACCOUNT, or --group" in refused(config_file, "coins", "add", "5")
    assert "invalid coin amount" in refused(config_file, "coins", "add", "--group", "staff", "lots")
    assert dump(database) == before


async def test_groups_list_and_show(config_file: Path, database: Path, tmp_path: Path) -> None:
    run(config_file, "accounts", "import", str(write_csv(tmp_path / "roster.csv", roster(10))))
    store = await SqliteStore.open(database)
    try:
        now = time.time()
        start = period_start(now, "month", BERLIN)
        ids = {a.name: a.id for a in await store.accounts()}
        await store.write_usage([
            UsageRow("r1", now, ids["user0001"], 1, "echo", "/v1/chat/completions", 200, cost=1_250_000),
            UsageRow("r2", now, ids["user0002"], 2, "echo", "/v1/chat/completions", 200, cost=250_000),
            UsageRow("r3", now, ids["user0005"], 3, "echo", "/v1/chat/completions", 200, cost=9_000_000),
            # A minute either side of the period's start (23:00 UTC in Berlin: the same UTC day): only
            # the one after it is this period's.
            UsageRow("r4", start - 60, ids["user0001"], 1, "echo", "/v1/chat/completions", 200, cost=7_000_000),
            UsageRow("r5", start + 60, ids["user0001"], 1, "echo", "/v1/chat/completions", 200, cost=500_000),
        ])
    finally:
        await store.close()
    listed = {g["name"]: g for g in run_json(config_file, "groups", "list")}
    assert listed["students"] == {"name": "students", "default": True, "members": 8, "models": ["gpt-4o", "echo"],
                                  "limits": {"rpm": 20, "tpm": 40000, "concurrency": 2},
                                  "allowance": {"coins": 100, "every": "month"}, "max_keys": 2}
    assert (listed["staff"]["members"], listed["staff"]["models"], listed["staff"]["allowance"]) == (2, "all", None)
    assert "students *" in run(config_file, "groups", "list")

    shown = run_json(config_file, "groups", "show", "students")
    assert shown["usage"] == {"since": datetime.fromtimestamp(start, BERLIN).isoformat(), "requests": 3, "cost": 2}
    assert shown["members"] == 8 and len(shown["accounts"]) == 8
    assert shown["accounts"][0] == {"name": "user0001", "coins": -7.75, "enabled": True, "allowance_left": 0,
                                    "allowance_granted": False}
    assert shown["period"]["every"] == "month"
    staff = run_json(config_file, "groups", "show", "staff")
    assert (staff["usage"]["cost"], [a["name"] for a in staff["accounts"]]) == (9, ["user0000", "user0005"])
    text = run(config_file, "groups", "show", "students")
    assert "usage      2 coins in 3 requests this period" in text and "user0009" in text
    assert "no group named 'teachers'" in refused(config_file, "groups", "show", "teachers")


async def test_keys_create_refuses_beyond_max_keys(config_file: Path, database: Path) -> None:
    run(config_file, "accounts", "add", "alice")
    run(config_file, "accounts", "add", "bob", "--group", "staff")
    store = await SqliteStore.open(database)
    try:  # an expired key does not count
        await store.create_key("alice", "old", time.time() - 60, now=time.time() - 3600)
    finally:
        await store.close()
    first = json.loads(run(config_file, "keys", "create", "alice", "--json"))
    run(config_file, "keys", "create", "alice")
    before = dump(database)
    err = refused(config_file, "keys", "create", "alice", code=1)
    assert err.splitlines() == [
        "lumen-proxy: account alice already holds 2 active keys, the most its group students allows "
        "(max_keys: 2): revoke one first (lumen-proxy keys list alice, then lumen-proxy keys revoke ID)"]
    assert dump(database) == before
    run(config_file, "keys", "revoke", str(first["id"]))
    run(config_file, "keys", "create", "alice")
    for _ in range(3):  # staff has no max_keys
        run(config_file, "keys", "create", "bob")


@pytest.mark.parametrize("command", [("accounts", "add"), ("accounts", "set-group"), ("accounts", "list"),
                                     ("accounts", "show"), ("accounts", "import"), ("coins", "add"),
                                     ("groups", "list"), ("groups", "show"), ("keys", "create")])
def test_help_explains_each_command(command: tuple[str, ...]) -> None:
    done = cli(*command, "--help")
    assert done.returncode == 0
    assert "group" in done.stdout.lower()
    if command == ("accounts", "import"):
        assert "name,group,coins,models\n  alice,students,,\n" in done.stdout
        assert "--dry-run" in done.stdout


# -- beside a running server ------------------------------------------------------------------------------
async def test_imported_accounts_use_their_keys_at_once(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    """An import while the server runs: keys the CLI then creates work within a second, on the allowance
    the server grants the new members (they have no coins of their own)."""
    data = groups_dict(tmp_path, upstream.base_url)
    proxy = await make_proxy(build_config(tmp_path, data))
    config_file = write_config(tmp_path, data)
    csv_file = write_csv(tmp_path / "roster.csv", ["name,group", *(f"s{i:03d}," for i in range(50))])
    assert "50 created" in await admin(config_file, "accounts", "import", str(csv_file))
    keys = [(await admin(config_file, "keys", "create", name)).strip() for name in ("s000", "s049")]

    async def works(key: str) -> bool:
        try:
            answer = await proxy.sdk(key).chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "hello"}], max_tokens=10)
        except openai.APIStatusError:  # 401 before the server sees the key, 402 before the allowance
            return False
        return bool(answer.choices)

    for key in keys:
        assert await eventually(functools.partial(works, key), within=1.0)
    with pytest.raises(openai.PermissionDeniedError):  # the group's models only
        await proxy.sdk(keys[0]).embeddings.create(model="text-embedding-3-small", input="x")
    shown = json.loads(await admin(config_file, "accounts", "show", "s000", "--json"))
    assert shown["allowance"]["granted"] is True
    assert 99 < shown["allowance"]["left"] <= 100

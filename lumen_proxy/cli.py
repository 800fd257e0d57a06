"""The ``lumen-proxy`` command: ``serve`` and the admin commands over the same database.

Each subcommand is a few lines over the functions that own the work. Bad input prints one line on
stderr and exits non-zero (2 for usage/config errors, 1 for a refused operation), changing nothing.
Admin commands work while the server runs: they write through their own store beside it, and
the server picks their changes up within a second. A database another connection keeps locked makes
a command wait ``store.BUSY_TIMEOUT`` seconds at most, then print one line and exit 1 (never a
traceback): every storage failure is turned into one line here.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

from . import __version__, periods
from .account_import import import_text, parse_import
from .allowances import refill_of
from .cli_input import EMAIL, NAME_RULE, CliError, coins_text, name_problem, parse_coins, shown, unknown_group
from .config import Config, ConfigError, Group, find_config_path, load_config
from .portal.records import PortalRecords
from .sqlite_store import SqliteStore
from .store import (
    AccountRow,
    ImportRow,
    KeyRow,
    StorageFailure,
    Store,
    StoreError,
    TooManyKeys,
    parse_utc,
    store_for,
    utc_day,
)


def parse_date(text: str) -> float:
    """YYYY-MM-DD (00:00 UTC) or an ISO 8601 time; returns a Unix timestamp."""
    try:
        return parse_utc(text)
    except ValueError:
        raise CliError(f"invalid date {text!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM", 2) from None


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def coins_number(micro: int) -> float:
    return float(coins_text(micro))


def group_arg(config: Config, name: str) -> Group:
    group = config.group(name)
    if group is None:
        raise unknown_group(config, name)
    return group


async def check_group_name(store: Store, config: Config, name: str) -> None:
    """``name`` is a group of the config, or one that accounts still have (a group since removed from it)."""
    if config.group(name) is None and not await store.accounts(name):
        raise unknown_group(config, name)


def allowance_dict(a: AccountRow, config: Config, now: float) -> dict[str, Any] | None:
    """The account's allowance as its group gives it, None without one. ``granted`` is False until the server
    has granted the current period's (at once for a new member, else within a second of the period's start)."""
    group = config.group(a.group)
    if group is None or group.allowance is None:
        return None
    every = group.allowance.every
    return {"coins": coins_number(group.allowance.coins), "left": coins_number(a.allowance), "every": every,
            "granted": refill_of(a, config, now, 0) is None,
            "resets_at": periods.iso(periods.next_start(now, every, config.timezone), config.timezone)}


def models_of(a: AccountRow, config: Config) -> tuple[str, ...] | None:
    """The models the account may use: its own list, else its group's, else None (all)."""
    return config.models_allowed(a.models, a.group)


def models_cell(a: AccountRow, config: Config, sep: str = ",") -> str:
    models = models_of(a, config)
    inherited = " (group's)" if a.models is None and models is not None else ""
    return sep.join(models) + inherited if models is not None else "all"


def limits_cell(a: AccountRow, config: Config) -> str:
    """The account's own limits, else its group's (marked), as ``rpm=20, tpm=40000 (group's)``."""
    group = config.group(a.group)
    parts = []
    for name in ("rpm", "tpm", "concurrency"):
        own, inherited = getattr(a, name), getattr(group.limits, name) if group else None
        if own is not None or inherited is not None:
            parts.append(f"{name}={own}" if own is not None else f"{name}={inherited} (group's)")
    return ", ".join(parts) or "defaults"


def account_dict(a: AccountRow, config: Config, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    models = models_of(a, config)
    return {"id": a.id, "name": a.name, "email": a.email, "group": a.group, "coins": coins_number(a.balance),
            "allowance": allowance_dict(a, config, now), "enabled": a.enabled,
            "models": list(models) if models is not None else "all", "created": iso(a.created_at),
            "limits": {"rpm": a.rpm, "tpm": a.tpm, "concurrency": a.concurrency}}


def key_dict(k: KeyRow, account: str) -> dict[str, Any]:
    return {"id": k.id, "account": account, "prefix": k.prefix, "label": k.label, "created": iso(k.created_at),
            "last_used": iso(k.last_used_at), "expires": iso(k.expires_at), "revoked": iso(k.revoked_at),
            "delegate": k.delegate}


def emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text())


def check_models(config: Config, names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if config.model(n) is None]
    if unknown:
        known = ", ".join(m.name for m in config.models)
        raise CliError(f"unknown model(s) {', '.join(unknown)} (models in {config.source}: {known})", 2)
    return list(names)


def models_arg(config: Config, text: str | None) -> list[str] | None:
    if text is None or text == "all":
        return None
    return check_models(config, [n.strip() for n in text.split(",") if n.strip()])


# -- admin commands ------------------------------------------------------------------------------------
def allowance_text(group: Group) -> str:
    allowance = group.allowance
    return "" if allowance is None else f"{coins_text(allowance.coins)} coins a {allowance.every}"


async def accounts_add(store: Store, config: Config, args: argparse.Namespace) -> None:
    problem = name_problem(args.name)
    if problem:
        raise CliError(problem, 2)
    coins = parse_coins(args.coins)
    if coins < 0:
        raise CliError("--coins must not be negative", 2)
    group = group_arg(config, args.group) if args.group is not None else config.group(config.default_group)
    models = models_arg(config, args.models)
    account = await store.add_account(args.name, coins, models, group=group.name if group else None)

    def text() -> str:
        joined = f" in group {group.name}" if group else ""
        granted = f" (and an allowance of {allowance_text(group)}, granted by the server within a second)" \
            if group and group.allowance else ""
        return f"created account {account.name}{joined} with {coins_text(coins)} coins{granted}"

    emit(args, account_dict(account, config), text)


def account_group_text(a: AccountRow, config: Config, now: float) -> str:
    group = config.group(a.group)
    if a.group is None:
        return "none"
    if group is None:
        return f"{a.group} (not in {config.source}: no models, limits or allowance from it)"
    allowance = allowance_dict(a, config, now)
    if allowance is None:
        return group.name
    when = periods.describe(periods.next_start(now, allowance["every"], config.timezone), config.timezone)
    if not allowance["granted"]:
        return (f"{group.name}, allowance {allowance_text(group)}: this period's not granted yet "
                f"(the running server grants it within a second); refills {when}")
    return f"{group.name}, allowance {allowance_text(group)}: {coins_text(a.allowance)} left, refills {when}"


async def accounts_show(store: Store, config: Config, args: argparse.Namespace) -> None:
    a = await store.account(args.name)
    keys = await store.keys(args.name)
    now = time.time()
    data = {**account_dict(a, config, now), "keys": [key_dict(k, n) for k, n in keys]}

    def text() -> str:
        models = models_cell(a, config, ", ")
        limits = limits_cell(a, config)
        active = sum(1 for k, _ in keys if k.revoked_at is None)
        return (f"account  {a.name} (id {a.id}){'' if a.enabled else '  DISABLED'}\n"
                f"group    {account_group_text(a, config, now)}\ncoins    {coins_text(a.balance)}\n"
                f"models   {models}\nlimits   {limits}\nkeys     {active} active, {len(keys) - active} revoked\n"
                f"created  {iso(a.created_at)}")

    emit(args, data, text)


def accounts_table(accounts: Sequence[AccountRow], config: Config, now: float) -> str:
    lines = [f"{'NAME':20} {'GROUP':12} {'ALLOWANCE LEFT':>14} {'COINS':>14} {'ENABLED':8} MODELS"]
    for a in accounts:
        models = models_cell(a, config)
        allowance = allowance_dict(a, config, now)
        left = "-" if allowance is None else coins_text(a.allowance)
        lines.append(f"{a.name:20} {a.group or '-':12} {left:>14} {coins_text(a.balance):>14} "
                     f"{'yes' if a.enabled else 'no':8} {models}")
    return "\n".join(lines)


async def accounts_list(store: Store, config: Config, args: argparse.Namespace) -> None:
    if args.group is not None:
        await check_group_name(store, config, args.group)
    accounts = await store.accounts(args.group)
    now = time.time()
    emit(args, [account_dict(a, config, now) for a in accounts], lambda: accounts_table(accounts, config, now))


async def accounts_enable(store: Store, config: Config, args: argparse.Namespace) -> None:
    account = await store.update_account(args.name, enabled=args.enabled)
    emit(args, account_dict(account, config),
         lambda: f"account {account.name} {'enabled' if account.enabled else 'disabled'}")


async def accounts_set_models(store: Store, config: Config, args: argparse.Namespace) -> None:
    account = await store.update_account(args.name, models=models_arg(config, args.models))
    emit(args, account_dict(account, config), lambda: f"account {account.name} may use: {args.models}")


async def accounts_set_group(store: Store, config: Config, args: argparse.Namespace) -> None:
    if (args.group is None) != args.none:
        raise CliError("give a GROUP, or --none to take the account out of its group (not both)", 2)
    group = None if args.none else group_arg(config, args.group)
    before = await store.account(args.name)
    account = await store.update_account(args.name, group=group.name if group else None)

    def text() -> str:
        if group is None:
            expires = (f"; what is left of its allowance ({coins_text(before.allowance)} coins) expires within "
                       "a second" if before.allowance else "")
            return f"account {account.name} is in no group{expires}"
        if before.group == group.name:
            return f"account {account.name} is already in group {group.name}: nothing changed"
        starts = (f"; its allowance of {allowance_text(group)} starts within a second (the running server grants "
                  "it; a stopped one at its start)" if group.allowance else "")
        return f"account {account.name} moved to group {group.name}{starts}"

    emit(args, account_dict(account, config), text)


def limit_arg(text: str | None) -> int | None | str:
    if text is None:
        return "keep"
    if text == "default":
        return None
    if not text.isdigit():
        raise CliError(f"invalid limit {text!r}: a whole number (0 = unlimited) or 'default'", 2)
    return int(text)


async def accounts_set_limits(store: Store, config: Config, args: argparse.Namespace) -> None:
    values = {name: limit_arg(getattr(args, name)) for name in ("rpm", "tpm", "concurrency")}
    changes = {k: v for k, v in values.items() if v != "keep"}
    if not changes:
        raise CliError("give at least one of --rpm, --tpm, --concurrency", 2)
    account = await store.update_account(args.name, **changes)
    data = account_dict(account, config)
    emit(args, data, lambda: f"limits of {account.name}: " + ", ".join(
        f"{k}={'default' if v is None else v}" for k, v in data["limits"].items()))


async def keys_create(store: Store, config: Config, args: argparse.Namespace) -> None:
    expires = parse_date(args.expires) if args.expires else None
    now = datetime.now(UTC).timestamp()
    if expires is not None and expires <= now:
        raise CliError(f"--expires {args.expires} is in the past", 2)
    group = config.group((await store.account(args.account)).group)
    limit = group.max_keys if group is not None else None
    try:
        key, row = await store.create_key(args.account, args.label, expires, now=now, max_active=limit,
                                          delegate=args.delegate)
    except TooManyKeys as exc:
        raise CliError(f"account {args.account} already holds {exc.active} active keys, the most its group "
                       f"{group.name if group else ''} allows (max_keys: {limit}): revoke one first (lumen-proxy "
                       f"keys list {args.account}, then lumen-proxy keys revoke ID)") from None
    if args.json:
        print(json.dumps({**key_dict(row, args.account), "key": key}, indent=2))
    else:
        print(key)
        kind = " (delegating: requests naming a person in " + config.delegation_header + " are theirs)" \
            if row.delegate else ""
        print(f"key id {row.id} for account {args.account}{kind}: store it now, it is not shown again", file=sys.stderr)


SIGNIN_NAMES = {"oidc": "OpenID Connect", "header": "a trusted proxy header", "link": "sign-in links"}


async def accounts_login_link(store: Store, config: Config, args: argparse.Namespace) -> None:
    if not config.portal.login_links:
        raise CliError(f"sign-in links are turned off (portal.login_links: false in {config.source})", 2)
    if not 1 <= args.minutes <= 24 * 60:
        raise CliError("--minutes must be between 1 and 1440", 2)
    token, expires = await PortalRecords(cast(SqliteStore, store)).create_link(args.name, args.minutes)
    url = f"{config.portal_url}/login/link/{token}"
    if args.json:
        print(json.dumps({"account": args.name, "url": url, "expires_at": iso(expires)}, indent=2))
        return
    print(url)
    where = "" if config.public_url else " (set public_url in the config to the address people's browsers use)"
    print(f"sign-in link for {args.name}: valid once, until {iso(expires)}{where}", file=sys.stderr)


async def accounts_set_email(store: Store, config: Config, args: argparse.Namespace) -> None:
    email = None if args.none else args.email
    if email is not None and not EMAIL.fullmatch(email):
        raise CliError(f"{shown(email)} is not an email address", 2)
    if email is not None:
        owner = await PortalRecords(cast(SqliteStore, store)).find_account(email)
        if owner is not None and owner.name != args.name:
            raise CliError(f"the account {owner.name} already has the email {email} (or is named so)", 1)
    account = await store.update_account(args.name, email=email)
    emit(args, account_dict(account, config), lambda: f"account {account.name}: email {account.email or 'none'}")


async def keys_list(store: Store, config: Config, args: argparse.Namespace) -> None:
    keys = await store.keys(args.account)

    def text() -> str:
        lines = [f"{'ID':>5} {'ACCOUNT':16} {'PREFIX':10} {'LABEL':16} {'LAST USED':26} STATE"]
        for k, name in keys:
            state = "revoked" if k.revoked_at else (f"expires {iso(k.expires_at)}" if k.expires_at else "active")
            state += ", delegating" if k.delegate else ""
            lines.append(f"{k.id:>5} {name:16} {k.prefix + '…':10} {k.label or '':16} "
                         f"{iso(k.last_used_at) or 'never':26} {state}")
        return "\n".join(lines)

    emit(args, [key_dict(k, n) for k, n in keys], text)


async def keys_delegate(store: Store, config: Config, args: argparse.Namespace) -> None:
    key = await store.set_delegate(args.key, not args.off)
    account = await store.account_by_id(key.account_id)
    state = (f"now delegating: a request naming a person in {config.delegation_header} is that person's"
             if key.delegate else "no longer delegating: its requests are its own account's")
    emit(args, key_dict(key, account.name), lambda: f"key {key.id} ({key.prefix}…) of {account.name} is {state}")


async def keys_revoke(store: Store, config: Config, args: argparse.Namespace) -> None:
    key = await store.revoke_key(args.key)
    account = await store.account_by_id(key.account_id)
    emit(args, key_dict(key, account.name), lambda: f"revoked key {key.id} ({key.prefix}…) of {account.name}")


async def coins_add(store: Store, config: Config, args: argparse.Namespace) -> None:
    if (args.account is None) == (args.group is None):
        raise CliError("give an ACCOUNT, or --group GROUP for every account of a group (not both)", 2)
    amount = parse_coins(args.amount)
    verb = "added" if amount >= 0 else "deducted"
    if args.group is not None:
        await check_group_name(store, config, args.group)
        count = await store.add_coins_to_group(args.group, amount, args.note or f"group {args.group}")
        emit(args, {"group": args.group, "accounts": count, "amount": coins_number(amount)},
             lambda: f"{verb} {coins_text(abs(amount))} coins {'to' if amount >= 0 else 'from'} each account "
                     f"of group {args.group} ({count} accounts)")
        return
    account = await store.add_coins(args.account, amount, args.note)
    emit(args, account_dict(account, config),
         lambda: f"{verb} {coins_text(abs(amount))} coins: {account.name} now has {coins_text(account.balance)}")


async def usage_report(store: Store, config: Config, args: argparse.Namespace) -> None:
    account_id = (await store.account(args.account)).id if args.account else None
    since = utc_day(parse_date(args.since)) if args.since else None
    until = utc_day(parse_date(args.until)) if args.until else None
    rows = await store.usage_report(account_id, since=since, until=until, by=args.by)
    for row in rows:
        row["cost"] = float(coins_text(row["cost"]))
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=[args.by, "requests", "errors", "prompt_tokens",
                                                         "completion_tokens", "cost"])
        writer.writeheader()
        writer.writerows(rows)
        return

    def text() -> str:
        lines = [f"{args.by.upper():24} {'REQUESTS':>9} {'ERRORS':>7} {'PROMPT':>12} {'COMPLETION':>12} {'COINS':>14}"]
        for r in rows:
            lines.append(f"{str(r[args.by]):24} {r['requests']:>9} {r['errors']:>7} {r['prompt_tokens']:>12} "
                         f"{r['completion_tokens']:>12} {r['cost']:>14}")
        return "\n".join(lines)

    emit(args, rows, text)


async def usage_prune(store: Store, config: Config, args: argparse.Namespace) -> None:
    deleted = await store.prune_usage(parse_date(args.before))
    emit(args, {"deleted": deleted}, lambda: f"deleted {deleted} usage rows before {args.before} "
                                            "(daily totals are kept)")


# -- groups --------------------------------------------------------------------------------------------
def group_dict(g: Group, config: Config, members: int) -> dict[str, Any]:
    allowance = g.allowance
    return {"name": g.name, "default": g.name == config.default_group, "members": members,
            "models": list(g.models) if g.models is not None else "all",
            "limits": {"rpm": g.limits.rpm, "tpm": g.limits.tpm, "concurrency": g.limits.concurrency},
            "allowance": None if allowance is None else {"coins": coins_number(allowance.coins),
                                                         "every": allowance.every},
            "max_keys": g.max_keys}


def limits_text(limits: dict[str, int | None]) -> str:
    return ", ".join(f"{k}={v}" for k, v in limits.items() if v is not None) or "defaults"


def models_text(models: Any) -> str:
    return ", ".join(models) if isinstance(models, list) else str(models)


async def groups_list(store: Store, config: Config, args: argparse.Namespace) -> None:
    counts: dict[str | None, int] = {}
    for account in await store.accounts():
        counts[account.group] = counts.get(account.group, 0) + 1
    data = [group_dict(g, config, counts.get(g.name, 0)) for g in config.groups]

    def text() -> str:
        if not data:
            return f"{config.source} defines no groups"
        lines = [f"{'NAME':16} {'MEMBERS':>8} {'ALLOWANCE':24} {'MAX KEYS':>8}  {'LIMITS':36} MODELS"]
        for g, d in zip(config.groups, data, strict=True):
            name = g.name + (" *" if d["default"] else "")
            lines.append(f"{name:16} {d['members']:>8} {allowance_text(g) or '-':24} {g.max_keys or '-':>8}  "
                         f"{limits_text(d['limits']):36} {models_text(d['models'])}")
        if config.default_group:
            lines.append(f"* default_group: new accounts join {config.default_group}")
        return "\n".join(lines)

    emit(args, data, text)


async def groups_show(store: Store, config: Config, args: argparse.Namespace) -> None:
    group = group_arg(config, args.name)
    members = await store.accounts(group.name)
    now, zone = time.time(), config.timezone
    every = group.allowance.every if group.allowance else "month"
    start, end = periods.period_start(now, every, zone), periods.next_start(now, every, zone)
    requests, cost = await store.group_usage(group.name, start)
    data = {**group_dict(group, config, len(members)),
            "period": {"every": every, "start": periods.iso(start, zone), "end": periods.iso(end, zone)},
            "usage": {"since": periods.iso(start, zone), "requests": requests, "cost": coins_number(cost)},
            "accounts": [{"name": a.name, "coins": coins_number(a.balance), "enabled": a.enabled,
                          **({"allowance_left": coins_number(a.allowance),
                              "allowance_granted": refill_of(a, config, now, 0) is None} if group.allowance else {})}
                         for a in members]}

    def text() -> str:
        lines = [f"group      {group.name}{' (default_group: new accounts join it)' if data['default'] else ''}",
                 f"members    {len(members)}", f"models     {models_text(data['models'])}",
                 f"limits     {limits_text(data['limits'])}", f"allowance  {allowance_text(group) or 'none'}",
                 f"max_keys   {group.max_keys or 'no limit'}",
                 f"period     {periods.describe(start, zone)} to {periods.describe(end, zone)}",
                 f"usage      {coins_text(cost)} coins in {requests} requests this period"]
        if members:
            lines += ["", accounts_table(members, config, now)]
        return "\n".join(lines)

    emit(args, data, text)


# -- accounts import -----------------------------------------------------------------------------------
def change_text(row: ImportRow, before: AccountRow | None) -> str:
    group = row.group or "no group"
    if before is None:
        models = f", models {','.join(row.models)}" if row.models is not None else ""
        return f"create {row.name} in {group} with {coins_text(row.coins or 0)} coins{models}"
    changes = []
    if row.group != before.group:
        changes.append(f"group {before.group or 'none'} -> {row.group or 'none'}")
    if row.models is not None and tuple(sorted(set(row.models))) != before.models:
        changes.append(f"models {','.join(before.models) if before.models is not None else 'all'} -> "
                       f"{','.join(sorted(set(row.models)))}")
    return f"change {row.name}: {'; '.join(changes)}"


async def accounts_import(store: Store, config: Config, args: argparse.Namespace) -> None:
    started = time.monotonic()
    text = import_text(args.file)
    try:
        rows, problems = parse_import(text, config)
    except CliError as exc:  # no header: "LINE: problem"
        raise CliError(f"{args.file}:{exc}", exc.code) from None
    if problems:
        for line, problem in problems:
            print(f"lumen-proxy: {args.file}:{line}: {problem}", file=sys.stderr)
        raise CliError(f"{args.file}: {len(problems)} bad line(s), nothing imported", 2)
    before = {a.name: a for a in await store.accounts()} if args.dry_run and not args.json else {}
    plan = await store.import_accounts(rows, dry_run=args.dry_run)
    created, changed, unchanged = (len(plan[k]) for k in ("created", "changed", "unchanged"))

    def summary() -> str:
        if not args.dry_run:
            return (f"{args.file}: {created} created, {changed} changed, {unchanged} unchanged "
                    f"({time.monotonic() - started:.1f} s)")
        todo = set(plan["created"]) | set(plan["changed"])
        lines = [change_text(r, before.get(r.name)) for r in rows if r.name in todo]
        return "\n".join([*lines, f"dry run, nothing written: {created} to create, {changed} to change, "
                                   f"{unchanged} unchanged"])

    emit(args, {"dry_run": args.dry_run, **plan}, summary)


def check_config(args: argparse.Namespace) -> int:
    config = load(args)
    groups = [g.name + (" (default)" if g.name == config.default_group else "") for g in config.groups]
    models = [m.name for m in config.models]
    summary = {"config": config.source, "models": models,
               "groups": [g.name for g in config.groups], "default_group": config.default_group,
               "timezone": config.timezone.key, "database": str(config.database),
               "listen": f"{config.host}:{config.port}", "portal": config.portal_url,
               "signin": list(config.portal.methods)}
    in_groups = f"; {len(groups)} groups: {', '.join(groups)}, periods in {config.timezone.key}" if groups else ""
    signin = ", ".join(SIGNIN_NAMES[m] for m in config.portal.methods) or "no sign-in"
    emit(args, summary, lambda: f"{config.source}: ok ({len(config.models)} models: "
                                f"{', '.join(models)}{in_groups}; database {config.database}; "
                                f"portal {config.portal_url}/ with {signin})")
    return 0


IMPORT_HELP = f"""\
Create the accounts of a CSV file that do not exist, and bring those that do to the group (and
models) it gives, in one transaction. Every line is checked first: if any is bad, every bad line
is printed with its number and nothing is imported. Running it again changes nothing.

The file: UTF-8 (a byte-order mark is fine), CRLF or LF line endings. Line 1 is the header, with
the columns name and group and optionally coins and models, in any order (no other):

  name,group,coins,models
  alice,students,,
  bob,staff,25,gpt-4o;text-embedding-3-small
  "carol",,10,

  name    {NAME_RULE}
  group   a group of the config; empty: default_group (no group if the config has none)
  coins   starting coins of a new account (default 0); an existing account's balance is left alone
  models  model names separated by ; or spaces; empty: a new account uses its group's (else all),
          an existing account keeps its own

--dry-run prints what would be created or changed and writes nothing; --json prints the plan
({{"created": [...], "changed": [...], "unchanged": [...]}}).
"""


# -- plumbing ------------------------------------------------------------------------------------------
AdminCommand = Callable[[Store, Config, argparse.Namespace], Awaitable[None]]


def load(args: argparse.Namespace, *, require_env: bool = True) -> Config:
    path = find_config_path(args.config)
    try:
        return load_config(path, require_env=require_env)
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None


async def run_admin(command: AdminCommand, args: argparse.Namespace) -> None:
    config = load(args, require_env=False)
    store = store_for(config.database)
    await store.connect()
    try:
        await command(store, config, args)
    except StorageFailure as exc:  # locked for longer than the busy timeout, disk full, read-only...
        raise CliError(exc.problem(doing="use")) from None
    finally:
        await store.close()


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help="YAML config (default: $LUMEN_CONFIG, else ./lumen.yaml, else the built-in demo)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON (for scripts)")

    parser = argparse.ArgumentParser(
        prog="lumen-proxy", parents=[common],
        description="Lumen proxy: an OpenAI-compatible gateway with accounts, coins and rate limits. "
                    "Admin commands work on the database named in the config, also while the server runs.",
    )
    parser.add_argument("--version", action="version", version=f"lumen-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the proxy server",
                           description="Run the server. SIGTERM/SIGINT stop gracefully; SIGHUP reloads the config.")
    serve.add_argument("--host", help="listen address (overrides listen.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides listen.port)")

    check = sub.add_parser("check", parents=[common, as_json], help="validate the config without starting",
                           description="Load and validate the config as 'serve' would (environment variables "
                                       "included), then exit: 0 if it is valid, 2 with one line if not. Run it "
                                       "before 'systemctl reload'.")
    check.set_defaults(run=None)

    accounts = sub.add_parser("accounts", help="create and manage accounts").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = accounts.add_parser("add", parents=[common, as_json], help="create an account",
                            description=f"Create an account. NAME: {NAME_RULE}. It joins --group, else the "
                                        "config's default_group (if any), whose models, limits and allowance "
                                        "it gets; --coins are its own balance, spent after the allowance.")
    p.add_argument("name")
    p.add_argument("--coins", default="0", help="starting coins (default 0), kept until spent")
    p.add_argument("--models", help="comma-separated model names it may use (default: its group's, else all)")
    p.add_argument("--group", metavar="GROUP", help="a group of the config (default: default_group)")
    p.set_defaults(run=accounts_add)
    p = accounts.add_parser("show", parents=[common, as_json],
                            help="show an account: group, allowance, balance and keys",
                            description="Show an account: its group, what is left of its allowance and when it "
                                        "refills (next period start, in the config's timezone), its balance "
                                        "(coins), models, limits and keys.")
    p.add_argument("name")
    p.set_defaults(run=accounts_show)
    p = accounts.add_parser("list", parents=[common, as_json], help="list accounts (with group and allowance left)")
    p.add_argument("--group", metavar="GROUP", help="only the accounts of this group")
    p.set_defaults(run=accounts_list)
    p = accounts.add_parser("set-group", parents=[common, as_json], help="move an account to a group, or out of it",
                            description="Move an account to GROUP (a group of the config), or out of its group "
                                        "with --none. The new group's allowance replaces what is left of the old "
                                        "one: the running server grants it within a second. The account's own "
                                        "models and limits (set-models, set-limits) still override the group's.")
    p.add_argument("name")
    p.add_argument("group", nargs="?", metavar="GROUP")
    p.add_argument("--none", action="store_true", help="take the account out of its group")
    p.set_defaults(run=accounts_set_group)
    p = accounts.add_parser(
        "import", parents=[common, as_json], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="create or update many accounts from a CSV file, all or nothing",
        description=IMPORT_HELP)
    p.add_argument("file", metavar="FILE.csv")
    p.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")
    p.set_defaults(run=accounts_import)
    p = accounts.add_parser("login-link", parents=[common, as_json], help="print a one-time portal sign-in link",
                            description="Print a link that signs NAME in to the portal once, within --minutes "
                                        "(default 15). Send it to the person; opening it shows a Sign in button. "
                                        "The URL starts with public_url (else the listen address).")
    p.add_argument("name")
    p.add_argument("--minutes", type=float, default=15.0, help="how long the link is valid (default 15)")
    p.set_defaults(run=accounts_login_link)
    p = accounts.add_parser("set-email", parents=[common, as_json], help="set the email a portal sign-in matches",
                            description="Set the email address of an account: an OpenID Connect sign-in whose "
                                        "account claim (portal.oidc.account_claim) is this address signs in to "
                                        "this account, whatever its name. --none removes it.")
    p.add_argument("name")
    p.add_argument("email", nargs="?")
    p.add_argument("--none", action="store_true", help="remove the account's email")
    p.set_defaults(run=accounts_set_email)
    for action, enabled in (("enable", True), ("disable", False)):
        p = accounts.add_parser(action, parents=[common, as_json], help=f"{action} an account (keys kept)")
        p.add_argument("name")
        p.set_defaults(run=accounts_enable, enabled=enabled)
    p = accounts.add_parser("set-models", parents=[common, as_json], help="set the models an account may use")
    p.add_argument("name")
    p.add_argument("models", help="comma-separated model names, or 'all'")
    p.set_defaults(run=accounts_set_models)
    p = accounts.add_parser("set-limits", parents=[common, as_json],
                            help="override rate limits for an account (0 = unlimited, 'default' = config)")
    p.add_argument("name")
    for name, what in (("rpm", "requests per minute"), ("tpm", "tokens per minute"),
                       ("concurrency", "concurrent requests")):
        p.add_argument(f"--{name}", metavar="N", help=what)
    p.set_defaults(run=accounts_set_limits)

    keys = sub.add_parser("keys", help="create, list and revoke API keys").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = keys.add_parser("create", parents=[common, as_json],
                        help="create a key; prints it alone on stdout, once (only its hash is stored)",
                        description="Create an API key for ACCOUNT. The key is printed alone on stdout, once: "
                                    "only its hash is stored, so it cannot be shown again. If the account's "
                                    "group has max_keys, an account holding that many active keys (neither "
                                    "revoked nor expired) is refused one more: revoke one first.")
    p.add_argument("account")
    p.add_argument("--label", help="a note, e.g. the laptop or script it is for")
    p.add_argument("--expires", metavar="DATE", help="YYYY-MM-DD (00:00 UTC) or ISO time after which it fails")
    p.add_argument("--delegate", action="store_true",
                   help="a shared front end's key (Open WebUI): a request naming a person in the delegation "
                        "header is billed, limited and logged as that person's account")
    p.set_defaults(run=keys_create)
    p = keys.add_parser("delegate", parents=[common, as_json], help="make a key a delegating key, or not (--off)",
                        description="Make a key a delegating key: a request with it that names a person in the "
                                    "header delegation.header of the config (default X-OpenWebUI-User-Email, "
                                    "which Open WebUI sends with ENABLE_FORWARD_USER_INFO_HEADERS=true) is "
                                    "authenticated, limited, held, billed and logged as that person's account "
                                    "(matched by name, else email; someone unknown follows portal.new_accounts). "
                                    "Without the header the key is its own account's. --off turns it back into "
                                    "an ordinary key; the server applies either within a second.")
    p.add_argument("key", metavar="KEY_OR_ID")
    p.add_argument("--off", action="store_true", help="make it an ordinary key again")
    p.set_defaults(run=keys_delegate)
    p = keys.add_parser("list", parents=[common, as_json], help="list keys (never the keys themselves)")
    p.add_argument("account", nargs="?")
    p.set_defaults(run=keys_list)
    p = keys.add_parser("revoke", parents=[common, as_json], help="revoke a key, given in full or by id")
    p.add_argument("key", metavar="KEY_OR_ID")
    p.set_defaults(run=keys_revoke)

    coins = sub.add_parser("coins", help="add or deduct coins").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = coins.add_parser("add", parents=[common, as_json],
                         help="add coins to an account or a whole group (negative to deduct); kept in a ledger",
                         description="Add AMOUNT coins (negative to deduct) to the balance of ACCOUNT, or with "
                                     "--group GROUP to every account of that group, in one transaction. The "
                                     "balance is kept until spent, unlike a group's allowance.")
    p.add_argument("account", nargs="?", metavar="ACCOUNT")
    p.add_argument("amount", metavar="AMOUNT")
    p.add_argument("--group", metavar="GROUP", help="every account of this group instead of one ACCOUNT")
    p.add_argument("--note", help="why (kept in the ledger; default for --group: 'group GROUP')")
    p.set_defaults(run=coins_add)

    groups = sub.add_parser("groups", help="the config's groups, their members and usage").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = groups.add_parser("list", parents=[common, as_json], help="list the groups of the config",
                          description="The groups of the config: members, models, limits, allowance, max_keys "
                                      "(* marks default_group). Groups are defined in the config file; accounts "
                                      "join them with accounts add --group, set-group or import.")
    p.set_defaults(run=groups_list)
    p = groups.add_parser("show", parents=[common, as_json], help="show a group, its members and its usage",
                          description="A group's settings, its members (allowance left, balance) and the usage "
                                      "of its accounts this period (the allowance's period, else the month).")
    p.add_argument("name", metavar="GROUP")
    p.set_defaults(run=groups_show)

    usage = sub.add_parser("usage", parents=[common, as_json],
                           help="usage report (or: usage prune --before DATE)",
                           description="Usage totals from the daily aggregate. "
                                       "'lumen-proxy usage prune --before DATE' deletes old raw rows.")
    usage.add_argument("account", nargs="?", help="only this account")
    usage.add_argument("--since", metavar="DATE", help="first day, YYYY-MM-DD (UTC), inclusive")
    usage.add_argument("--until", metavar="DATE", help="last day, YYYY-MM-DD (UTC), inclusive")
    usage.add_argument("--by", choices=("day", "model", "key", "account"), default="day",
                       help="group the totals (default: day)")
    usage.add_argument("--csv", action="store_true", help="print CSV")
    usage.set_defaults(run=usage_report)
    return parser


def build_prune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lumen-proxy usage prune",
                                     description="Delete raw usage rows older than DATE in small batches "
                                                 "(daily totals, reports and balances are unaffected).")
    parser.add_argument("--config", metavar="PATH")
    parser.add_argument("--before", required=True, metavar="DATE")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run=usage_prune)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    if "usage" in argv and argv[argv.index("usage") + 1: argv.index("usage") + 2] == ["prune"]:
        i = argv.index("usage")
        args = build_prune_parser().parse_args(argv[:i] + argv[i + 2:])
    else:
        args = build_parser().parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if getattr(args, "command", None) == "serve":
            from .server import serve

            config = load(args)
            config = replace(config, host=args.host or config.host, port=args.port or config.port)
            return serve(config, find_config_path(args.config), host=args.host, port=args.port)
        if getattr(args, "command", None) == "check":
            return check_config(args)
        asyncio.run(run_admin(args.run, args))
        return 0
    except CliError as exc:
        print(f"lumen-proxy: {exc}", file=sys.stderr)
        return exc.code
    except StoreError as exc:
        print(f"lumen-proxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


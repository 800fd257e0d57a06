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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from . import __version__
from .config import Config, ConfigError, find_config_path, load_config
from .store import AccountRow, KeyRow, StorageFailure, Store, StoreError, parse_utc, store_for, utc_day


class CliError(Exception):
    """One line for stderr; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def coins_text(micro: int) -> str:
    text = f"{Decimal(micro) / 1_000_000:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


MAX_COINS = 10**9  # per command: keeps every balance far inside the store's 64-bit integers


def parse_coins(text: str) -> int:
    try:
        amount = Decimal(text) * 1_000_000
    except InvalidOperation:
        raise CliError(f"invalid coin amount {text!r}: give a number like 10 or 2.5", 2) from None
    if not amount.is_finite():  # NaN, Infinity
        raise CliError(f"invalid coin amount {text!r}: give a number like 10 or 2.5", 2)
    if abs(amount) > MAX_COINS * 1_000_000:
        raise CliError(f"invalid coin amount {text!r}: at most {MAX_COINS} coins at a time", 2)
    if amount != amount.to_integral_value():
        raise CliError(f"invalid coin amount {text!r}: at most 6 decimals", 2)
    return int(amount)


def parse_date(text: str) -> float:
    """YYYY-MM-DD (00:00 UTC) or an ISO 8601 time; returns a Unix timestamp."""
    try:
        return parse_utc(text)
    except ValueError:
        raise CliError(f"invalid date {text!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM", 2) from None


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def account_dict(a: AccountRow) -> dict[str, Any]:
    return {"id": a.id, "name": a.name, "coins": float(coins_text(a.balance)), "enabled": a.enabled,
            "models": list(a.models) if a.models is not None else "all", "created": iso(a.created_at),
            "limits": {"rpm": a.rpm, "tpm": a.tpm, "concurrency": a.concurrency}}


def key_dict(k: KeyRow, account: str) -> dict[str, Any]:
    return {"id": k.id, "account": account, "prefix": k.prefix, "label": k.label, "created": iso(k.created_at),
            "last_used": iso(k.last_used_at), "expires": iso(k.expires_at), "revoked": iso(k.revoked_at)}


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
async def accounts_add(store: Store, config: Config, args: argparse.Namespace) -> None:
    coins = parse_coins(args.coins)
    if coins < 0:
        raise CliError("--coins must not be negative", 2)
    account = await store.add_account(args.name, coins, models_arg(config, args.models))
    emit(args, account_dict(account), lambda: f"created account {account.name} with {coins_text(coins)} coins")


async def accounts_show(store: Store, config: Config, args: argparse.Namespace) -> None:
    a = await store.account(args.name)
    keys = await store.keys(args.name)
    data = {**account_dict(a), "keys": [key_dict(k, n) for k, n in keys]}

    def text() -> str:
        models = ", ".join(a.models) if a.models is not None else "all"
        limits = ", ".join(f"{k}={v}" for k, v in data["limits"].items() if v is not None) or "defaults"
        active = sum(1 for k, _ in keys if k.revoked_at is None)
        return (f"account  {a.name} (id {a.id}){'' if a.enabled else '  DISABLED'}\ncoins    {coins_text(a.balance)}\n"
                f"models   {models}\nlimits   {limits}\nkeys     {active} active, {len(keys) - active} revoked\n"
                f"created  {iso(a.created_at)}")

    emit(args, data, text)


async def accounts_list(store: Store, config: Config, args: argparse.Namespace) -> None:
    accounts = await store.accounts()

    def text() -> str:
        lines = [f"{'NAME':20} {'COINS':>14} {'ENABLED':8} MODELS"]
        for a in accounts:
            models = ",".join(a.models) if a.models is not None else "all"
            lines.append(f"{a.name:20} {coins_text(a.balance):>14} {'yes' if a.enabled else 'no':8} {models}")
        return "\n".join(lines)

    emit(args, [account_dict(a) for a in accounts], text)


async def accounts_enable(store: Store, config: Config, args: argparse.Namespace) -> None:
    account = await store.update_account(args.name, enabled=args.enabled)
    emit(args, account_dict(account), lambda: f"account {account.name} {'enabled' if account.enabled else 'disabled'}")


async def accounts_set_models(store: Store, config: Config, args: argparse.Namespace) -> None:
    account = await store.update_account(args.name, models=models_arg(config, args.models))
    emit(args, account_dict(account), lambda: f"account {account.name} may use: {args.models}")


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
    emit(args, account_dict(account), lambda: f"limits of {account.name}: " + ", ".join(
        f"{k}={'default' if v is None else v}" for k, v in account_dict(account)["limits"].items()))


async def keys_create(store: Store, config: Config, args: argparse.Namespace) -> None:
    expires = parse_date(args.expires) if args.expires else None
    if expires is not None and expires <= datetime.now(UTC).timestamp():
        raise CliError(f"--expires {args.expires} is in the past", 2)
    key, row = await store.create_key(args.account, args.label, expires)
    if args.json:
        print(json.dumps({**key_dict(row, args.account), "key": key}, indent=2))
    else:
        print(key)
        print(f"key id {row.id} for account {args.account}: store it now, it is not shown again", file=sys.stderr)


async def keys_list(store: Store, config: Config, args: argparse.Namespace) -> None:
    keys = await store.keys(args.account)

    def text() -> str:
        lines = [f"{'ID':>5} {'ACCOUNT':16} {'PREFIX':10} {'LABEL':16} {'LAST USED':26} STATE"]
        for k, name in keys:
            state = "revoked" if k.revoked_at else (f"expires {iso(k.expires_at)}" if k.expires_at else "active")
            lines.append(f"{k.id:>5} {name:16} {k.prefix + '…':10} {k.label or '':16} "
                         f"{iso(k.last_used_at) or 'never':26} {state}")
        return "\n".join(lines)

    emit(args, [key_dict(k, n) for k, n in keys], text)


async def keys_revoke(store: Store, config: Config, args: argparse.Namespace) -> None:
    key = await store.revoke_key(args.key)
    account = await store.account_by_id(key.account_id)
    emit(args, key_dict(key, account.name), lambda: f"revoked key {key.id} ({key.prefix}…) of {account.name}")


async def coins_add(store: Store, config: Config, args: argparse.Namespace) -> None:
    amount = parse_coins(args.amount)
    account = await store.add_coins(args.account, amount, args.note)
    emit(args, account_dict(account),
         lambda: f"{'added' if amount >= 0 else 'deducted'} {coins_text(abs(amount))} coins: "
                 f"{account.name} now has {coins_text(account.balance)}")


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


def check_config(args: argparse.Namespace) -> int:
    config = load(args)
    summary = {"config": config.source, "models": [m.name for m in config.models],
               "database": str(config.database), "listen": f"{config.host}:{config.port}"}
    emit(args, summary, lambda: f"{config.source}: ok ({len(config.models)} models: "
                                f"{', '.join(summary['models'])}; database {config.database})")
    return 0


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
    p = accounts.add_parser("add", parents=[common, as_json], help="create an account")
    p.add_argument("name")
    p.add_argument("--coins", default="0", help="starting coins (default 0)")
    p.add_argument("--models", help="comma-separated model names it may use (default: all)")
    p.set_defaults(run=accounts_add)
    p = accounts.add_parser("show", parents=[common, as_json], help="show an account, its balance and keys")
    p.add_argument("name")
    p.set_defaults(run=accounts_show)
    p = accounts.add_parser("list", parents=[common, as_json], help="list accounts")
    p.set_defaults(run=accounts_list)
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
                                    "only its hash is stored, so it cannot be shown again.")
    p.add_argument("account")
    p.add_argument("--label", help="a note, e.g. the laptop or script it is for")
    p.add_argument("--expires", metavar="DATE", help="YYYY-MM-DD (00:00 UTC) or ISO time after which it fails")
    p.set_defaults(run=keys_create)
    p = keys.add_parser("list", parents=[common, as_json], help="list keys (never the keys themselves)")
    p.add_argument("account", nargs="?")
    p.set_defaults(run=keys_list)
    p = keys.add_parser("revoke", parents=[common, as_json], help="revoke a key, given in full or by id")
    p.add_argument("key", metavar="KEY_OR_ID")
    p.set_defaults(run=keys_revoke)

    coins = sub.add_parser("coins", help="add or deduct coins").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = coins.add_parser("add", parents=[common, as_json], help="add coins (negative to deduct); kept in a ledger")
    p.add_argument("account")
    p.add_argument("amount")
    p.add_argument("--note", help="why (kept in the ledger)")
    p.set_defaults(run=coins_add)

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


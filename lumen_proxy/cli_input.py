"""What admins type, parsed and checked: coin amounts, account names, group names; and the one-line
error every admin command ends with (:class:`CliError`). Shared by the CLI and the CSV import."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from .config import Config


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


def shown(text: str, limit: int = 40) -> str:
    """``text`` quoted for an error line: escaped (no control character reaches the terminal), and cut."""
    return repr(text[:limit] + "…") if len(text) > limit else repr(text)


EMAIL = re.compile(r"[^@\s\x00-\x1f]{1,64}@[A-Za-z0-9.-]{1,253}")
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
NAME_RULE = "1 to 64 letters A-Z a-z, digits and . _ - @ +, starting with a letter or a digit"


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a new account, or None. A plain ASCII name cannot turn into a spreadsheet
    formula (``=``, ``+``, ``-``, ``@`` first) in a CSV report, nor hide a control character or a look-alike."""
    if ACCOUNT_NAME.fullmatch(name):
        return None
    return f"invalid account name {shown(name)}: {NAME_RULE}"


def unknown_group(config: Config, name: str) -> CliError:
    if not config.groups:
        return CliError(f"no group named {shown(name)}: {config.source} defines no groups", 2)
    known = ", ".join(g.name for g in config.groups)
    return CliError(f"no group named {shown(name)} (groups in {config.source}: {known})", 2)

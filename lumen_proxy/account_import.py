"""``accounts import FILE.csv``: read and check every row before anything is written.

The file is UTF-8 (a byte-order mark and CRLF are fine), at most ``MAX_IMPORT_BYTES``; the header names
the columns ``name,group`` and optionally ``coins,models`` in any order. Every problem is reported with
its line number, and one is enough for nothing to be imported (the store imports all rows in one
transaction).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator

from .cli_input import CliError, name_problem, parse_coins, shown, unknown_group
from .config import Config
from .store import ImportRow

IMPORT_COLUMNS = ("name", "group", "coins", "models")
MAX_IMPORT_BYTES = 64 * 2**20  # a CSV of 5,000 accounts is ~200 KB


def import_text(path: str) -> str:
    """The file as text: UTF-8, with or without a byte-order mark; at most ``MAX_IMPORT_BYTES``."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_IMPORT_BYTES + 1)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", 2) from None
    if len(data) > MAX_IMPORT_BYTES:
        raise CliError(f"{path} is over {MAX_IMPORT_BYTES // 2**20} MiB: split it", 2)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CliError(f"{path}:{line}: not UTF-8 (save the file as UTF-8 CSV)", 2) from None


def csv_records(text: str) -> Iterator[tuple[int, list[str] | str]]:
    """``(line, cells)`` for each record (by the line it starts on), or ``(line, problem)`` for a line the CSV
    reader refuses (bad quoting, a cell over the reader's size limit); blank lines are skipped."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    while True:
        first = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # the reader goes on at the next line
            spans = f"; the record runs to line {reader.line_num}" if reader.line_num > first else ""
            problem = f"a cell over {csv.field_size_limit()} characters" if "field limit" in str(exc) else str(exc)
            yield first, f"not valid CSV ({problem}{spans})"
            continue
        if any(cell.strip(" \t") for cell in cells):
            yield first, [cell.strip(" \t") for cell in cells]


def import_header(cells: list[str] | str | None) -> list[str]:
    columns = [c.lower() for c in cells] if isinstance(cells, list) else []
    unknown = [c for c in columns if c not in IMPORT_COLUMNS]
    if "name" not in columns or "group" not in columns or unknown or len(set(columns)) < len(columns):
        got = "the file is empty" if cells is None else f"got {shown(','.join(cells), 80)}" \
            if isinstance(cells, list) else cells
        raise CliError(f"the first line must be the header: the columns name,group and optionally coins,models, "
                       f"in any order, each once, and no other ({got})", 2)
    return columns


def import_row(line: int, cells: list[str], columns: list[str], config: Config) -> ImportRow | str:
    """The row of one CSV record, or what is wrong with it."""
    if len(cells) != len(columns):
        return f"{len(cells)} cells, but the header has {len(columns)} ({','.join(columns)})"
    cell = dict(zip(columns, cells, strict=True))
    name, group_name = cell["name"], cell["group"] or config.default_group
    problem = "the name is empty" if not name else name_problem(name)
    if problem:
        return problem
    if group_name is not None and config.group(group_name) is None:
        return str(unknown_group(config, group_name))
    try:
        coins = parse_coins(cell["coins"]) if cell.get("coins") else None
    except CliError as exc:
        return str(exc)
    if coins is not None and coins < 0:
        return f"coins must not be negative (got {shown(cell['coins'])})"
    models = tuple(m for m in re.split(r"[;\s]+", cell.get("models", "")) if m) or None
    unknown = [m for m in models or () if config.model(m) is None]
    if unknown:
        return (f"unknown model(s) {', '.join(shown(m) for m in unknown)} "
                f"(models in {config.source}: {', '.join(m.name for m in config.models)})")
    return ImportRow(line, name, group_name, coins, models)


def parse_import(text: str, config: Config) -> tuple[list[ImportRow], list[tuple[int, str]]]:
    """Every row of the CSV, and every problem with its line number (all of them, not just the first)."""
    records = csv_records(text)
    line, header = next(records, (1, None))
    try:
        columns = import_header(header)
    except CliError as exc:
        raise CliError(f"{line}: {exc}", 2) from None
    rows: list[ImportRow] = []
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for line, cells in records:
        row = cells if isinstance(cells, str) else import_row(line, cells, columns, config)
        if isinstance(row, str):
            problems.append((line, row))
        elif row.name in seen:
            problems.append((line, f"{row.name} is also on line {seen[row.name]}"))
        else:
            seen[row.name] = line
            rows.append(row)
    return rows, problems

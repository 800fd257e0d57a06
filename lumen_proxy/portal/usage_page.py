"""The Usage page: balance and allowance, the live window, 30 days by model and by key, the last
requests, and CSV export.

The page reads the daily totals (one row per day, model and key) and the newest 50 rows through
the ``usage(account_id, time)`` index, so its cost does not grow with an account's history; the
export streams the period's rows in chunks. The live panel's JSON comes from memory only.
"""

from __future__ import annotations

import csv
import io
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from ..billing import to_coins
from ..runtime import RUNTIME
from ..summary import account_summary, live_window
from .chart import stacked_bars
from .guard import HEADERS, PORTAL, Viewer, render, signed_in

PERIODS = (7, 30, 90)


def _days(request: web.Request) -> int:
    text = request.query.get("days", "30")
    return int(text) if text.isdigit() and int(text) in PERIODS else 30


def _day_list(days: int, now: float) -> list[str]:
    today = datetime.fromtimestamp(now, UTC).date()
    return [(today - timedelta(days=n)).isoformat() for n in range(days - 1, -1, -1)]


def coins_text(value: float) -> str:
    if 0 < value < 0.0001:
        return "<0.0001"
    return f"{value:,.4f}".rstrip("0").rstrip(".") if value else "0"


def seconds_text(ms: float) -> str:
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def tokens_text(value: float) -> str:
    value = float(value)
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.1f}{suffix}"
    return f"{value:g}"


@signed_in
async def usage_page(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    rt, records = request.app[RUNTIME], request.app[PORTAL].records
    account, days, now = viewer.account, _days(request), time.time()
    day_list = _day_list(days, now)
    daily = await records.daily(account.id, day_list[0])
    coins: dict[tuple[str, str], float] = {}
    tokens: dict[tuple[str, str], float] = {}
    per_model: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for day, model, requests, prompt, completion, cost in daily:
        coins[(day, model)] = to_coins(cost)
        tokens[(day, model)] = prompt + completion
        row = per_model[model]
        row[0], row[1], row[2], row[3] = row[0] + requests, row[1] + prompt, row[2] + completion, row[3] + cost
    series = sorted(per_model, key=lambda m: -per_model[m][3] - per_model[m][1] - per_model[m][2])
    context: dict[str, Any] = {
        "viewer": viewer, "summary": account_summary(rt, account), "live": live_window(rt, account),
        "days": days, "periods": PERIODS,
        "coins_chart": stacked_bars(day_list, coins, series, title="Coins per day", fmt=coins_text),
        "tokens_chart": stacked_bars(day_list, tokens, series, title="Tokens per day", fmt=tokens_text),
        "by_model": [(m, *per_model[m][:3], to_coins(per_model[m][3])) for m in series],
        "by_key": [(prefix, label if key_id else "Chat (this portal)", requests, toks, to_coins(cost))
                   for key_id, prefix, label, requests, toks, cost in await records.by_key(account.id, day_list[0])],
        "recent": [(ts, model, endpoint, prompt, completion, to_coins(cost), status, duration, prefix)
                   for ts, model, endpoint, prompt, completion, cost, status, duration, prefix
                   in await records.recent(account.id)],
        "coins_text": coins_text, "tokens_text": tokens_text, "seconds_text": seconds_text,
        "zone": rt.config.timezone.key,
    }
    return render(request, "usage.html", context)


@signed_in
async def live(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """The live panel's numbers (polled every few seconds by the page's script)."""
    rt = request.app[RUNTIME]
    summary = account_summary(rt, viewer.account)
    body = {**live_window(rt, viewer.account), "coins": summary["coins"], "allowance": summary["allowance"],
            "coins_held": summary["coins_held"]}
    return web.Response(body=orjson.dumps(body), content_type="application/json", headers=HEADERS)


CSV_HEADER = ("time_utc", "request_id", "model", "endpoint", "key", "status", "prompt_tokens",
              "completion_tokens", "cost_coins", "duration_ms")


@signed_in
async def export(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """Every request of the period shown, as CSV, streamed."""
    records = request.app[PORTAL].records
    days, now = _days(request), time.time()
    since = datetime.fromisoformat(_day_list(days, now)[0]).replace(tzinfo=UTC).timestamp()
    response = web.StreamResponse(headers={
        **HEADERS, "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="lumen-usage-{days}d.csv"'})
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_HEADER)
    async for chunk in records.export(viewer.account.id, since, now + 1):
        for ts, request_id, model, endpoint, prefix, status, prompt, completion, cost, duration in chunk:
            writer.writerow((datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds"), request_id,
                             _cell(model), endpoint, prefix or "", status, prompt, completion,
                             f"{to_coins(cost):.6f}", f"{duration:.0f}" if duration is not None else ""))
        await response.write(buffer.getvalue().encode())
        buffer.seek(0)
        buffer.truncate()
    await response.write(buffer.getvalue().encode())
    await response.write_eof()
    return response


def _cell(text: str | None) -> str:
    """A spreadsheet never runs a cell as a formula (model names come from clients' requests)."""
    text = text or ""
    if text == "-":  # the placeholder of a request that named no model Lumen serves
        return text
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text

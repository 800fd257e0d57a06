"""Calendar periods of allowances: a day, an ISO week (from Monday) or a month, in the configured zone.

Pure functions of an instant, so tests can cross any boundary (a 28-day February, a DST change) by
passing the time. A period starts at local midnight; where a DST change skips midnight (some zones
change at 00:00), it starts at the first instant of that local day. Periods are compared by their
start as a UTC timestamp, which only grows: whatever the clocks of the CLI and the server, a later
period always has a larger start.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

Every = Literal["day", "week", "month"]
EVERY: tuple[Every, ...] = ("day", "week", "month")


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    """The first instant of ``day`` in ``zone``, as an aware UTC datetime."""
    local = datetime(day.year, day.month, day.day, tzinfo=zone)
    instant = local.astimezone(UTC)
    if instant.astimezone(zone).date() != day:  # midnight skipped by a DST gap: the zone moved past it
        instant = datetime(day.year, day.month, day.day, 1, tzinfo=zone).astimezone(UTC)
    return instant


def _first_day(day: date, every: Every) -> date:
    if every == "day":
        return day
    if every == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def _next_first_day(first: date, every: Every) -> date:
    if every == "day":
        return first + timedelta(days=1)
    if every == "week":
        return first + timedelta(days=7)
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)


def period_start(now: float, every: Every, zone: ZoneInfo) -> float:
    """The UTC timestamp at which the period holding ``now`` began."""
    local_day = datetime.fromtimestamp(now, zone).date()
    start = _midnight(_first_day(local_day, every), zone)
    if start.timestamp() > now:  # inside a skipped-midnight hour: still the previous period
        start = _midnight(_first_day(local_day - timedelta(days=1), every), zone)
    return start.timestamp()


def next_start(now: float, every: Every, zone: ZoneInfo) -> float:
    """The UTC timestamp at which the period after the one holding ``now`` begins."""
    first = datetime.fromtimestamp(period_start(now, every, zone), zone).date()
    return _midnight(_next_first_day(first, every), zone).timestamp()


def describe(timestamp: float, zone: ZoneInfo) -> str:
    """``2026-12-01 00:00 Europe/Berlin``: when an allowance refills, as a person reads it."""
    return datetime.fromtimestamp(timestamp, zone).strftime("%Y-%m-%d %H:%M ") + zone.key


def iso(timestamp: float, zone: ZoneInfo) -> str:
    """ISO 8601 with the zone's offset, for JSON (``2026-12-01T00:00:00+01:00``)."""
    return datetime.fromtimestamp(timestamp, zone).isoformat()

"""Stacked bar charts of daily usage, drawn on the server as SVG.

No chart library and no script: the Usage page works with JavaScript off, on a network with no
internet, and renders as fast as its template. Each bar has a ``<title>`` (the browser's tooltip,
read by screen readers), the chart an ``aria-label`` that sums it up, and the same numbers are in the
page's tables. Colours are CSS classes (``s0``..``s7``), so light and dark themes pick their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 720.0, 200.0  # the plot's own units; it stretches to its box (bars and lines only)
SERIES = 8  # colours; further models share the last ("other")


@dataclass(frozen=True, slots=True)
class Chart:
    html: str
    series: tuple[str, ...]  # the models in colour order, for the legend


def nice_ceiling(value: float) -> float:
    """The axis maximum: 1, 2, 2.5 or 5 times a power of ten, at or above ``value``."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * power:
            return step * power
    return 10.0 * power


def stacked_bars(days: Sequence[str], values: Mapping[tuple[str, str], float], series: Sequence[str], *,
                 title: str, fmt: Callable[[float], str]) -> Chart:
    """``values[(day, series)]``; one bar per day, one stacked segment per series (in ``series`` order).

    The axis labels are HTML beside the SVG, so they keep their size when the plot stretches to a
    phone's or a wide screen's width."""
    totals = [sum(values.get((day, s), 0.0) for s in series) for day in days]
    top = nice_ceiling(max(totals, default=0.0))
    slot = WIDTH / max(1, len(days))
    bar = max(1.0, slot * 0.72)
    label = f"{title}: {fmt(sum(totals))} over {len(days)} days, at most {fmt(max(totals, default=0))} a day"
    parts = ['<div class="chart-box">',
             '<div class="chart-y" aria-hidden="true">'
             + "".join(f"<span>{escape(fmt(top * f))}</span>" for f in (1.0, 0.5, 0.0)) + "</div>",
             f'<svg class="chart" viewBox="0 0 {WIDTH:g} {HEIGHT:g}" role="img" aria-label="{escape(label)}" '
             'preserveAspectRatio="none" xmlns="http://www.w3.org/2000/svg">']
    for fraction in (0.0, 0.5, 1.0):
        y = HEIGHT * (1 - fraction)
        parts.append(f'<line class="grid" x1="0" x2="{WIDTH:g}" y1="{y:.1f}" y2="{y:.1f}" '
                     'vector-effect="non-scaling-stroke"/>')
    for i, day in enumerate(days):
        x, y = i * slot + (slot - bar) / 2, HEIGHT
        for k, name in enumerate(series):
            value = values.get((day, name), 0.0)
            if value <= 0:
                continue
            h = HEIGHT * value / top
            y -= h
            parts.append(f'<rect class="s{min(k, SERIES - 1)}" x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" '
                         f'height="{max(h, 0.5):.1f}"><title>{escape(day)} {escape(name)}: '
                         f'{escape(fmt(value))}</title></rect>')
    parts.append("</svg>")
    ticks = [days[i][5:] for i in sorted({0, len(days) // 2, len(days) - 1})] if days else []
    parts.append('<div class="chart-x" aria-hidden="true">' + "".join(f"<span>{escape(t)}</span>" for t in ticks)
                 + "</div></div>")
    return Chart("".join(parts), tuple(series))

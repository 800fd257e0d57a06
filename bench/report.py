"""Turn a run's results into the one markdown table: rows are metrics, columns are targets.

``results`` maps a target name (direct, nginx, bare-aiohttp, lumen) to the plain dict that
bench/run.py measured for it; a target that failed has only ``{"error": "..."}``. Each row knows how
to read its value, how to print it and, when the brief sets one, the target lumen must meet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TARGETS = ("direct", "nginx", "bare-aiohttp", "lumen")
RSS_LIMIT_MIB = 80.0
RSS_GROWTH_MIB = 2.0  # "not growing": at most this much more at 100k requests than at 50k

Results = dict[str, dict[str, Any]]


def dig(result: dict[str, Any] | None, *path: str) -> Any:
    """``result[path[0]][path[1]]...`` or None when any step is missing."""
    for step in path:
        if not isinstance(result, dict) or step not in result:
            return None
        result = result[step]
    return result


def ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def count(value: float) -> str:
    return f"{value:,.0f}"


def mib(value: float) -> str:
    return f"{value:.1f}"


def text(value: Any) -> str:
    return str(value)


def yes_no(value: bool) -> str:
    return "yes" if value else "**no**"


def identical(parts: dict[str, bool]) -> str:
    return " / ".join(yes_no(parts[k]) for k in ("stream_usage", "stream_plain", "json"))


@dataclass(frozen=True)
class Row:
    label: str
    value: Callable[[dict[str, Any], Results], Any]
    fmt: Callable[[Any], str]
    target: str = ""
    met: Callable[[Results], bool | None] | None = None
    ratio: bool = True  # print lumen/direct, lumen/nginx, lumen/bare


def at(*path: str) -> Callable[[dict[str, Any], Results], Any]:
    return lambda result, _results: dig(result, *path)


def over_direct(*path: str) -> Callable[[dict[str, Any], Results], Any]:
    """The value minus direct's: the latency a proxy adds."""
    def value(result: dict[str, Any], results: Results) -> Any:
        mine, base = dig(result, *path), dig(results.get("direct"), *path)
        return None if mine is None or base is None else mine - base
    return value


def lumen_check(predicate: Callable[[dict[str, Any], Results], bool]) -> Callable[[Results], bool | None]:
    """Apply ``predicate`` to lumen's result; None (n/a) when a value it needs is missing."""
    def met(results: Results) -> bool | None:
        lumen = results.get("lumen")
        if not lumen or "error" in lumen:
            return None
        try:
            return bool(predicate(lumen, results))
        except (TypeError, KeyError):
            return None
    return met


def _soak(soak: dict[str, Any]) -> str:
    """RSS after each half of the soak, with the request counts (a --quick soak is shorter)."""
    (first, second), (n1, n2) = soak["rss_mib"], soak["at_requests"]
    return f"{mib(first)} @{n1 / 1000:.0f}k / {mib(second)} @{n2 / 1000:.0f}k"


def _rss_ok(lumen: dict[str, Any], _results: Results) -> bool:
    first, second = lumen["soak"]["rss_mib"]
    return bool(second < RSS_LIMIT_MIB and second - first <= RSS_GROWTH_MIB)


ROWS = (
    Row("(a) latency c=1, p50 (ms)", at("lat", "p50"), ms),
    Row("(a) latency c=1, p99 (ms)", at("lat", "p99"), ms),
    Row("(a) added latency c=1, p50 (ms)", over_direct("lat", "p50"), ms, "≤ 0.5",
        lumen_check(lambda r, rs: r["lat"]["p50"] - rs["direct"]["lat"]["p50"] <= 0.5), ratio=False),
    Row("(a) added latency c=1, p99 (ms)", over_direct("lat", "p99"), ms, "≤ 1.5",
        lumen_check(lambda r, rs: r["lat"]["p99"] - rs["direct"]["lat"]["p99"] <= 1.5), ratio=False),
    Row("(b) throughput c=32 (req/s)", at("c32", "rps"), count, "≥ 0.80 × bare",
        lumen_check(lambda r, rs: r["c32"]["rps"] >= 0.8 * rs["bare-aiohttp"]["c32"]["rps"])),
    Row("(b) latency c=32, p99 (ms)", at("c32", "p99"), ms),
    Row("(b) throughput c=128 (req/s)", at("c128", "rps"), count, "≥ 0.70 × own c=32",
        lumen_check(lambda r, rs: r["c128"]["rps"] >= 0.7 * r["c32"]["rps"])),
    Row("(b) latency c=128, p99 (ms)", at("c128", "p99"), ms),
    Row("(b) errors c=32 + c=128", lambda r, _: dig(r, "c32", "errors") + dig(r, "c128", "errors")
        if "c32" in r else None, count, "0",
        lumen_check(lambda r, rs: r["c32"]["errors"] + r["c128"]["errors"] == 0), ratio=False),
    Row("(c) stream c=16, TTFB p50 (ms)", at("s16", "ttfb_p50"), ms, "≤ direct + 2",
        lumen_check(lambda r, rs: r["s16"]["ttfb_p50"] - rs["direct"]["s16"]["ttfb_p50"] <= 2.0)),
    Row("(c) stream c=16, TTFB p99 (ms)", at("s16", "ttfb_p99"), ms),
    Row("(c) stream c=16, total p50 (ms)", at("s16", "total_p50"), ms),
    Row("(c) stream c=256, TTFB p50 (ms)", at("s256", "ttfb_p50"), ms),
    Row("(c) stream c=256, TTFB p99 (ms)", at("s256", "ttfb_p99"), ms),
    Row("(c) stream c=256, total p50 (ms)", at("s256", "total_p50"), ms),
    Row("(c) streams done c=16 / c=256", lambda r, _: f"{r['s16']['ok']:,} / {r['s256']['ok']:,}"
        if "s256" in r else None, text, ratio=False),
    Row("(c) stream errors c=16 / c=256", lambda r, _: f"{r['s16']['errors']} / {r['s256']['errors']}"
        if "s256" in r else None, text, "0 at c=256",
        lumen_check(lambda r, rs: r["s256"]["errors"] == 0 and r["s256"]["ok"] > 0), ratio=False),
    Row("(c) bytes = direct: stream+usage / stream / JSON", at("identical"), identical, "all yes",
        lumen_check(lambda r, rs: all(r["identical"].values())), ratio=False),
    Row("(d) proxy CPU per request c=32 (µs)", at("c32", "cpu_us"), count),
    Row("(d) proxy CPU per request c=128 (µs)", at("c128", "cpu_us"), count),
    Row("(d) proxy CPU per stream c=16 (ms)", at("s16", "cpu_ms"), ms, "≤ 3",
        lumen_check(lambda r, rs: r["s16"]["cpu_ms"] <= 3.0)),
    Row("(d) proxy CPU per stream c=256 (ms)", at("s256", "cpu_ms"), ms),
    Row("(d) proxy peak RSS, VmHWM (MiB)", at("peak_rss_mib"), mib),
    Row("soak: RSS at 50k / 100k requests (MiB)", lambda r, _: _soak(r["soak"]) if "soak" in r else None,
        text, f"< {RSS_LIMIT_MIB:.0f}, +≤ {RSS_GROWTH_MIB:.0f}",
        lumen_check(_rss_ok), ratio=False),
    Row("usage log: status-200 rows vs client 2xx", at("usage_check", "summary"), text, "keeps up",
        lumen_check(lambda r, rs: r["usage_check"]["ok"]), ratio=False),
    Row("coins: shown = initial - Σ cost", at("coins_check", "summary"), text, "exact",
        lumen_check(lambda r, rs: r["coins_check"]["ok"]), ratio=False),
    Row("graceful stop: exit code, seconds", lambda r, _: f"{r['exit_code']}, {r['exit_seconds']:.2f}s"
        if "exit_code" in r else None, text, ratio=False),
)


def _cell(row: Row, result: dict[str, Any] | None, results: Results) -> str:
    if not result or "error" in result:
        return "n/a"
    value = row.value(result, results)
    return "—" if value is None else row.fmt(value)


def _ratio(row: Row, results: Results, other: str) -> str:
    if not row.ratio:
        return ""
    mine, base = (row.value(results[n], results) if results.get(n) and "error" not in results[n] else None
                  for n in ("lumen", other))
    if not isinstance(mine, (int, float)) or not isinstance(base, (int, float)) or base == 0:
        return ""
    if math.isnan(mine) or math.isnan(base):
        return ""
    return f"{mine / base:.2f}×"


def table(results: Results) -> str:
    head = ["metric", *TARGETS, "lumen/direct", "lumen/nginx", "lumen/bare", "target (lumen)", "met?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        met = row.met(results) if row.met else None
        verdict = "" if row.met is None else "n/a" if met is None else yes_no(met)
        cells = [row.label, *(_cell(row, results.get(name), results) for name in TARGETS),
                 *(_ratio(row, results, other) for other in ("direct", "nginx", "bare-aiohttp")),
                 row.target, verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(results: Results) -> tuple[int, int]:
    """(targets met, targets that could be judged)."""
    judged = [row.met(results) for row in ROWS if row.met is not None]
    return sum(1 for v in judged if v), sum(1 for v in judged if v is not None)


def errors(results: Results) -> list[str]:
    return [f"- {name}: {results[name]['error']}" for name in TARGETS if "error" in results.get(name, {})]

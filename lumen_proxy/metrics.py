"""Prometheus metrics, one registry per app (no process globals, so test apps stay separate).

prometheus-client is the reference implementation of the text format; its counters cost about a
microsecond each, well inside our per-request budget.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .store import UsageRow

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("lumen_requests", "Requests by model, status and account",
                                ("model", "status", "account"), registry=r)
        self.latency = Histogram("lumen_request_duration_seconds", "End-to-end request duration",
                                 ("model",), buckets=_LATENCY_BUCKETS, registry=r)
        self.ttfb = Histogram("lumen_time_to_first_byte_seconds", "Time until the backend's first byte",
                              ("model",), buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("lumen_tokens", "Tokens billed", ("model", "kind"), registry=r)
        self.coins = Counter("lumen_coins", "Coins debited", ("model",), registry=r)
        self.refusals = Counter("lumen_rate_limit_refusals", "Requests refused by a rate limit",
                                ("model", "limit"), registry=r)
        self.inflight = Gauge("lumen_inflight_requests", "Requests in flight", registry=r)
        self.backend_up = Gauge("lumen_backend_up", "1 when the backend's breaker is closed",
                                ("model", "backend"), registry=r)

    def request_done(self, row: UsageRow, account: str) -> None:
        self.requests.labels(row.model, str(row.status), account).inc()
        self.latency.labels(row.model).observe(row.duration_ms / 1000)
        if row.ttfb_ms is not None:
            self.ttfb.labels(row.model).observe(row.ttfb_ms / 1000)
        if row.prompt_tokens:
            self.tokens.labels(row.model, "prompt").inc(row.prompt_tokens)
        if row.completion_tokens:
            self.tokens.labels(row.model, "completion").inc(row.completion_tokens)
        if row.cost:
            self.coins.labels(row.model).inc(row.cost / 1_000_000)

    def rate_limited(self, model: str, limit: str) -> None:
        self.refusals.labels(model, limit).inc()

    def render(self, backend_states: Callable[[], dict[tuple[str, str], bool]]) -> bytes:
        for (model, backend), up in backend_states().items():
            self.backend_up.labels(model, backend).set(1 if up else 0)
        return generate_latest(self.registry)

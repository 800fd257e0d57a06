"""Choosing a backend: round robin over the healthy ones, failover, and a circuit breaker.

A backend fails when it refuses the connection, times out connecting, or answers 5xx before any byte
went to the client; its 4xx is the client's problem and never counts. ``failures`` consecutive
failures open the breaker: the backend is skipped for ``cooldown`` seconds, then exactly one request
probes it and either closes the breaker or opens it again. One blip (fewer than ``failures``) changes
nothing. Breaker state is keyed by backend URL and model, so it survives a config reload.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from multidict import CIMultiDict

from .config import Backend, Breaker, Config, Model, Timeouts
from .errors import BackendUnavailable, UpstreamTimeout

log = logging.getLogger("lumen_proxy")
RETRY_AFTER_UNAVAILABLE = "10"


class Upstream(Protocol):
    """A response from a backend, HTTP or built in."""

    status: int
    content_type: str
    retry_headers: dict[str, str]  # a backend's own Retry-After on its 429, passed on to the client

    async def read(self) -> bytes: ...
    def chunks(self) -> AsyncIterator[bytes]: ...
    def close(self) -> None: ...


_RETRY_HEADERS = ("Retry-After", "retry-after-ms")


class HttpUpstream:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "application/json")
        self.retry_headers = {name: response.headers[name] for name in _RETRY_HEADERS
                              if name in response.headers} if response.status == 429 else {}

    async def read(self) -> bytes:
        return await self.response.read()

    def chunks(self) -> AsyncIterator[bytes]:
        return self.response.content.iter_any().__aiter__()  # no generator of our own per chunk

    def close(self) -> None:
        """Closing (not releasing) drops the connection, which tells the backend to stop generating."""
        if not self.response.closed:
            self.response.close()


@dataclass(slots=True)
class BreakerState:
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False
    up: bool = True

    def can_try(self, now: float) -> bool:
        if self.up or (now >= self.open_until and not self.probing):
            return True
        return False


class BackendPool:
    """Health and rotation for every backend of every model."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.states: dict[tuple[str, str], BreakerState] = {}
        self._turns: dict[str, itertools.count[int]] = {}
        self.breaker = Breaker()

    def state(self, backend: Backend) -> BreakerState:
        state = self.states.get((backend.url, backend.model))
        if state is None:
            state = self.states[(backend.url, backend.model)] = BreakerState()
        return state

    def candidates(self, model: Model) -> list[Backend]:
        """Backends to try in order: rotation among those whose breaker lets a request through."""
        now = self.clock()
        n = len(model.backends)
        if n == 1:
            return [b for b in model.backends if self.state(b).can_try(now)]
        turns = self._turns.get(model.name)
        if turns is None:
            turns = self._turns[model.name] = itertools.count()
        start = next(turns)
        ordered = [model.backends[(start + i) % n] for i in range(n)]
        return [b for b in ordered if self.state(b).can_try(now)]

    def begin(self, backend: Backend) -> None:
        state = self.state(backend)
        if not state.up:
            state.probing = True

    def succeeded(self, backend: Backend) -> None:
        state = self.state(backend)
        if not state.up:
            log.warning("backend %s is back up", backend.label)
        state.failures, state.up, state.probing = 0, True, False

    def failed(self, backend: Backend, reason: str) -> None:
        state = self.state(backend)
        state.failures += 1
        state.probing = False
        if state.failures >= self.breaker.failures or not state.up:
            if state.up:
                log.warning("backend %s is down after %d failures (%s)", backend.label, state.failures, reason)
            state.up = False
            state.open_until = self.clock() + self.breaker.cooldown

    def model_health(self, model: Model) -> dict[str, str]:
        return {b.label: "up" if self.state(b).up else "down" for b in model.backends}

    def is_model_up(self, model: Model) -> bool:
        return any(self.state(b).up for b in model.backends)


_NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding",
    "upgrade", "host", "content-length", "authorization", "cookie", "accept-encoding", "content-type",
    "expect", "proxy-connection",  # Expect was for us (curl sends it for large bodies); we have the body
})


def upstream_headers(incoming: Mapping[str, str], backend: Backend) -> CIMultiDict[str]:
    """Forward the client's end-to-end headers, minus its credentials; add the backend's key.

    Headers the client's ``Connection`` names are hop-by-hop too (RFC 9110 7.6.1). We ask for an
    uncompressed answer: bodies are relayed as bytes, without the backend's Content-Encoding.
    """
    connection = incoming.get("Connection")
    named = {n.strip().lower() for n in connection.split(",")} if connection else set()
    headers: CIMultiDict[str] = CIMultiDict()
    for key, value in incoming.items():
        lower = key.lower()
        if lower not in _NOT_FORWARDED and lower not in named and not lower.startswith("x-forwarded"):
            headers.add(key, value)
    headers["Content-Type"] = "application/json"
    headers["Accept-Encoding"] = "identity"
    if backend.api_key:
        headers["Authorization"] = f"Bearer {backend.api_key}"
    return headers


class HttpClient:
    """The one ClientSession of the process (keep-alive connection reuse to every backend)."""

    def __init__(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
            # A backend's cookies must never be replayed on another user's request (and the jar's
            # filtering costs microseconds on every request).
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    @property
    def timeouts(self) -> Timeouts:
        return self._timeouts

    @timeouts.setter
    def timeouts(self, timeouts: Timeouts) -> None:
        """Build the ClientTimeout once per config, not per request."""
        self._timeouts = timeouts
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect, connect=timeouts.connect,
                                              sock_read=timeouts.first_byte)

    async def post(self, backend: Backend, path: str, body: bytes, headers: CIMultiDict[str]) -> HttpUpstream:
        response = await self.session.post(backend.url + path, data=body, headers=headers, timeout=self._timeout,
                                           allow_redirects=False)
        return HttpUpstream(response)

    async def probe(self, backend: Backend) -> bool:
        """A cheap active health check: GET {url}/models."""
        headers = {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}
        timeout = aiohttp.ClientTimeout(total=self.timeouts.connect + 5)
        try:
            async with self.session.get(backend.url + "/models", headers=headers, timeout=timeout) as resp:
                await resp.read()
                return resp.status < 500
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def close(self) -> None:
        await self.session.close()


class Dialer(Protocol):
    async def __call__(self, backend: Backend) -> Upstream: ...


async def connect(pool: BackendPool, model: Model, dial: Dialer) -> tuple[Backend, Upstream]:
    """Try the candidates in turn until one answers below 500; raise 503/504 when none can."""
    timed_out = False
    for backend in pool.candidates(model):
        pool.begin(backend)
        try:
            upstream = await dial(backend)
        except TimeoutError:  # first: aiohttp's timeouts are also ClientConnectionErrors
            pool.failed(backend, "timeout")
            timed_out = True
            continue
        except (aiohttp.ClientError, ConnectionError) as exc:  # refused, reset, or not HTTP at all
            pool.failed(backend, type(exc).__name__)
            continue
        if upstream.status >= 500:
            pool.failed(backend, f"HTTP {upstream.status}")
            upstream.close()
            continue
        pool.succeeded(backend)
        return backend, upstream
    if timed_out:
        raise UpstreamTimeout(f"The backend for `{model.name}` did not answer in time.")
    raise BackendUnavailable(f"Model backend for `{model.name}` is currently unavailable. Retry later.",
                             headers={"Retry-After": RETRY_AFTER_UNAVAILABLE})


async def check_backends(pool: BackendPool, client: HttpClient, config: Config) -> None:
    """One round of active health checks over every HTTP backend."""
    backends = [b for m in config.models for b in m.backends if not b.is_builtin]
    results = await asyncio.gather(*(client.probe(b) for b in backends))
    for backend, ok in zip(backends, results, strict=True):
        state = pool.state(backend)
        if ok and not state.up:
            pool.succeeded(backend)
        elif not ok and state.up:
            state.failures = pool.breaker.failures - 1
            pool.failed(backend, "health check")

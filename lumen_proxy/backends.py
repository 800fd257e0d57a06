"""Choosing a backend: round robin over the healthy ones, failover, and a circuit breaker.

The breaker takes a backend out only on evidence that the backend itself is broken, so that no key
holder can take a model down for others:

- Strong evidence counts at once: a refused or reset connection, an answer that is not HTTP, a
  connect timeout, a 502 or 503 from the backend, a failed health check.
- Ambiguous evidence may be the request's own doing: no first byte within ``timeouts.first_byte``
  (a long generation), any other 5xx (a 500 for this body), an exception we did not foresee. It
  counts only once requests of at least two accounts have seen it since the backend's last success.

``failures`` consecutive failures that count open the breaker; one blip changes nothing. An open
backend is skipped for ``cooldown`` seconds, then exactly one request probes it, and the probe always
ends: a success closes the breaker, a failure that counts opens it for another cooldown, anything
else (the client left, one account's ambiguous failure) frees the slot for the next request, and a
probe still out after ``connect + first_byte`` seconds lets another request probe. A 4xx is the
client's problem and never counts.

A request moves on to the next backend after strong evidence or a 5xx, but a first-byte timeout is
a 504 at once: an already slow model is not sent the same request twice. When no backend can serve,
the 503's ``Retry-After`` is the time until one may be tried again, with ``x-should-retry: false``
when that is longer than an SDK's retries could usefully wait. Breaker state is keyed by backend URL
and model, so it survives a config reload.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import warnings
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import payload
from multidict import CIMultiDict

from .config import Backend, Breaker, Config, Model, Timeouts
from .errors import BackendUnavailable, LumenError, UpstreamTimeout
from .fairshare import FairShare, Gate, QueueTimeout

log = logging.getLogger("lumen_proxy")
# Seconds: the openai SDKs retry a 503 twice, after 0.5-1 s of backoff or after its Retry-After. A
# longer wait for a backend only holds the caller up, so the 503 then says x-should-retry: false.
SDK_PATIENCE = 2.0
BACKEND_DOWN = frozenset({502, 503})  # the backend (or the proxy in front of it) says it cannot serve


class Upstream(Protocol):
    """A response from a backend, HTTP or built in."""

    status: int
    content_type: str
    retry_headers: dict[str, str]  # a backend's own Retry-After on its 429, passed on to the client

    async def read(self, limit: int) -> bytes: ...
    def chunks(self) -> AsyncIterator[bytes]: ...
    def close(self) -> None: ...


class BadAnswer(Exception):
    """The backend's answer cannot be relayed: too large, or in an encoding we cannot decode."""


_RETRY_HEADERS = ("Retry-After", "retry-after-ms")
_DECODED = 1024 * 1024  # decompress at most this much per step, so a small bomb cannot allocate a large one
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class HttpUpstream:
    """An aiohttp response, decoded if the backend compressed it although we asked it not to."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "application/json")
        self.retry_headers = {name: response.headers[name] for name in _RETRY_HEADERS
                              if name in response.headers} if response.status == 429 else {}
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        self.wbits = None if encoding in ("", "identity") else _WBITS.get(encoding, -1)

    def _decoder(self) -> Any:
        if self.wbits == -1:
            raise BadAnswer(f"the backend answered in {self.response.headers['Content-Encoding']!r}, "
                            "an encoding Lumen cannot decode (it asks for identity)")
        return zlib.decompressobj(self.wbits) if self.wbits is not None else None

    async def read(self, limit: int) -> bytes:
        """The whole body (decoded), or BadAnswer when it is over ``limit`` bytes."""
        decoder = self._decoder()
        length = self.response.content_length
        if decoder is None and length is not None and length > limit:
            raise BadAnswer(f"the answer is {length} bytes, over the limit of {limit}")
        parts: list[bytes] = []
        size = 0
        async for chunk in self.response.content.iter_any():
            for piece in _decode(decoder, chunk):
                size += len(piece)
                if size > limit:
                    raise BadAnswer(f"the answer is over the limit of {limit} bytes")
                parts.append(piece)
        if decoder is not None and not decoder.eof:
            raise BadAnswer("the compressed answer is truncated")
        self.response.release()  # read to the end: the connection goes back to the pool (close() would drop it)
        return b"".join(parts)

    def chunks(self) -> AsyncIterator[bytes]:
        if self.wbits is None:
            return self.response.content.iter_any().__aiter__()  # no generator of our own per chunk
        return self._decoded_chunks()

    async def _decoded_chunks(self) -> AsyncIterator[bytes]:
        decoder = self._decoder()
        async for chunk in self.response.content.iter_any():
            for piece in _decode(decoder, chunk):
                yield piece

    def close(self) -> None:
        """Closing (not releasing) drops the connection, which tells the backend to stop generating."""
        if not self.response.closed:
            self.response.close()


def _decode(decoder: Any, chunk: bytes) -> list[bytes]:
    """``chunk`` decompressed a bounded step at a time (or as is, without a decoder)."""
    if decoder is None:
        return [chunk]
    try:
        pieces = [decoder.decompress(chunk, _DECODED)]
        while decoder.unconsumed_tail:
            pieces.append(decoder.decompress(decoder.unconsumed_tail, _DECODED))
    except zlib.error as exc:
        raise BadAnswer(f"the compressed answer is corrupt: {exc}") from None
    return [p for p in pieces if p]


@dataclass(slots=True)
class BreakerState:
    failures: int = 0  # strong evidence since the last success
    suspect: int = 0  # ambiguous failures since the last success ...
    accounts: set[int | None] = field(default_factory=set)  # ... and whose requests saw them (None: unknown)
    open_until: float = 0.0
    probe_until: float = 0.0  # while a probe is out: when another request may probe instead
    up: bool = True

    def counted(self) -> int:
        """The failures that count: ambiguous ones only once two accounts have seen them."""
        return self.failures + (self.suspect if len(self.accounts) > 1 else 0)

    def can_try(self, now: float) -> bool:
        return self.up or (now >= self.open_until and now >= self.probe_until)

    def ready_in(self, now: float) -> float:
        """Seconds until a request may go to this backend; 0 while a probe is out (it may close it now)."""
        if self.up or now < self.probe_until:
            return 0.0
        return max(self.open_until - now, 0.0)


class BackendPool:
    """Health and rotation for every backend of every model."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.states: dict[tuple[str, str], BreakerState] = {}
        self._turns: dict[str, itertools.count[int]] = {}
        self.breaker = Breaker()
        self.timeouts = Timeouts()  # how long a probe may be out before another request probes

    def state(self, backend: Backend) -> BreakerState:
        state = self.states.get((backend.url, backend.model))
        if state is None:
            state = self.states[(backend.url, backend.model)] = BreakerState()
        return state

    def candidates(self, model: Model, backends: tuple[Backend, ...] | None = None) -> list[Backend]:
        """Backends to try in order: rotation among those (default: the model's) whose breaker lets a
        request through."""
        now = self.clock()
        if backends is None:
            backends = model.backends
        n = len(backends)
        if n == 1:
            return [b for b in backends if self.state(b).can_try(now)]
        turns = self._turns.get(model.name)
        if turns is None:
            turns = self._turns[model.name] = itertools.count()
        start = next(turns)
        ordered = [backends[(start + i) % n] for i in range(n)]
        return [b for b in ordered if self.state(b).can_try(now)]

    def begin(self, backend: Backend) -> bool:
        """Whether a request may go to ``backend`` now; the first after a cooldown takes the probe slot."""
        state = self.state(backend)
        if state.up:
            return True
        now = self.clock()
        if not state.can_try(now):  # another request took the probe while this one tried elsewhere
            return False
        state.probe_until = now + self.timeouts.connect + self.timeouts.first_byte
        return True

    def abandoned(self, backend: Backend) -> None:
        """The request ended before the backend answered: nothing learnt; a probe frees its slot."""
        self.state(backend).probe_until = 0.0

    def succeeded(self, backend: Backend) -> None:
        state = self.state(backend)
        if not state.up:
            log.warning("backend %s is back up", backend.label)
        state.failures = state.suspect = 0
        state.accounts.clear()
        state.up, state.probe_until = True, 0.0

    def failed(self, backend: Backend, reason: str, *, ambiguous: bool = False, account: int | None = None) -> None:
        """Count a failure of ``backend``. An ``ambiguous`` one may be the request's own doing: it is
        put down to ``account`` (None: a caller we cannot tell apart) and counts from two accounts on."""
        state = self.state(backend)
        state.probe_until = 0.0  # a probe ends here, whatever it found
        if ambiguous:
            state.suspect += 1
            state.accounts.add(account)
            if len(state.accounts) < 2:
                return
        else:
            state.failures += 1
        if state.up and state.counted() < self.breaker.failures:
            return
        if state.up:
            log.warning("backend %s is down after %d failures (last: %s)", backend.label, state.counted(), reason)
        state.up = False
        state.open_until = self.clock() + self.breaker.cooldown

    def unavailable(self, model: Model) -> BackendUnavailable:
        """The 503 when no backend can serve: when one may be tried again, and whether to wait for it."""
        now = self.clock()
        wait = min(self.state(b).ready_in(now) for b in model.backends)
        millis = math.ceil(wait * 1000) if wait > 0 else 1000  # failed just now: a second's pause
        headers = {"Retry-After": str(-(-millis // 1000)), "retry-after-ms": str(millis)}
        if wait <= SDK_PATIENCE:
            return BackendUnavailable(f"Model backend for `{model.name}` is currently unavailable. Retry later.",
                                      headers=headers)
        headers["x-should-retry"] = "false"
        return BackendUnavailable(f"Every backend of `{model.name}` is failing; the next one will be tried in "
                                  f"{headers['Retry-After']} s.", headers=headers)

    def model_health(self, model: Model) -> dict[str, str]:
        return {b.label: "up" if self.state(b).up else "down" for b in model.backends}

    def is_model_up(self, model: Model) -> bool:
        return any(self.state(b).up for b in model.backends)


_FORWARDED = ("Accept",)
"""Client headers a backend may see. Everything else (the client's credentials, cookies, SDK telemetry,
``OpenAI-Organization`` / ``OpenAI-Project``, which would let a client choose whom OpenAI bills, and
``Content-Encoding``, which no longer describes the body we send) stays here."""


def upstream_headers(incoming: Mapping[str, str], backend: Backend, request_id: str = "",
                     forwarded: tuple[str, ...] = _FORWARDED, x_api_key: bool = False) -> CIMultiDict[str]:
    """The headers Lumen means to send: an allow list of the client's (``forwarded``: the endpoint's),
    then the backend's own.

    We ask for an uncompressed answer (bodies are relayed as bytes); the backend's ``api_key`` and its
    configured ``headers`` (organisation, project, a custom gateway's) come from the config only. With
    ``x_api_key`` the key also goes as ``x-api-key``, the header Anthropic's API reads.
    """
    headers: CIMultiDict[str] = CIMultiDict()
    for name in forwarded:
        value = incoming.get(name)
        if value is not None:
            headers[name] = value
    headers["Content-Type"] = "application/json"
    headers["Accept-Encoding"] = "identity"
    if request_id:
        headers["X-Request-ID"] = request_id  # the backend's logs can then be matched with ours
    if backend.api_key:
        headers["Authorization"] = f"Bearer {backend.api_key}"
        if x_api_key:
            headers["x-api-key"] = backend.api_key
    headers.update(backend.headers)
    return headers


def _payload(body: bytes) -> bytes | payload.BytesPayload:
    """The body as aiohttp sends it. Over 1 MiB aiohttp warns that raw bytes "might lock the event loop";
    they do not (the transport buffers one write), and its advice, BytesIO, costs an executor hop per 64 KiB."""
    if len(body) <= payload.TOO_LARGE_BYTES_BODY:
        return body
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        return payload.BytesPayload(body, content_type="application/json")


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
        response = await self.session.post(backend.url + path, data=_payload(body), headers=headers,
                                           timeout=self._timeout, allow_redirects=False)
        return HttpUpstream(response)

    async def send(self, method: str, backend: Backend, path: str, body: bytes | None,
                   headers: CIMultiDict[str]) -> HttpUpstream:
        """Any other call (the Responses API's stateful ones); ``path`` may carry a query string."""
        if body is None:
            del headers["Content-Type"]
        response = await self.session.request(method, backend.url + path, data=body, headers=headers,
                                              timeout=self._timeout, allow_redirects=False)
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


@dataclass(frozen=True, slots=True)
class Turn:
    """What the fair queue needs of a request that may wait for a slot (fairshare.py)."""

    share: FairShare
    account: int
    weight: float
    cost: int  # its expected tokens
    timeout: float


class SlotUpstream:
    """An upstream that holds a backend slot until the backend is done with it: its whole answer read
    (a stream: its last chunk), else until it is closed. The slot goes to the next waiter before the
    answer is relayed to the client, so the backend's slots never idle while Lumen writes."""

    def __init__(self, upstream: Upstream, share: FairShare, gate: Gate, account: int) -> None:
        self.upstream, self.share, self.account = upstream, share, account
        self.gate: Gate | None = gate
        self.status, self.content_type = upstream.status, upstream.content_type
        self.retry_headers = upstream.retry_headers

    async def read(self, limit: int) -> bytes:
        data = await self.upstream.read(limit)
        self._release()
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.upstream.chunks():
            yield chunk
        self._release()

    def close(self) -> None:
        self.upstream.close()
        self._release()

    def _release(self) -> None:
        if self.gate is not None:
            gate, self.gate = self.gate, None
            self.share.release(gate, self.account)


async def connect(pool: BackendPool, model: Model, dial: Dialer, *, account: int | None = None,
                  backends: tuple[Backend, ...] | None = None, turn: Turn | None = None) -> tuple[Backend, Upstream]:
    """Try the candidates in turn until one answers below 500; 504 on a first-byte timeout, else 503.

    ``account`` is the caller's: an ambiguous failure is put down to it (see the module docstring).
    ``backends``: those that may serve this request (default: all of the model's). With ``turn``, a
    backend with ``max_concurrency`` is tried only with one of its slots; when every candidate is
    gated and full, the request waits in the fair queue for whichever frees a slot first.
    """
    candidates = pool.candidates(model, backends)
    if turn is None:
        for backend in candidates:
            if pool.begin(backend):
                upstream = await _attempt(pool, model, backend, dial, account)
                if upstream is not None:
                    return backend, upstream
        raise pool.unavailable(model)
    tried: set[int] = set()
    while True:
        full: list[tuple[Gate, Backend]] = []
        for i, backend in enumerate(candidates):
            if i in tried:
                continue
            gate = turn.share.gate(backend)
            if gate is not None and not turn.share.take(gate, turn.account):
                full.append((gate, backend))
                continue
            tried.add(i)
            found = await _attempt_with_slot(pool, model, backend, dial, turn, gate)
            if found is not None:
                return backend, found
        if not full:
            raise pool.unavailable(model)
        gate = await _wait(turn, model, [g for g, _ in full])
        backend = next(b for g, b in full if g is gate)
        tried.add(candidates.index(backend))
        found = await _attempt_with_slot(pool, model, backend, dial, turn, gate)
        if found is not None:
            return backend, found


async def _wait(turn: Turn, model: Model, gates: list[Gate]) -> Gate:
    try:
        return await turn.share.wait(gates, account=turn.account, model=model.name, weight=turn.weight,
                                     cost=turn.cost, within=turn.timeout)
    except QueueTimeout as late:
        raise BackendUnavailable(
            f"Every backend of `{model.name}` is busy: this request waited {late.waited:.3g} s (queue_timeout) "
            f"with {late.ahead} requests ahead of it. Retry later.",
            headers={"Retry-After": "5", "retry-after-ms": "5000"}) from None


async def _attempt_with_slot(pool: BackendPool, model: Model, backend: Backend, dial: Dialer, turn: Turn,
                             gate: Gate | None) -> Upstream | None:
    """:func:`_attempt` holding ``gate``'s slot (if any): kept by the answer, freed on every other way out."""
    upstream = None
    try:
        if pool.begin(backend):
            upstream = await _attempt(pool, model, backend, dial, turn.account)
    finally:
        if upstream is None and gate is not None:
            turn.share.release(gate, turn.account)
    if upstream is None or gate is None:
        return upstream
    return SlotUpstream(upstream, turn.share, gate, turn.account)


async def _attempt(pool: BackendPool, model: Model, backend: Backend, dial: Dialer,
                   account: int | None) -> Upstream | None:
    """The backend's answer, or None to try the next one. Every way out tells the pool (succeeded,
    failed or abandoned), so no path leaves a probe out."""
    try:
        upstream = await dial(backend)
    except aiohttp.ConnectionTimeoutError:  # first: also a TimeoutError. The backend could not be reached.
        pool.failed(backend, "connect timeout")
        return None
    except TimeoutError as exc:  # no first byte in time: perhaps a long generation; never sent twice
        pool.failed(backend, "first-byte timeout", ambiguous=True, account=account)
        # The SDKs would send it twice more to a model already too slow for it: they must not.
        raise UpstreamTimeout(f"The backend for `{model.name}` did not answer in time.",
                              headers={"x-should-retry": "false"}) from exc
    except (aiohttp.ClientError, ConnectionError) as exc:  # refused, reset, or not HTTP at all
        pool.failed(backend, type(exc).__name__)
        return None
    except (asyncio.CancelledError, LumenError):  # the client left, or its body cannot be sent: nothing learnt
        pool.abandoned(backend)
        raise
    except Exception:  # a bug, perhaps set off by this request's body: like a 500 for it
        pool.failed(backend, "unexpected error", ambiguous=True, account=account)
        raise
    if upstream.status >= 500:
        upstream.close()
        pool.failed(backend, f"HTTP {upstream.status}", ambiguous=upstream.status not in BACKEND_DOWN,
                     account=account)
        return None
    pool.succeeded(backend)
    return upstream


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

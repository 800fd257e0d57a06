"""The one generic relay for every model-carrying POST (chat, completions, embeddings).

Checks run in a fixed order so that each refusal reveals and costs as little as possible:
authentication (401), body (400/413), model (404/403), rate limit (429), coins (402). Then the body
goes upstream unchanged but for ``model`` (and ``stream_options`` when we ask for usage), and the
answer comes back as the backend sent it: non-stream bodies verbatim, streams byte for byte through
:class:`SseScanner`. Whatever happens after the hold, ``finally`` settles it and records a usage row,
without awaiting, so even a handler cancelled by a disconnecting client bills and releases.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from . import billing
from .auth import Principal, account_limits, require_model
from .backends import Upstream, connect, upstream_headers
from .builtin import EchoUpstream
from .config import Backend, Model
from .errors import (
    REQUEST_ID,
    BadGateway,
    BadRequest,
    InsufficientQuota,
    LumenError,
    PayloadTooLarge,
    RateLimited,
    UpstreamTimeout,
)
from .ratelimit import LimitSpec, Refusal, Ticket
from .runtime import RUNTIME, Runtime
from .sse import SseScanner, StreamTooLarge
from .store import UsageRow

STREAMABLE = ("/chat/completions", "/completions")


@dataclass(slots=True)
class Call:
    """What one request did, for its usage row, its log line and its Server-Timing header."""

    request_id: str
    principal: Principal
    model: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    wall: float = field(default_factory=time.time)
    status: int = 0
    backend: str | None = None
    usage: dict[str, Any] | None = None
    estimate: tuple[int, int] = (0, 0)
    partial: bool = False
    upstream_at: float | None = None
    first_byte_at: float | None = None
    prompt: Any = None  # only with log_prompts: true (debugging); never logged otherwise

    def ms_since_start(self, at: float | None = None) -> float:
        return ((at if at is not None else time.perf_counter()) - self.started) * 1000

    def server_timing(self) -> str:
        total = self.ms_since_start()
        upstream = 0.0
        if self.upstream_at is not None:
            upstream = ((self.first_byte_at or time.perf_counter()) - self.upstream_at) * 1000
        return f"proxy;dur={max(total - upstream, 0):.2f}, upstream;dur={upstream:.2f}"


async def read_json_body(request: web.Request, limit: int) -> tuple[bytes, dict[str, Any]]:
    too_large = f"Request body is larger than the limit of {limit / (1024 * 1024):.3g} MiB."
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(too_large)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # a chunked body has no Content-Length to judge first
        raise PayloadTooLarge(too_large) from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("We could not parse the JSON body of your request. Send valid JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("You must provide a model parameter (a string).", param="model")
    return raw, body


def limit_subjects(rt: Runtime, principal: Principal, model: Model) -> list[tuple[str, LimitSpec]]:
    """Per key: the defaults; per account: its own limits, else the defaults; per model: its own."""
    account = principal.account
    subjects = [(f"key:{principal.key_id}", rt.config.limits),
                (f"account:{account.id}", account_limits(rt.config.limits, account))]
    if model.limits is not None:
        subjects.append((f"account:{account.id}:{model.name}", model.limits))
    return subjects


def upstream_body(raw: bytes, body: Mapping[str, Any], backend: Backend, path: str) -> tuple[bytes, bool]:
    """The body for ``backend``, and whether we injected ``include_usage`` (and must drop its chunk)."""
    inject = (backend.inject_stream_usage and body.get("stream") is True and path in STREAMABLE)
    options = body.get("stream_options")
    client_asked = isinstance(options, dict) and options.get("include_usage") is True
    inject = inject and not client_asked
    if backend.model == body["model"] and not inject:
        return raw, False
    changed = {**body, "model": backend.model}
    if inject:
        changed["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return orjson.dumps(changed), inject


async def relay(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    principal = rt.view.authenticate(request.headers.get("Authorization"))
    path = request.path[3:]  # "/v1/chat/completions" -> "/chat/completions"
    call = Call(request[REQUEST_ID], principal, "", request.path)  # a row even for a bad body
    ticket: Ticket | None = None
    hold: billing.Hold | None = None
    model: Model | None = None
    rt.metrics.inflight.inc()
    try:
        raw, body = await read_json_body(request, rt.config.max_body_bytes)
        call.model = body["model"][:200]
        if rt.config.log_prompts:
            call.prompt = body.get("messages", body.get("prompt", body.get("input")))
        model = require_model(rt.config, principal.account, body["model"])
        prompt_estimate = billing.estimate_prompt_tokens(len(raw))
        completion_cap = billing.max_output_tokens(body, model, request.path)
        admission = rt.limiter.admit(limit_subjects(rt, principal, model), prompt_estimate + completion_cap)
        if isinstance(admission, Refusal):
            rt.metrics.rate_limited(model.name, admission.limit)
            raise RateLimited(admission.message, headers=admission.headers())
        ticket = admission
        hold = rt.wallets.place_hold(principal.account.id,
                                     billing.cost(model.price, prompt_estimate, completion_cap))
        if hold is None:
            raise InsufficientQuota(
                "You do not have enough coins for this request (its worst case: prompt plus max_tokens). "
                "Ask your administrator to add coins, or lower max_tokens.",
                headers=ticket.headers(),
            )
        call.estimate = (billing.typical_prompt_tokens(len(raw)), 0)  # billed only if no usage comes
        return await forward(request, rt, call, model, raw, body, path, ticket)
    except LumenError as exc:
        call.status = exc.status
        if ticket is not None:
            exc.headers = {**ticket.headers(), **exc.headers}
        raise
    except asyncio.CancelledError:
        call.status, call.partial = call.status or 499, True  # the client went away
        raise
    except Exception:
        call.status, call.partial = 500, call.first_byte_at is not None  # a bug: logged by the middleware
        raise
    finally:
        rt.metrics.inflight.dec()  # before finish: nothing may keep a cancelled request counted
        finish(rt, call, model, hold, ticket)


def finish(rt: Runtime, call: Call, model: Model | None, hold: billing.Hold | None,
           ticket: Ticket | None) -> None:
    """Settle the hold, reconcile the limiter and record the row. Never awaits."""
    prompt, completion, estimated = tokens_of(call)
    price_cost = billing.cost(model.price, prompt, completion) if model is not None else 0
    if hold is not None:
        rt.wallets.settle(hold, price_cost)
    else:
        price_cost = 0
    if ticket is not None:
        ticket.reconcile(prompt + completion)
        ticket.release()
    row = UsageRow(
        request_id=call.request_id, time=call.wall, account_id=call.principal.account.id,
        key_id=call.principal.key_id, model=call.model, endpoint=call.endpoint, status=call.status,
        backend=call.backend, prompt_tokens=prompt, completion_tokens=completion, cost=price_cost,
        estimated=estimated, partial=call.partial, duration_ms=call.ms_since_start(),
        ttfb_ms=call.ms_since_start(call.first_byte_at) if call.first_byte_at else None,
        details=_details(call.usage),
    )
    rt.usage.record(row, call.principal.account.name, prompt=call.prompt)
    rt.metrics.request_done(row, call.principal.account.name)


def tokens_of(call: Call) -> tuple[int, int, bool]:
    """Real counts when the backend sent them; else the estimate, unless nothing was delivered."""
    usage = call.usage
    if usage is not None:
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
        return prompt, completion, False
    cut_off = call.partial and call.estimate[1] > 0  # a stream that broke after events went out
    if call.first_byte_at is None or (call.status >= 400 and not cut_off):
        return 0, 0, False
    return call.estimate[0], max(call.estimate[1], 1), True


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _details(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    details = {k: v for k, v in usage.items() if k.endswith("_details") and v}
    return details or None


async def forward(request: web.Request, rt: Runtime, call: Call, model: Model, raw: bytes,
                  body: dict[str, Any], path: str, ticket: Ticket) -> web.StreamResponse:
    injected: dict[str, bool] = {}

    async def dial(backend: Backend) -> Upstream:
        send, injected[backend.url] = upstream_body(raw, body, backend, path)
        call.backend = backend.label
        call.upstream_at = time.perf_counter()
        if backend.is_builtin:
            return EchoUpstream(path, orjson.loads(send))
        return await rt.client.post(backend, path, send, upstream_headers(request.headers, backend))

    backend, upstream = await connect(rt.pool, model, dial)
    call.first_byte_at = time.perf_counter()
    headers = {"x-request-id": call.request_id, **ticket.headers()}
    try:
        if body.get("stream") is True and upstream.status == 200 and "event-stream" in upstream.content_type:
            return await relay_stream(request, call, upstream, headers, injected[backend.url])
        return await relay_whole(call, upstream, headers)
    finally:
        upstream.close()


async def relay_whole(call: Call, upstream: Upstream, headers: dict[str, str]) -> web.Response:
    try:
        data = await upstream.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _broken(exc) from exc
    call.status = upstream.status
    if upstream.status == 200:
        call.usage = _usage_of(data)
        call.estimate = (call.estimate[0], len(data) // 4)
    headers["Server-Timing"] = call.server_timing()
    headers["Content-Type"] = upstream.content_type
    headers.update(upstream.retry_headers)
    return web.Response(status=upstream.status, body=data, headers=headers)


def _usage_of(data: bytes) -> dict[str, Any] | None:
    if b'"usage"' not in data:
        return None
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    return usage if isinstance(usage, dict) else None


def _broken(exc: BaseException) -> LumenError:
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("The model backend stopped answering.")
    return BadGateway("The model backend sent a broken response.")


async def relay_stream(request: web.Request, call: Call, upstream: Upstream, headers: dict[str, str],
                       injected: bool) -> web.StreamResponse:
    """Pass SSE through as it arrives. Once the first byte is out, errors can only end the stream."""
    scanner = SseScanner(drop_usage_chunk=injected)
    headers.update({"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no", "Server-Timing": call.server_timing()})
    response = web.StreamResponse(status=200, headers=headers)
    call.status = 200
    await response.prepare(request)
    chunks = upstream.chunks().__aiter__()
    try:
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            out = scanner.feed(chunk)
            if out:
                try:
                    await response.write(out)
                except ConnectionError:
                    call.status, call.partial = 499, True  # the client went away
                    return response
        tail = scanner.finish()
        if tail:
            await response.write(tail)
        call.partial = not scanner.done
    except (aiohttp.ClientError, TimeoutError, StreamTooLarge, ConnectionError):
        call.status, call.partial = 502, True
        await _end_with_error(response)
        return response
    finally:
        call.usage = scanner.usage
        call.estimate = (call.estimate[0], scanner.events)
    await response.write_eof()
    return response


async def _end_with_error(response: web.StreamResponse) -> None:
    """Tell an SSE client the backend broke (the SDKs raise on an error event), then end."""
    event = b"data: " + BadGateway("The model backend broke off the stream.").body() + b"\n\n"
    try:
        await response.write(event)
        await response.write_eof()
    except ConnectionError:
        pass

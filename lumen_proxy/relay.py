"""The one generic relay for every model-carrying POST; what differs per path is in :mod:`.endpoints`.

Checks run in a fixed order so that each refusal reveals and costs as little as possible:
authentication (401), body (400/413), model (404/403), rate limit (429), coins (402). The hold and the
token admission are the request's worst case (:func:`.endpoints.worst_case`); the body goes upstream as
the object Lumen checked, with ``model``, a missing output cap and ``stream_options`` set
(:func:`.endpoints.upstream_body`), and the answer comes back as the backend sent it: non-stream bodies
verbatim, streams byte for byte through :class:`SseScanner`. Whatever happens after the hold,
``finally`` settles it and records a usage row, without awaiting, so even a handler cancelled by a
disconnecting client bills and releases. What is billed is the backend's usage when it is valid, capped
at the request's bound; else an estimate (row marked ``estimated``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from . import billing
from .auth import Principal, account_limits, allowed_models, require_model, visible_models
from .backends import BadAnswer, Turn, Upstream, connect, upstream_headers
from .billing import to_coins
from .builtin import EchoUpstream
from .config import Backend, Config, Model, Price
from .delegation import principal_of
from .endpoints import ENDPOINTS, Endpoint, Usage, WorstCase, check_fields, upstream_body, worst_case
from .errors import (
    REQUEST_ID,
    STREAM_STARTED,
    BadGateway,
    BadRequest,
    InsufficientQuota,
    InternalError,
    LumenError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    UpstreamTimeout,
)
from .owners import holder
from .periods import describe, next_start
from .ratelimit import Admission, LimitSpec, Refusal
from .runtime import RUNTIME, Runtime
from .sse import SseScanner, StreamTooLarge
from .store import AccountRow, UsageRow

log = logging.getLogger("lumen_proxy")
NO_MODEL = "-"
"""The model of a request refused before its model was known: a client's string never becomes a label."""
NO_COINS = ("You do not have enough coins for this request (its worst case: prompt plus max_tokens for each choice). "
            "Ask your administrator to add coins, or lower max_tokens.")
FREE = Price()
MAX_JSON_VALUES = 250_000
BYTES_PER_JSON_VALUE = 32


@dataclass(slots=True)
class Call:
    """What one request did, for its usage row, its log line and its Server-Timing header."""

    request_id: str
    principal: Principal
    model: str
    endpoint: Endpoint
    started: float = field(default_factory=time.perf_counter)
    wall: float = field(default_factory=time.time)
    status: int = 0
    backend: Backend | None = None  # the one that answered (or was last tried)
    usage: Any = None  # the backend's "usage" object, as sent: validated when billed
    response_id: str | None = None  # the id of a response the backend stores (Responses API)
    worst: WorstCase | None = None
    estimate: tuple[int, int] = (0, 0)  # billed only when no valid usage comes
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


async def read_body(request: web.Request, limit: int, within: float) -> bytes:
    """The body, at most ``limit`` bytes, within ``within`` seconds (a slow sender holds a slot, not the loop)."""
    if request.content_length is not None and request.content_length > limit:
        raise _over(limit)
    content = request.content
    if content.is_eof():  # the usual small body came with the headers: no deadline, no iteration to pay for
        whole = content.read_nowait(-1)
        if len(whole) > limit:
            raise _over(limit)
        return whole
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(within):
            async for chunk in content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise _over(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {within:g} seconds.") from None
    except web.RequestPayloadError:
        raise BadRequest("The request body could not be read (broken Content-Encoding or chunked framing).") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _over(limit: int, model: str | None = None) -> PayloadTooLarge:
    where = f" for `{model}`" if model else ""
    return PayloadTooLarge(f"Request body is larger than the limit of {limit / (1024 * 1024):.3g} MiB{where}.")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object, refused before parsing when it holds more values than its size can justify.

    Each JSON value becomes a Python object of 30-70 bytes: ``{},{},...`` (3 bytes per value) parses
    to 24 times its size and stalls the loop for over a second per 8 MiB. Counting commas and brackets
    (C speed; an over-count, as commas in strings count too) bounds both before paying for them: at
    most ~18 MB plus 2.3 times the size. Text dense enough in commas to hit it (2 MB of CSV passes) is
    longer than any model's context anyway; large bodies that make sense are base64 media. A body
    under twice the allowance (a value takes 2 bytes at least) cannot exceed it and is not counted.
    """
    allowed = MAX_JSON_VALUES + len(raw) // BYTES_PER_JSON_VALUE
    if len(raw) > 2 * allowed and raw.count(b",") + raw.count(b"{") + raw.count(b"[") > allowed:
        raise BadRequest(f"The JSON body has too many values for its size (at most {MAX_JSON_VALUES:,} plus one "
                         f"per {BYTES_PER_JSON_VALUE} bytes). Send long lists as text, or split the request.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("We could not parse the JSON body of your request. Send valid JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("You must provide a model parameter (a string).", param="model")
    return body


def key_subjects(rt: Runtime, principal: Principal) -> list[tuple[str, LimitSpec]]:
    """Per key: the defaults; per account: its own limits, else the defaults."""
    account = principal.account
    return [(principal.subject, rt.config.limits),
            (f"account:{account.id}", account_limits(rt.config, account))]


def model_subjects(principal: Principal, model: Model) -> list[tuple[str, LimitSpec]]:
    """Per account and model: the model's own limits, if it has any."""
    if model.limits is None:
        return []
    return [(f"account:{principal.account.id}:{model.name}", model.limits)]


async def refuse_early(rt: Runtime, principal: Principal, request_id: str, billed: bool = True) -> Admission:
    """Admit on what the key alone tells (its limits, its coins) before a byte of the body is read."""
    admission: Admission | Refusal = await rt.limiter.admit(key_subjects(rt, principal), 0, request_id)
    if isinstance(admission, Refusal):
        rt.metrics.rate_limited(NO_MODEL, admission.limit)
        raise RateLimited(admission.message, headers=admission.headers())
    account = principal.account
    if rt.allowances.is_due(account):  # a new account, or its period turned less than a second ago: the
        try:                           # request is served from the allowance it is owed (one transaction)
            await rt.allowances.refill(account.id)
        except asyncio.CancelledError:  # the client left while waiting: its admission must not stay counted
            admission.finish(0)
            raise
        except Exception as exc:  # the database cannot be written: served on what the account has
            log.error("cannot refill allowances now (the periodic refill retries): %s", exc)
    if billed and rt.wallets.available(account.id) <= 0 and \
            not any(m.price == FREE for m in visible_models(rt.config, account)):
        admission.finish(0)
        raise InsufficientQuota(no_coins(rt, account), headers=admission.headers())
    return admission


def no_coins(rt: Runtime, account: AccountRow) -> str:
    """The 402's message: what to do, and when the account's allowance refills if it has one."""
    group = rt.config.group(account.group)
    if group is None or group.allowance is None:
        return NO_COINS
    zone = rt.config.timezone
    when = describe(next_start(rt.allowances.clock(), group.allowance.every, zone), zone)
    return f"{NO_COINS} Your allowance of {to_coins(group.allowance.coins):g} coins refills on {when}."


def body_limit(config: Config, account: AccountRow) -> int:
    """The largest body any model of the account accepts: a bigger one is refused unread.

    Without per-model limits, or for an account that may use every model, the config knows it already.
    """
    if not config.body_overrides or allowed_models(config, account) is None:
        return config.largest_body_bytes
    return max((m.max_body_bytes or config.max_body_bytes for m in visible_models(config, account)),
               default=config.max_body_bytes)


def serving_backends(rt: Runtime, call: Call, model: Model, body: dict[str, Any]) -> tuple[Backend, ...]:
    """The backends this request may go to: those of the model that serve its API, or, to continue a
    stored response (``previous_response_id``), the one backend that holds it, for its account only."""
    endpoint = call.endpoint
    previous = body.get("previous_response_id") if endpoint.remembers else None
    if previous is not None:
        owner = rt.responses.owner(previous, call.principal.account.id)
        if owner is None:
            raise NotFound(f"Previous response with id '{previous}' not found.", param="previous_response_id",
                           code=None)
        held_by, backend = holder(rt.config, owner, previous)
        if held_by is not model:
            raise BadRequest(f"Previous response '{previous}' was made with the model `{owner.model}`: continue it "
                             "with that model.", param="previous_response_id")
        return (backend,)
    backends = model.backends_for(endpoint.api)
    if not backends:
        served = [e.path for e in ENDPOINTS.values() if e.billed and model.backends_for(e.api)]
        raise NotFound(f"The model `{model.name}` is not served on {endpoint.path}; it is served on "
                       f"{', '.join(served)}.", param="model", code="model_not_found")
    return backends


async def relay(request: web.Request) -> web.StreamResponse:
    """A model POST of the API: the key's (or its delegating key's person's) request."""
    return await relay_as(request, await principal_of(request), ENDPOINTS[request.path])


async def relay_as(request: web.Request, principal: Principal, endpoint: Endpoint) -> web.StreamResponse:
    """Relay ``request`` as ``principal`` on ``endpoint``: admission, hold, forward, settlement, usage row."""
    rt = request.app[RUNTIME]
    storage = rt.usage.refusal()
    if storage is not None:  # fail closed, never a free pass; and no row added to the backlog that waits
        rt.metrics.storage_refusals.inc()
        raise storage
    call = Call(request[REQUEST_ID], principal, NO_MODEL, endpoint)  # a row even for a bad body
    ticket: Admission | None = None
    hold: billing.Hold | None = None
    model: Model | None = None
    rt.metrics.inflight.inc()
    try:
        ticket = await refuse_early(rt, principal, call.request_id, endpoint.billed)
        raw = await read_body(request, body_limit(rt.config, principal.account), rt.config.timeouts.request_body)
        body = parse_body(raw)
        check_fields(body, endpoint)
        if rt.config.log_prompts:
            call.prompt = body.get(endpoint.input_field)
        call.model = body["model"] if rt.config.model(body["model"]) is not None else NO_MODEL
        model = require_model(rt.config, principal.account, body["model"])
        size = len(raw)
        del raw  # only its size is needed from here on
        if model.max_body_bytes is not None and size > model.max_body_bytes:
            raise _over(model.max_body_bytes, model.name)
        backends = serving_backends(rt, call, model, body)
        worst = worst_case(body, size, endpoint, model)
        refusal = await rt.limiter.extend(ticket, model_subjects(principal, model),
                                          worst.tokens if endpoint.billed else 0)
        if refusal is not None:
            rt.metrics.rate_limited(model.name, refusal.limit)
            raise RateLimited(refusal.message, headers=refusal.headers())
        if endpoint.billed:
            call.worst = worst
            amount = billing.worst_cost(model.price, worst.prompt, worst.completion)
            hold = await rt.wallets.reserve(principal.account.id, amount, call.request_id)
            if hold is None:
                raise InsufficientQuota(no_coins(rt, principal.account))
            call.estimate = (worst.typical_prompt, 0)
        return await forward(request, rt, call, model, body, worst, ticket, backends)
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
           ticket: Admission | None) -> None:
    """Settle the hold, reconcile the limiter and record the row. Never awaits."""
    prompt, completion, cached, estimated, capped = tokens_of(call)
    price_cost = billing.cost(model.price, prompt, completion, cached) if model is not None else 0
    if hold is not None:
        rt.wallets.settle(hold, price_cost)
    else:
        price_cost = 0
    if ticket is not None:
        ticket.finish(prompt + completion)
    label = call.backend.label if call.backend is not None else None
    if capped:
        log.warning("request %s: the backend %s reported usage %s above what the request could produce; "
                    "billed %d prompt + %d completion tokens", call.request_id, label,
                    _short(call.usage), prompt, completion)
    row = UsageRow(
        request_id=call.request_id, time=call.wall, account_id=call.principal.account.id,
        key_id=call.principal.key_id, model=call.model, endpoint=call.endpoint.path, status=call.status,
        backend=label, prompt_tokens=prompt, completion_tokens=completion, cost=price_cost,
        estimated=estimated, partial=call.partial, capped=capped, duration_ms=call.ms_since_start(),
        ttfb_ms=call.ms_since_start(call.first_byte_at) if call.first_byte_at else None,
        details=_details(call.usage),
    )
    if call.response_id is not None and call.status == 200 and model is not None and call.backend is not None:
        rt.responses.remember(call.response_id, call.principal.account.id, model.name, call.backend)
    rt.usage.record(row, call.principal.account.name, prompt=call.prompt)
    rt.metrics.request_done(row, call.principal.account.name)


def tokens_of(call: Call) -> tuple[int, int, int, bool, bool]:
    """(prompt, completion, cached, estimated, capped): valid usage capped at the request's bound, else an
    estimate.

    The estimate is billed when output was delivered (a stream cut off after events went out, an
    answer whose usage is missing or invalid) and when the client left after the backend started
    working (like a cut-off stream); never when the request failed before any output.
    """
    if call.worst is None:
        return 0, 0, 0, False, False
    max_prompt, max_completion = call.worst.bound()
    usage: Usage | None = call.endpoint.usage(call.usage) if call.usage is not None else None
    if usage is not None:
        prompt, completion = min(usage.prompt, max_prompt), min(usage.completion, max_completion)
        return prompt, completion, min(usage.cached, prompt), False, (
            usage.prompt > max_prompt or usage.completion > max_completion)
    client_left = call.status == 499 and call.upstream_at is not None
    cut_off = call.partial and call.estimate[1] > 0  # a stream that broke after events went out
    if not client_left and (call.first_byte_at is None or (call.status >= 400 and not cut_off)):
        return 0, 0, 0, False, False
    completion = max(call.estimate[1], 1) if call.endpoint.output_fields else 0
    return min(call.estimate[0], max_prompt), min(completion, max_completion), 0, True, False


def _short(value: Any) -> str:
    """A backend's usage object for a log line: never long (it is the backend's text, not the client's)."""
    text = orjson.dumps(value, default=str).decode() if value is not None else "null"
    return text if len(text) <= 200 else text[:200] + "..."


def _details(usage: Any) -> dict[str, Any] | None:
    """What a usage object says beyond the two counts: OpenAI's ``*_details`` objects (cached, reasoning,
    audio tokens) and Anthropic's ``cache_*`` counts."""
    if not usage or not isinstance(usage, dict):
        return None
    details = {k: v for k, v in usage.items() if (k.endswith("_details") and isinstance(v, dict) and v)
               or (k.startswith("cache_") and type(v) is int and v > 0)}
    return details or None


async def forward(request: web.Request, rt: Runtime, call: Call, model: Model, body: dict[str, Any],
                  worst: WorstCase, ticket: Admission, backends: tuple[Backend, ...]) -> web.StreamResponse:
    injected: dict[str, bool] = {}
    endpoint = call.endpoint

    async def dial(backend: Backend) -> Upstream:
        send, injected[backend.url] = upstream_body(body, endpoint, backend, worst)
        if backend.send_priority:  # vLLM's priority scheduling: the group's, never the client's own
            group = rt.config.group(call.principal.account.group)
            send = {**send, "priority": group.priority if group is not None else 0}
        encoded = _encode(send)  # also for the built-in backend: what no HTTP backend could take, it refuses too
        call.backend = backend
        call.upstream_at = time.perf_counter()
        if backend.is_builtin:
            return EchoUpstream(endpoint.upstream, send, rt.echo)
        headers = upstream_headers(request.headers, backend, call.request_id, endpoint.forward_headers,
                                   endpoint.sends_x_api_key)
        return await rt.client.post(backend, endpoint.upstream, encoded, headers)

    account = call.principal.account
    turn = None
    if model.gated:  # only then may it wait: the fast path builds nothing
        group = rt.config.group(account.group)
        turn = Turn(rt.share, account.id, group.weight if group is not None else 1.0, worst.tokens,
                    rt.config.queue_timeout)
    backend, upstream = await connect(rt.pool, model, dial, account=account.id, backends=backends, turn=turn)
    call.first_byte_at = time.perf_counter()
    headers = {**endpoint.errors.headers(call.request_id), **ticket.headers()}
    try:
        if 300 <= upstream.status < 400:  # we follow no redirects, and relaying one without its Location is junk
            log.warning("backend %s answered %d (a redirect): check its url", backend.label, upstream.status)
            raise BadGateway("The model backend answered with a redirect.")
        if body.get("stream") is True and upstream.status == 200 and "event-stream" in upstream.content_type:
            return await relay_stream(request, call, upstream, headers, injected[backend.url])
        return await relay_whole(call, upstream, headers, rt.config.max_response_bytes)
    finally:
        upstream.close()


def _encode(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (254 levels): no backend needs that
        raise BadRequest("The JSON body is nested too deeply.") from None


async def relay_whole(call: Call, upstream: Upstream, headers: dict[str, str], limit: int) -> web.Response:
    data = await read_answer(upstream, limit, call.request_id)
    call.status = upstream.status
    if upstream.status == 200 and call.endpoint.billed:
        answer = _answer_of(data, call.endpoint.remembers)
        call.usage = answer.get("usage")
        if call.endpoint.remembers and isinstance(answer.get("id"), str):
            call.response_id = answer["id"]
        call.estimate = (call.estimate[0], len(data) // 4)
    headers["Server-Timing"] = call.server_timing()
    return answer_response(upstream, headers, data)


async def read_answer(upstream: Upstream, limit: int, request_id: str) -> bytes:
    """The backend's whole answer; 502 (or 504) when it cannot be read."""
    try:
        return await upstream.read(limit)
    except (aiohttp.ClientError, TimeoutError, BadAnswer) as exc:
        if isinstance(exc, BadAnswer):
            log.warning("request %s: cannot relay a backend's answer: %s", request_id, exc)
        raise _broken(exc) from exc


def answer_response(upstream: Upstream, headers: dict[str, str], data: bytes) -> web.Response:
    """The answer as the backend sent it, with its Content-Type and retry headers."""
    headers["Content-Type"] = upstream.content_type
    headers.update(upstream.retry_headers)
    return web.Response(status=upstream.status, body=data, headers=headers)


def _answer_of(data: bytes, with_id: bool) -> dict[str, Any]:
    """A JSON answer's top-level object, for its ``usage`` (validated when billed) and, ``with_id``, its
    ``id``; {} when it holds neither, so an answer without them is never parsed."""
    if b'"usage"' not in data and not (with_id and b'"id"' in data):
        return {}
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _broken(exc: BaseException) -> LumenError:
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("The model backend stopped answering.")
    return BadGateway("The model backend sent a broken response.")


async def relay_stream(request: web.Request, call: Call, upstream: Upstream, headers: dict[str, str],
                       injected: bool) -> web.StreamResponse:
    """Pass SSE through as it arrives. Once the first byte is out, errors can only end the stream."""
    scanner = SseScanner(drop_usage_chunk=injected, reader=call.endpoint.stream)
    headers.update({"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no", "Server-Timing": call.server_timing()})
    response = web.StreamResponse(status=200, headers=headers)
    call.status = 200
    request[STREAM_STARTED] = response
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
    except (aiohttp.ClientError, TimeoutError, StreamTooLarge, ConnectionError, BadAnswer):
        call.status, call.partial = 502, True
        await _end_with_error(response, call, BadGateway("The model backend broke off the stream."))
        return response
    except Exception:  # a bug of ours: the stream can only end, with an event the SDKs raise on
        log.exception("internal error in the stream of request %s", call.request_id)
        call.status, call.partial = 500, True
        await _end_with_error(response, call, InternalError("Internal error. The administrator can find it in "
                                                            f"the logs under request id {call.request_id}."))
        return response
    finally:
        call.usage, call.response_id = scanner.usage, scanner.response_id
        call.estimate = (call.estimate[0], scanner.events)
    await response.write_eof()
    return response


async def _end_with_error(response: web.StreamResponse, call: Call, error: LumenError) -> None:
    """Tell an SSE client the stream broke (the SDKs raise on an error event), then end."""
    event = call.endpoint.errors.stream_event(error)
    try:
        await response.write(event)
        await response.write_eof()
    except ConnectionError:
        pass

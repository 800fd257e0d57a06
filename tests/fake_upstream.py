"""A fake OpenAI-compatible model server (standing in for vLLM or OpenAI) for the proxy's tests.

It speaks the wire format the real `openai` SDKs parse (checked by tests/test_fake_upstream.py with the
Python SDK and the Node examples), so a proxy test that passes here relays what a real backend sends.

Two invariants make it useful as a double:
- Everything is deterministic and derived from the request: the reply text names the upstream, the
  message count, whether a system prompt arrived and the last message; token counts follow the
  public helpers below (`count_prompt_tokens`, `split_pieces`), so tests can compute expected usage.
- Everything is recorded: each request's method, path, headers and JSON body, and the exact bytes this
  server wrote back (`RecordedRequest.sent`), so a test can compare byte for byte with what the proxy
  delivered, and whether the client went away mid-response (`UpstreamState.disconnected`).

Behaviour is steered through `UpstreamState.behavior` (a mutable `Behavior`), which tests change
between requests: failures, slowness, dying mid-stream, missing usage, old-vLLM quirks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web
from aiohttp.web import ContentCoding
from multidict import CIMultiDict

NOT_SET: Any = object()  # Behavior.usage_override's "send the real usage"
StreamOptionsPolicy = Literal["accept", "reject", "reject_unless_stream"]
JSON = dict[str, Any]

# The tool the tests offer; the fake calls it with TOOL_ARGUMENTS.
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_ARGUMENTS = '{"city": "Paris"}'
# Split mid-key and mid-value on purpose: a relay that parses or re-chunks fragments breaks here.
TOOL_ARGUMENT_FRAGMENTS = ('{"', "ci", 'ty": "', "Par", "is", '"}')
CREATED = 1_700_000_000  # a fixed `created` keeps recorded bytes comparable across runs

# What OpenAI says for the statuses tests make the fake fail with (type, message, code).
_FAILURES: dict[int, tuple[str, str, str | None]] = {
    429: ("requests", "Rate limit reached for requests.", "rate_limit_exceeded"),
    500: ("server_error", "The server had an error while processing your request.", None),
    502: ("server_error", "Bad gateway.", None),
    503: ("server_error", "The engine is currently overloaded, please try again later.", None),
}


@dataclass
class Behavior:
    """How the fake misbehaves; tests mutate the fields of `state.behavior` between requests."""

    # fail_status answers every request (GET /health and /v1/models too) with an OpenAI error body;
    # fail_times, if set, counts the failing requests down to 0, after which the fake recovers.
    fail_status: int | None = None
    fail_times: int | None = None
    api_key: str | None = None  # when set, any other Bearer token gets 401 invalid_api_key
    strict_models: bool = False  # unknown model -> 404 model_not_found (the proxy must rewrite names)
    max_context_tokens: int | None = None  # prompt_tokens above it -> 400 context_length_exceeded
    first_byte_delay: float = 0.0  # seconds before anything is sent, on every route (for timeouts)
    chunk_delay: float = 0.0  # seconds between stream events
    die_after_chunks: int | None = None  # close the connection after N data events (no [DONE])
    error_event_after_chunks: int | None = None  # send `data: {"error": ...}` then [DONE] after N
    keep_alive: bool = False  # an SSE comment `: keep-alive` before every data event
    omit_usage: bool = False  # no usage anywhere, even when include_usage was asked for
    stream_options: StreamOptionsPolicy = "accept"  # "reject...": 400 like older vLLM builds
    cached_tokens: int = 0  # reported as usage.prompt_tokens_details.cached_tokens
    reply: str | None = None  # replaces the echo text of chat and text completions
    # Lying backends: when set, this value is sent as `usage` verbatim (any JSON: -5, "12", {}, 2**63...).
    usage_override: Any = NOT_SET
    ignore_max_tokens: bool = False  # generate the whole reply whatever max_tokens says (Ollama's default)
    gate: asyncio.Event | None = None  # when set, every POST waits for it before answering
    force_gzip: bool = False  # compress answers (streams too) although the client asked for identity
    canned: tuple[int, dict[str, str], bytes] | None = None  # answer every POST with (status, headers, body)


@dataclass
class RecordedRequest:
    """One request as the fake saw it, and what it answered."""

    id: str
    method: str
    path: str
    headers: CIMultiDict[str]
    body: Any  # the parsed JSON body, or None (GET, or not JSON)
    status: int = 0
    # The exact body bytes written, SSE included; a write cut short by the client's departure counts.
    sent: bytearray = field(default_factory=bytearray)
    finished: bool = False  # the whole response went out
    disconnected: bool = False  # the client went away before the response was complete
    response: web.StreamResponse | None = None
    peer: Any = None  # the client's (host, port): one per connection, so reuse shows

    @property
    def authorization(self) -> str | None:
        return self.headers.get("Authorization")

    def events(self) -> list[Any]:
        """The decoded `data:` payloads of a stream response, "[DONE]" kept as the string."""
        events: list[Any] = []
        for block in bytes(self.sent).split(b"\n\n"):
            if block.startswith(b"data: "):
                payload = block[len(b"data: ") :]
                events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
        return events


@dataclass
class UpstreamState:
    """What a test inspects and steers: one per fake upstream app."""

    name: str
    models: list[str]
    behavior: Behavior = field(default_factory=Behavior)
    requests: list[RecordedRequest] = field(default_factory=list)
    disconnects: int = 0
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    def reset(self) -> None:
        """Forget recordings and restore default behaviour (the same state object stays shared)."""
        self.behavior = Behavior()
        self.requests.clear()
        self.disconnects = 0
        self.disconnected = asyncio.Event()

    def next_id(self) -> str:
        return f"{self.name}-{next(self._ids)}"


UPSTREAM_STATE = web.AppKey("upstream_state", UpstreamState)


def dumps(value: Any) -> bytes:
    """JSON as a backend writes it; integers beyond 64 bits too (a lying backend's usage)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()


# ---- deterministic content and token counts (public: tests compute expected values with them) ----


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


IMAGE_TOKENS = 765  # what OpenAI bills a 1024x1024 image_url part at high detail, however short its URL


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Whitespace words of every message plus 3 per message (OpenAI's per-message overhead), plus
    IMAGE_TOKENS per image_url part."""
    images = sum(1 for m in messages if isinstance(m.get("content"), list)
                 for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")
    return sum(len(text_of(m.get("content")).split()) for m in messages) + 3 * len(messages) + IMAGE_TOKENS * images


def chat_reply(name: str, messages: Sequence[Mapping[str, Any]]) -> str:
    """The echo the upstream `name` answers to these messages (unless Behavior.reply is set)."""
    has_system = any(m.get("role") in ("system", "developer") for m in messages)
    last = text_of(messages[-1].get("content")) if messages else ""
    return f"Echo from {name} [messages={len(messages)} system={'yes' if has_system else 'no'}]: {last}"


def split_pieces(text: str) -> list[str]:
    """Stream pieces: each word with its trailing whitespace; they concatenate back to `text`."""
    return re.findall(r"\S+\s*|\s+", text)


def embedding_vector(text: str, dimensions: int = 8) -> list[float]:
    """A vector derived from the text; values k/128 survive the float32 base64 round trip exactly."""
    raw = b"".join(hashlib.sha256(f"{i}:{text}".encode()).digest() for i in range(dimensions // 32 + 1))
    return [(b - 128) / 128 for b in raw[:dimensions]]


# ---- the app ----


def make_upstream(name: str = "up1", models: Sequence[str] = ("fake-model",)) -> web.Application:
    """Build the fake server; its state is `app[UPSTREAM_STATE]`."""
    app = web.Application(middlewares=[_record_middleware], client_max_size=64 * 1024 * 1024)  # images
    app[UPSTREAM_STATE] = UpstreamState(name=name, models=list(models))
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _list_models)
    app.router.add_get("/v1/models/{model_id}", _get_model)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_RECORD = web.RequestKey("fake_upstream_record", RecordedRequest)


@web.middleware
async def _record_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record every request, apply the common behaviours, and notice clients that went away."""
    state = request.app[UPSTREAM_STATE]
    body = await _json_body(request)
    record = RecordedRequest(
        id=state.next_id(),
        method=request.method,
        path=request.path,
        headers=CIMultiDict(request.headers),
        body=body,
        peer=request.transport.get_extra_info("peername") if request.transport is not None else None,
    )
    state.requests.append(record)
    request[_RECORD] = record
    try:
        if state.behavior.first_byte_delay:
            await asyncio.sleep(state.behavior.first_byte_delay)
        if state.behavior.gate is not None and request.method == "POST":
            await state.behavior.gate.wait()
        response = _refusal(state, request, body) or await handler(request)
    except asyncio.CancelledError:  # aiohttp cancels the handler when the client disconnects
        _mark_disconnected(state, record)
        raise
    except ConnectionResetError:  # a write to a client that left (handler cancellation off)
        _mark_disconnected(state, record)
        if record.response is None:
            raise
        return record.response
    if isinstance(response, web.Response) and isinstance(response.body, bytes):
        record.sent += response.body
        record.finished = True
        if state.behavior.force_gzip:
            response.enable_compression(force=ContentCoding.gzip)
    record.status = response.status
    if not response.prepared:  # streams set it themselves, before their headers go out
        response.headers["x-request-id"] = record.id
    return response


def _mark_disconnected(state: UpstreamState, record: RecordedRequest) -> None:
    if not record.finished and not record.disconnected:
        record.disconnected = True
        state.disconnects += 1
        state.disconnected.set()


async def _json_body(request: web.Request) -> Any:
    if not request.body_exists:
        return None
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _refusal(state: UpstreamState, request: web.Request, body: Any) -> web.Response | None:
    """The error response the behaviour or the request calls for, checked before any handler."""
    behavior = state.behavior
    if behavior.api_key is not None and request.headers.get("Authorization") != f"Bearer {behavior.api_key}":
        return error_response(401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key")
    if behavior.fail_status is not None and behavior.fail_times != 0:
        if behavior.fail_times is not None:
            behavior.fail_times -= 1
        kind, message, code = _FAILURES.get(behavior.fail_status, ("server_error", "Upstream failure.", None))
        return error_response(behavior.fail_status, message, kind, code=code)
    if request.method != "POST":
        return None
    if behavior.canned is not None:
        status, headers, payload = behavior.canned
        return web.Response(status=status, headers=headers, body=payload)
    if not isinstance(body, dict):
        return error_response(400, "We could not parse the JSON body of your request.", "invalid_request_error")
    model = body.get("model")
    if not isinstance(model, str):
        return error_response(400, "you must provide a model parameter", "invalid_request_error", param="model")
    if behavior.strict_models and model not in state.models:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return error_response(404, message, "invalid_request_error", code="model_not_found")
    if "stream_options" in body and (
        behavior.stream_options == "reject"
        or (behavior.stream_options == "reject_unless_stream" and not body.get("stream"))
    ):
        return _old_vllm_stream_options_error(body)
    return None


def _old_vllm_stream_options_error(body: JSON) -> web.Response:
    """The 400 older vLLM builds answer: their own flat error shape, not OpenAI's nested one."""
    if body.get("stream"):
        message = (
            "[{'type': 'extra_forbidden', 'loc': ('body', 'stream_options'), 'msg': 'Extra inputs are not permitted'}]"
        )
    else:
        message = "Stream options can only be defined when `stream=True`."
    payload = {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400}
    return web.Response(status=400, body=dumps(payload), content_type="application/json")


def error_response(
    status: int, message: str, kind: str, *, param: str | None = None, code: str | None = None
) -> web.Response:
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}}."""
    payload = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.Response(status=status, body=dumps(payload), content_type="application/json")


def _context_length_error(limit: int, prompt_tokens: int, param: str) -> web.Response:
    message = (
        f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
        f"{prompt_tokens} tokens. Please reduce the length of the messages."
    )
    return error_response(400, message, "invalid_request_error", param=param, code="context_length_exceeded")


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=200)


def _model_object(model_id: str, owner: str) -> JSON:
    return {"id": model_id, "object": "model", "created": CREATED, "owned_by": owner}


async def _list_models(request: web.Request) -> web.Response:
    state = request.app[UPSTREAM_STATE]
    data = [_model_object(m, state.name) for m in state.models]
    return web.Response(body=dumps({"object": "list", "data": data}), content_type="application/json")


async def _get_model(request: web.Request) -> web.Response:
    state = request.app[UPSTREAM_STATE]
    model_id = request.match_info["model_id"]
    if model_id not in state.models:
        message = f"The model `{model_id}` does not exist or you do not have access to it."
        return error_response(404, message, "invalid_request_error", code="model_not_found")
    return web.Response(body=dumps(_model_object(model_id, state.name)), content_type="application/json")


# ---- usage ----


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> JSON:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _include_usage(body: JSON) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _max_tokens(body: JSON) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) else None


# ---- chat completions ----


def _wants_tool_call(body: JSON) -> str | None:
    """The function to call: the named tool_choice, else the first tool; None for a text reply."""
    tools = body.get("tools")
    messages = body.get("messages") or []
    if not tools or body.get("tool_choice") == "none" or (messages and messages[-1].get("role") == "tool"):
        return None
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return str(choice["function"]["name"])
    return str(tools[0]["function"]["name"])


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[UPSTREAM_STATE]
    behavior = state.behavior
    body: JSON = request[_RECORD].body
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return error_response(400, "messages must be a non-empty list", "invalid_request_error", param="messages")
    prompt_tokens = count_prompt_tokens(messages)
    limit = behavior.max_context_tokens
    if limit is not None and prompt_tokens > limit:
        return _context_length_error(limit, prompt_tokens, "messages")
    tool = _wants_tool_call(body)
    pieces, finish_reason = _capped(behavior, body, split_pieces(behavior.reply or chat_reply(state.name, messages)))
    if tool:
        finish_reason = "tool_calls"
    n = _n(body)
    completion_tokens = n * (len(TOOL_ARGUMENT_FRAGMENTS) if tool else len(pieces))
    usage = _usage(prompt_tokens, completion_tokens, behavior.cached_tokens)
    record = request[_RECORD]
    base = {
        "id": f"chatcmpl-{record.id}",
        "object": "chat.completion",
        "created": CREATED,
        "model": body["model"],
    }
    if body.get("stream"):
        return await _stream_chat(request, body, base, pieces, tool, finish_reason, usage)
    message: JSON = {"role": "assistant", "content": "".join(pieces), "refusal": None}
    if tool:
        message["content"] = None
        call = {
            "id": f"call_{record.id}",
            "type": "function",
            "function": {"name": tool, "arguments": TOOL_ARGUMENTS},
        }
        message["tool_calls"] = [call]
    choices = [{"index": i, "message": message, "logprobs": None, "finish_reason": finish_reason} for i in range(n)]
    payload = {**base, "choices": choices, "system_fingerprint": "fp_fake"}
    if not behavior.omit_usage:
        payload["usage"] = _reported(behavior, usage)
    return web.Response(body=dumps(payload), content_type="application/json")


def _n(body: JSON) -> int:
    """Choices per prompt: `n` (vLLM's `best_of` generates that many too, all billed)."""
    n, best_of = body.get("n"), body.get("best_of")
    n = n if isinstance(n, int) and n > 0 else 1
    return max(n, best_of) if isinstance(best_of, int) and best_of > 0 else n


def _capped(behavior: Behavior, body: JSON, pieces: list[str]) -> tuple[list[str], str]:
    """The reply cut at max_tokens (one piece per token), unless the backend ignores max_tokens."""
    max_tokens = _max_tokens(body)
    if not behavior.ignore_max_tokens and max_tokens is not None and len(pieces) > max_tokens:
        return pieces[:max_tokens], "length"
    return pieces, "stop"


def _reported(behavior: Behavior, usage: JSON) -> Any:
    """The usage object as the (possibly lying) backend reports it."""
    return usage if behavior.usage_override is NOT_SET else behavior.usage_override


def _chat_deltas(pieces: list[str], tool: str | None, call_id: str) -> list[JSON]:
    """The deltas of a chat stream, after the role chunk and before the finish chunk."""
    if not tool:
        return [{"content": piece} for piece in pieces]
    opening = {"index": 0, "id": call_id, "type": "function", "function": {"name": tool, "arguments": ""}}
    fragments = [{"tool_calls": [{"index": 0, "function": {"arguments": a}}]} for a in TOOL_ARGUMENT_FRAGMENTS]
    return [{"tool_calls": [opening]}, *fragments]


async def _stream_chat(
    request: web.Request,
    body: JSON,
    base: JSON,
    pieces: list[str],
    tool: str | None,
    finish_reason: str,
    usage: JSON,
) -> web.StreamResponse:
    record = request[_RECORD]
    chunk_base = {**base, "object": "chat.completion.chunk", "system_fingerprint": "fp_fake"}
    first: JSON = {"role": "assistant", "content": None if tool else "", "refusal": None}
    deltas = [first, *_chat_deltas(pieces, tool, f"call_{record.id}")]
    choices: list[JSON] = []
    for index in range(_n(body)):
        choices += [{"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        choices.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason})
    events = [{**chunk_base, "choices": [c]} for c in choices]
    return await _write_stream(request, body, chunk_base, events, usage)


async def _write_stream(
    request: web.Request, body: JSON, chunk_base: JSON, events: list[JSON], usage: JSON
) -> web.StreamResponse:
    """Send `events` as SSE, one write each, with the usage chunk and [DONE] the request asked for."""
    state = request.app[UPSTREAM_STATE]
    behavior = state.behavior
    if _include_usage(body) and not behavior.omit_usage:
        events = [{**e, "usage": None} for e in events]
        events.append({**chunk_base, "choices": [], "usage": _reported(behavior, usage)})
    record = request[_RECORD]
    headers = {"Content-Type": "text/event-stream; charset=utf-8", "x-request-id": record.id}
    response = web.StreamResponse(headers=headers)
    if behavior.force_gzip:
        response.enable_compression(force=ContentCoding.gzip)
    record.response = response
    record.status = response.status
    await response.prepare(request)

    async def send(data: bytes) -> None:
        record.sent += data  # recorded before the write: a failing write still counts as attempted
        await response.write(data)

    for sent_count, event in enumerate(events):
        if sent_count and behavior.chunk_delay:
            await asyncio.sleep(behavior.chunk_delay)
        if sent_count == behavior.die_after_chunks:
            return _die(request, record, response)
        if sent_count == behavior.error_event_after_chunks:
            error = {
                "message": "The upstream model failed mid-stream.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
            await send(b"data: " + dumps({"error": error}) + b"\n\n")
            break
        if behavior.keep_alive:
            await send(b": keep-alive\n\n")
        await send(b"data: " + dumps(event) + b"\n\n")
    await send(b"data: [DONE]\n\n")
    await response.write_eof()
    record.finished = True
    return response


def _die(request: web.Request, record: RecordedRequest, response: web.StreamResponse) -> web.StreamResponse:
    """Close the connection without the chunked terminator: the client sees a truncated body."""
    record.finished = True  # our own doing, not a client disconnect
    if request.transport is not None:
        request.transport.close()
    return response


# ---- text completions ----


def _prompt_texts(prompt: Any) -> tuple[list[str], int]:
    """The prompt strings and their token count (token-id arrays count one per id)."""
    if isinstance(prompt, str):
        return [prompt], len(prompt.split())
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return [" ".join(map(str, prompt))], len(prompt)
    texts: list[str] = []
    tokens = 0
    for item in prompt if isinstance(prompt, list) else []:
        item_texts, item_tokens = _prompt_texts(item)
        texts += item_texts
        tokens += item_tokens
    return texts, tokens


async def _completions(request: web.Request) -> web.StreamResponse:
    state = request.app[UPSTREAM_STATE]
    behavior = state.behavior
    body: JSON = request[_RECORD].body
    texts, prompt_tokens = _prompt_texts(body.get("prompt"))
    if not texts:
        return error_response(400, "prompt must be a string or a list", "invalid_request_error", param="prompt")
    limit = behavior.max_context_tokens
    if limit is not None and prompt_tokens > limit:
        return _context_length_error(limit, prompt_tokens, "prompt")
    n = _n(body)
    # One choice per prompt and per n, as vLLM and OpenAI answer a prompt list: index = prompt * n + i.
    replies = [_capped(behavior, body, split_pieces(behavior.reply or f"Echo from {state.name}: {t}")) for t in texts]
    usage = _usage(prompt_tokens, n * sum(len(p) for p, _ in replies), behavior.cached_tokens)
    record = request[_RECORD]
    base = {
        "id": f"cmpl-{record.id}",
        "object": "text_completion",
        "created": CREATED,
        "model": body["model"],
    }
    indexed = [(p * n + i, pieces, finish) for p, (pieces, finish) in enumerate(replies) for i in range(n)]
    if body.get("stream"):
        choices = []
        for index, pieces, finish_reason in indexed:
            choices += [{"text": p, "index": index, "logprobs": None, "finish_reason": None} for p in pieces]
            choices.append({"text": "", "index": index, "logprobs": None, "finish_reason": finish_reason})
        events = [{**base, "choices": [c]} for c in choices]
        return await _write_stream(request, body, base, events, usage)
    whole = [{"text": "".join(pieces), "index": index, "logprobs": None, "finish_reason": finish_reason}
             for index, pieces, finish_reason in indexed]
    payload = {**base, "choices": whole}
    if not behavior.omit_usage:
        payload["usage"] = _reported(behavior, usage)
    return web.Response(body=dumps(payload), content_type="application/json")


# ---- embeddings ----


def _embedding_inputs(value: Any) -> list[str] | None:
    """The inputs as strings (token-id arrays joined), or None when the shape is not OpenAI's."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [" ".join(map(str, value))]
    if isinstance(value, list) and value and all(isinstance(v, str | list) for v in value):
        nested = [_embedding_inputs(v) for v in value]
        return None if any(n is None for n in nested) else [s for n in nested if n for s in n]
    return None


async def _embeddings(request: web.Request) -> web.Response:
    body: JSON = request[_RECORD].body
    inputs = _embedding_inputs(body.get("input"))
    if inputs is None:
        return error_response(400, "input must be a string or an array", "invalid_request_error", param="input")
    dimensions = body.get("dimensions")
    if not isinstance(dimensions, int):
        dimensions = 8
    as_base64 = body.get("encoding_format") == "base64"  # the Python SDK asks for base64 by default
    data = []
    for index, text in enumerate(inputs):
        vector = embedding_vector(text, dimensions)
        encoded: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(len(t.split()) for t in inputs)
    payload = {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": _reported(request.app[UPSTREAM_STATE].behavior, {"prompt_tokens": tokens, "total_tokens": tokens}),
    }
    return web.Response(body=dumps(payload), content_type="application/json")


# ---- serving on a real port ----


class UpstreamServer:
    """The fake on a real 127.0.0.1 port, which can go down and come back on the same port."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def state(self) -> UpstreamState:
        return self.app[UPSTREAM_STATE]

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client or a proxy backend entry takes: the origin plus /v1."""
        return f"{self.origin}/v1"

    @property
    def is_running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Listen; after a stop() this reuses the port the first start() was given."""
        # handler_cancellation: a client leaving cancels the handler at once, as in aiohttp's TestServer.
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        """Go down like a dead backend: stop listening and drop every open connection."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


@asynccontextmanager
async def serve_upstream(app: web.Application, port: int = 0) -> AsyncIterator[UpstreamServer]:
    """Run the fake on 127.0.0.1 for the block; `server.base_url` is the /v1 URL to point clients at."""
    server = UpstreamServer(app, port=port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()

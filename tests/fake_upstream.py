"""A fake OpenAI-compatible model server (standing in for vLLM, llama.cpp's llama-server or OpenAI) for
the proxy's tests.

It speaks the wire formats the real SDKs parse (checked by tests/test_fake_upstream.py with the `openai`
Python SDK, the Node examples and the `anthropic` SDK), so a proxy test that passes here relays what a
real backend sends. Where each format was taken from:
- chat, completions, embeddings: OpenAI's API reference and vLLM's OpenAI server.
- Responses (POST /v1/responses, GET/DELETE /v1/responses/{id}, .../cancel, .../input_items): vLLM's
  vllm/entrypoints/openai/responses/ (serving.py, protocol.py, api_router.py), checked against
  llama.cpp's tools/server/server-task.cpp (to_json_oaicompat_resp*) and openai/types/responses/.
  DELETE and input_items follow OpenAI's reference (vLLM serves neither).
- Anthropic Messages (POST /v1/messages, /v1/messages/count_tokens): vLLM's vllm/entrypoints/anthropic/
  (serving.py, protocol.py, api_router.py), checked against llama.cpp's server-task.cpp
  (to_json_anthropic*), anthropic/types/ and anthropic/lib/streaming/_messages.py.
Where the servers differ the fake follows vLLM and says so in a comment.

Two invariants make it useful as a double:
- Everything is deterministic and derived from the request: the reply text names the upstream, the
  message count, whether a system prompt arrived and the last message; token counts follow the
  public helpers below (`count_prompt_tokens`, `split_pieces`), so tests can compute expected usage.
- Everything is recorded: each request's method, path, headers and JSON body, and the exact bytes this
  server wrote back (`RecordedRequest.sent`), so a test can compare byte for byte with what the proxy
  delivered, and whether the client went away mid-response (`UpstreamState.disconnected`).

Behaviour is steered through `UpstreamState.behavior` (a mutable `Behavior`), which tests change
between requests: failures, slowness, dying mid-stream, missing usage, old-vLLM quirks. The same knobs
apply to every route; errors of the /v1/messages routes come in Anthropic's shape, all others in OpenAI's.
Responses created with `store` (the default) are kept in `UpstreamState.stored_responses`, and every
created id in `UpstreamState.response_ids`, so a test can tell which backend a follow-up reached.
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
MID_STREAM_FAILURE = "The upstream model failed mid-stream."

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
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens (Responses: input_tokens_details)
    cache_read_tokens: int = 0  # Anthropic usage.cache_read_input_tokens (taken out of its input_tokens)
    cache_creation_tokens: int = 0  # Anthropic usage.cache_creation_input_tokens (likewise taken out)
    # A Responses stream cut at max_output_tokens ends with `response.completed` carrying status "incomplete"
    # (vLLM); True ends it with `response.incomplete` instead (OpenAI, recent llama.cpp).
    incomplete_event: bool = False
    reply: str | None = None  # replaces the echo text of chat, text completions, Responses and Messages
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
        """The decoded `data:` payloads of a stream response, "[DONE]" kept as the string; the `event:`
        lines of Responses and Anthropic streams are skipped (each payload repeats its name as "type")."""
        events: list[Any] = []
        for block in bytes(self.sent).split(b"\n\n"):
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    payload = line[len(b"data: ") :]
                    events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
        return events

    def event_names(self) -> list[str | None]:
        """The `event:` name of each SSE block that carries data (None where a block has no name)."""
        names: list[str | None] = []
        for block in bytes(self.sent).split(b"\n\n"):
            lines = block.split(b"\n")
            if any(line.startswith(b"data: ") for line in lines):
                named = [line[len(b"event: ") :].decode() for line in lines if line.startswith(b"event: ")]
                names.append(named[0] if named else None)
        return names


@dataclass
class StoredResponse:
    """A created Responses object, as GET /v1/responses/{id} answers it, and what follow-ups need."""

    response: JSON
    input_items: list[JSON]  # what GET .../input_items lists (oldest first)
    conversation: list[JSON]  # chat-style history a follow-up's previous_response_id continues
    pending: JSON | None = None  # a background response's finished object, shown from the first GET on


@dataclass
class UpstreamState:
    """What a test inspects and steers: one per fake upstream app."""

    name: str
    models: list[str]
    behavior: Behavior = field(default_factory=Behavior)
    requests: list[RecordedRequest] = field(default_factory=list)
    disconnects: int = 0
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    response_ids: list[str] = field(default_factory=list)  # every id POST /v1/responses created here, in order
    stored_responses: dict[str, StoredResponse] = field(default_factory=dict)  # those created with store
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    def reset(self) -> None:
        """Forget recordings and stored responses, restore default behaviour (the state object stays shared)."""
        self.behavior = Behavior()
        self.requests.clear()
        self.response_ids.clear()
        self.stored_responses.clear()
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
    app.router.add_post("/v1/responses", _responses)
    app.router.add_get("/v1/responses/{response_id}", _retrieve_response)
    app.router.add_delete("/v1/responses/{response_id}", _delete_response)
    app.router.add_post("/v1/responses/{response_id}/cancel", _cancel_response)
    app.router.add_get("/v1/responses/{response_id}/input_items", _list_input_items)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_post("/v1/messages/count_tokens", _count_tokens)
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
    """The error response the behaviour or the request calls for, checked before any handler; in
    Anthropic's error shape on the /v1/messages routes, in OpenAI's everywhere else."""
    behavior = state.behavior
    anthropic = request.path.startswith("/v1/messages")
    fail = _anthropic_failure if anthropic else _openai_failure
    if behavior.api_key is not None and not _authorized(request, behavior.api_key, anthropic):
        return fail(401, "invalid_api_key")
    if behavior.fail_status is not None and behavior.fail_times != 0:
        if behavior.fail_times is not None:
            behavior.fail_times -= 1
        return fail(behavior.fail_status, None)
    if request.method != "POST":
        return None
    if behavior.canned is not None:
        status, headers, payload = behavior.canned
        return web.Response(status=status, headers=headers, body=payload)
    if request.path.endswith("/cancel"):  # POST /v1/responses/{id}/cancel has no body
        return None
    if not isinstance(body, dict):
        return fail(400, "unparsable_body")
    model = body.get("model")
    if not isinstance(model, str):
        return fail(400, "missing_model")
    if behavior.strict_models and model not in state.models:
        return fail(404, "model_not_found", model)
    if "stream_options" in body and not anthropic and (
        behavior.stream_options == "reject"
        or (behavior.stream_options == "reject_unless_stream" and not body.get("stream"))
    ):
        return _old_vllm_stream_options_error(body)
    return None


def _authorized(request: web.Request, key: str, anthropic: bool) -> bool:
    """Bearer everywhere; the Anthropic routes also take `x-api-key` (Anthropic's header, which older
    anthropic SDKs send; 2.x sends Bearer)."""
    bearer = request.headers.get("Authorization") == f"Bearer {key}"
    return bearer or (anthropic and request.headers.get("x-api-key") == key)


def _openai_failure(status: int, reason: str | None, model: str = "") -> web.Response:
    if reason == "invalid_api_key":
        return error_response(401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key")
    if reason == "unparsable_body":
        return error_response(400, "We could not parse the JSON body of your request.", "invalid_request_error")
    if reason == "missing_model":
        return error_response(400, "you must provide a model parameter", "invalid_request_error", param="model")
    if reason == "model_not_found":
        message = f"The model `{model}` does not exist or you do not have access to it."
        return error_response(404, message, "invalid_request_error", code="model_not_found")
    kind, message, code = _FAILURES.get(status, ("server_error", "Upstream failure.", None))
    return error_response(status, message, kind, code=code)


# Anthropic's error type for each status it documents (529 is its "overloaded").
_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                          500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


def _anthropic_failure(status: int, reason: str | None, model: str = "") -> web.Response:
    messages = {"invalid_api_key": "invalid x-api-key", "unparsable_body": "Request body is not valid JSON.",
                "missing_model": "model: Field required"}
    if reason == "model_not_found":
        message = f"model: {model}"
    else:
        message = messages.get(reason or "", "Overloaded" if status in (503, 529) else "Internal server error")
    return anthropic_error_response(status, message)


def anthropic_error_response(status: int, message: str) -> web.Response:
    """An Anthropic-shaped error: {"type": "error", "error": {"type", "message"}}."""
    payload = {"type": "error", "error": {"type": _ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message}}
    return web.Response(status=status, body=dumps(payload), content_type="application/json")


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


def _with_usage(behavior: Behavior, payload: JSON, usage: JSON) -> JSON:
    """`payload` carrying the usage the backend reports (usage_override), or none (omit_usage)."""
    if behavior.omit_usage:
        return {k: v for k, v in payload.items() if k != "usage"}
    return {**payload, "usage": _reported(behavior, usage)}


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dumps(payload), content_type="application/json")


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
    return _cut(behavior, _max_tokens(body), pieces)


def _cut(behavior: Behavior, cap: Any, pieces: list[str]) -> tuple[list[str], str]:
    """`pieces` cut at an output cap (max_tokens, max_output_tokens), with chat's finish_reason."""
    if not behavior.ignore_max_tokens and isinstance(cap, int) and len(pieces) > cap:
        return pieces[:cap], "length"
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
    """Send chat/completions `events` as SSE, with the usage chunk and [DONE] the request asked for."""
    behavior = request.app[UPSTREAM_STATE].behavior
    if _include_usage(body) and not behavior.omit_usage:
        events = [{**e, "usage": None} for e in events]
        events.append({**chunk_base, "choices": [], "usage": _reported(behavior, usage)})
    error = {"message": MID_STREAM_FAILURE, "type": "server_error", "param": None, "code": None}
    frames = [_frame(None, event) for event in events]
    return await _send_sse(request, frames, lambda _: _frame(None, {"error": error}), b"data: [DONE]\n\n")



def _frame(name: str | None, data: Any) -> bytes:
    """One SSE block: an `event:` line when the format names its events (Responses, Anthropic), then data."""
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + dumps(data) + b"\n\n"


async def _send_sse(
    request: web.Request, frames: list[bytes], error_frame: Callable[[int], bytes], tail: bytes
) -> web.StreamResponse:
    """Write `frames` one write each, applying the stream behaviours, then `tail` (chat's [DONE]; the
    named-event formats end without one). error_event_after_chunks sends error_frame(n) then the tail."""
    behavior = request.app[UPSTREAM_STATE].behavior
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

    for sent_count, frame in enumerate(frames):
        if sent_count and behavior.chunk_delay:
            await asyncio.sleep(behavior.chunk_delay)
        if sent_count == behavior.die_after_chunks:
            return _die(request, record, response)
        if sent_count == behavior.error_event_after_chunks:
            await send(error_frame(sent_count))
            break
        if behavior.keep_alive:
            await send(b": keep-alive\n\n")
        await send(frame)
    if tail:
        await send(tail)
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


# ---- Responses API: POST /v1/responses and the stored-response routes ----
#
# Wire format from vLLM vllm/entrypoints/openai/responses/{serving,protocol,api_router}.py (the simple,
# non-harmony path, and the harmony path for function calls), checked against llama.cpp
# tools/server/server-task.cpp (to_json_oaicompat_resp*) and the openai SDK's types/responses/.

# The tool in Responses' flat shape (no nested "function" object).
RESPONSES_WEATHER_TOOL: dict[str, Any] = {"type": "function", **WEATHER_TOOL["function"]}


def response_conversation(body: Mapping[str, Any], history: Sequence[JSON] = ()) -> list[JSON]:
    """Chat-style messages a Responses request is answered from: `instructions` as a system message, the
    history of its previous_response_id, then `input` (a string, or items with input_text parts)."""
    instructions = body.get("instructions")
    system = [{"role": "system", "content": instructions}] if isinstance(instructions, str) and instructions else []
    value = body.get("input")
    items = [{"role": "user", "content": value}] if isinstance(value, str) else value if isinstance(value, list) else []
    return [*system, *history, *(_item_message(item) for item in items if isinstance(item, dict))]


def _item_message(item: Mapping[str, Any]) -> JSON:
    """One input item as a chat message: function call outputs are tool turns, parts become text parts."""
    if item.get("type") == "function_call_output":
        return {"role": "tool", "content": str(item.get("output", ""))}
    if item.get("type") == "function_call":
        return {"role": "assistant", "content": None}
    content = item.get("content")
    if isinstance(content, list):
        content = [_chat_part(part) for part in content if isinstance(part, dict)]
    return {"role": item.get("role", "user"), "content": content}


def _chat_part(part: Mapping[str, Any]) -> JSON:
    if part.get("type") in ("input_text", "output_text", "text"):
        return {"type": "text", "text": part.get("text", "")}
    return {"type": "image_url"} if part.get("type") in ("input_image", "image") else {"type": str(part.get("type"))}


def _responses_tool(body: JSON, conversation: list[JSON]) -> str | None:
    """The chat fake's convention: the named tool_choice, else the first tool; none after a tool output."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    choice = body.get("tool_choice")
    if not tools or choice == "none" or (conversation and conversation[-1]["role"] == "tool"):
        return None
    return str(choice["name"]) if isinstance(choice, dict) and "name" in choice else str(tools[0]["name"])


def _responses_usage(input_tokens: int, output_tokens: int, cached_tokens: int) -> JSON:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _response_object(body: JSON, response_id: str, status: str, output: list[JSON]) -> JSON:
    """The Response object as vLLM's ResponsesResponse.from_request fills it (every field the SDK requires)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "background": body.get("background") is True,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None,
        "metadata": body.get("metadata"),
        "model": body["model"],
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": None,
        "service_tier": "auto",
        "store": body.get("store", True) is not False,
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": None,  # until the response is done
        "user": None,
    }


def _output_items(record_id: str, pieces: list[str], tool: str | None) -> list[JSON]:
    if tool:
        call = {"id": f"fc_{record_id}", "type": "function_call", "status": "completed",
                "call_id": f"call_{record_id}", "name": tool, "arguments": TOOL_ARGUMENTS}
        return [call]
    # vLLM marks the message "completed" even when cut at max_output_tokens (OpenAI says "incomplete").
    text = {"type": "output_text", "text": "".join(pieces), "annotations": [], "logprobs": []}
    return [{"id": f"msg_{record_id}", "type": "message", "status": "completed", "role": "assistant",
             "content": [text]}]


def _input_items(record_id: str, body: JSON) -> list[JSON]:
    """The request's input as stored items: every message gets an id and input_text parts."""
    value = body.get("input")
    items = [{"role": "user", "content": value}] if isinstance(value, str) else value if isinstance(value, list) else []
    stored = []
    for index, item in enumerate(i for i in items if isinstance(i, dict)):
        content = item.get("content")
        if isinstance(content, str):
            content = [{"type": "input_text", "text": content}]
        kind = item.get("type", "message")
        base = {"type": "message", "role": item.get("role", "user"), "content": content, "status": "completed"}
        stored.append({"id": item.get("id") or f"msg_{record_id}_{index}", **(base if kind == "message" else item)})
    return stored


async def _responses(request: web.Request) -> web.StreamResponse:
    state = request.app[UPSTREAM_STATE]
    behavior = state.behavior
    record = request[_RECORD]
    body: JSON = record.body
    refused = _responses_refusal(state, body)
    if refused is not None:
        return refused
    history = state.stored_responses[body["previous_response_id"]].conversation if _follows_up(body) else []
    conversation = response_conversation(body, history)
    prompt_tokens = count_prompt_tokens(conversation)
    limit = behavior.max_context_tokens
    if limit is not None and prompt_tokens > limit:
        return _context_length_error(limit, prompt_tokens, "input")
    tool = _responses_tool(body, conversation)
    reply = behavior.reply or chat_reply(state.name, conversation)
    pieces, finish = _cut(behavior, body.get("max_output_tokens"), split_pieces(reply))
    response_id = f"resp_{record.id}"
    state.response_ids.append(response_id)
    status = "incomplete" if finish == "length" and not tool else "completed"
    usage = _responses_usage(prompt_tokens, len(TOOL_ARGUMENT_FRAGMENTS) if tool else len(pieces),
                             behavior.cached_tokens)
    output = _output_items(record.id, pieces, tool)
    final = _with_usage(behavior, _response_object(body, response_id, status, output), usage)
    if body.get("store", True) is not False:
        # A follow-up continues from history + this input + the reply; instructions are not carried over.
        said = {"role": "assistant", "content": None if tool else "".join(pieces)}
        turn = [*history, *response_conversation({"input": body["input"]}), said]
        state.stored_responses[response_id] = StoredResponse(final, _input_items(record.id, body), turn)
    if body.get("stream"):
        initial = _response_object(body, response_id, "in_progress", [])
        return await _stream_response(request, _response_events(behavior, initial, final, pieces))
    if body.get("background") is True and response_id in state.stored_responses:
        stored = state.stored_responses[response_id]  # answered queued; finished from the first GET on
        stored.response, stored.pending = _response_object(body, response_id, "queued", []), final
        return _json(stored.response)
    return _json(final)


def _follows_up(body: JSON) -> bool:
    return body.get("previous_response_id") is not None


def _responses_refusal(state: UpstreamState, body: JSON) -> web.Response | None:
    if not isinstance(body.get("input"), str | list):
        return error_response(400, "Missing required parameter: 'input'.", "invalid_request_error", param="input")
    previous = body.get("previous_response_id")
    if _follows_up(body) and previous not in state.stored_responses:
        # OpenAI's answer; vLLM says "Response with id '...' not found." with param "response_id".
        message = f"Previous response with id '{previous}' not found."
        return error_response(404, message, "invalid_request_error", param="previous_response_id",
                              code="previous_response_not_found")
    return None


def _response_events(behavior: Behavior, initial: JSON, final: JSON, pieces: list[str]) -> list[JSON]:
    """The stream's events in vLLM's order, before sequence numbers: created, in_progress, then per output
    item added/deltas/done, then the final response (the only event with usage)."""
    events: list[JSON] = [{"type": "response.created", "response": initial},
                          {"type": "response.in_progress", "response": initial}]
    for index, item in enumerate(final["output"]):
        events += _item_events(index, item, pieces)
    cut = final["status"] == "incomplete" and behavior.incomplete_event
    events.append({"type": "response.incomplete" if cut else "response.completed", "response": final})
    return events


def _item_events(index: int, item: JSON, pieces: list[str]) -> list[JSON]:
    at = {"output_index": index, "item_id": item["id"]}
    done = {"type": "response.output_item.done", "output_index": index, "item": item}
    if item["type"] == "function_call":
        added = {**item, "status": "in_progress", "arguments": ""}
        deltas = [{"type": "response.function_call_arguments.delta", **at, "delta": f}
                  for f in TOOL_ARGUMENT_FRAGMENTS]
        # vLLM's done event also names the function (the SDK's type has no `name`; extra fields are kept).
        arguments = {"type": "response.function_call_arguments.done", **at, "name": item["name"],
                     "arguments": item["arguments"]}
        return [{"type": "response.output_item.added", "output_index": index, "item": added}, *deltas, arguments, done]
    part = item["content"][0]
    at = {**at, "content_index": 0}
    return [
        {"type": "response.output_item.added", "output_index": index,
         "item": {**item, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **at, "part": {**part, "text": ""}},
        *({"type": "response.output_text.delta", **at, "delta": p, "logprobs": []} for p in pieces),
        {"type": "response.output_text.done", **at, "text": part["text"], "logprobs": []},
        {"type": "response.content_part.done", **at, "part": part},
        done,
    ]


async def _stream_response(request: web.Request, events: list[JSON]) -> web.StreamResponse:
    """`event: <type>` lines before each data line, a sequence_number in each, no [DONE] (vLLM)."""
    numbered = [{"type": e["type"], "sequence_number": n, **e} for n, e in enumerate(events)]

    def error(n: int) -> bytes:
        payload = {"type": "error", "sequence_number": n, "code": "server_error", "message": MID_STREAM_FAILURE,
                   "param": None}
        return _frame("error", payload)

    return await _send_sse(request, [_frame(e["type"], e) for e in numbered], error, b"")


def _stored(request: web.Request) -> StoredResponse | web.Response:
    """The stored response the path names, or vLLM's 404 for an unknown id."""
    response_id = request.match_info["response_id"]
    stored = request.app[UPSTREAM_STATE].stored_responses.get(response_id)
    if stored is None:
        message = f"Response with id '{response_id}' not found."
        return error_response(404, message, "invalid_request_error", param="response_id")
    return stored


async def _retrieve_response(request: web.Request) -> web.Response:
    stored = _stored(request)
    if isinstance(stored, web.Response):
        return stored
    if stored.pending is not None:  # a background response is done by the time anyone looks
        stored.response, stored.pending = stored.pending, None
    return _json(stored.response)


async def _delete_response(request: web.Request) -> web.Response:
    stored = _stored(request)
    if isinstance(stored, web.Response):
        return stored
    response_id = request.match_info["response_id"]
    del request.app[UPSTREAM_STATE].stored_responses[response_id]
    return _json({"id": response_id, "object": "response", "deleted": True})


async def _cancel_response(request: web.Request) -> web.Response:
    stored = _stored(request)
    if isinstance(stored, web.Response):
        return stored
    if stored.response["status"] not in ("queued", "in_progress"):
        return error_response(400, "Cannot cancel a synchronous response.", "invalid_request_error",
                              param="response_id")
    stored.response, stored.pending = {**stored.response, "status": "cancelled"}, None
    return _json(stored.response)


async def _list_input_items(request: web.Request) -> web.Response:
    stored = _stored(request)
    if isinstance(stored, web.Response):
        return stored
    query = request.query
    items = stored.input_items if query.get("order") == "asc" else stored.input_items[::-1]  # desc by default
    ids = [item["id"] for item in items]
    if query.get("after") in ids:
        items = items[ids.index(query["after"]) + 1 :]
    limit = int(query.get("limit", "20"))
    page = items[:limit]
    first, last = (page[0]["id"], page[-1]["id"]) if page else (None, None)
    return _json({"object": "list", "data": page, "first_id": first, "last_id": last, "has_more": len(items) > limit})


# ---- Anthropic Messages API: POST /v1/messages and /v1/messages/count_tokens ----
#
# Wire format from vLLM vllm/entrypoints/anthropic/{serving,protocol,api_router}.py, checked against
# llama.cpp tools/server/server-task.cpp (to_json_anthropic*) and the anthropic SDK's types/ and
# lib/streaming/_messages.py (how messages.stream accumulates events).

# The tool in Anthropic's shape (input_schema, no "type").
ANTHROPIC_WEATHER_TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": WEATHER_TOOL["function"]["description"],
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}


def anthropic_messages(body: Mapping[str, Any]) -> list[JSON]:
    """Chat-style messages of a Messages request: `system` (a string or text blocks) as a system message,
    then `messages` with their text, tool_result and image blocks (tool_use blocks carry no words)."""
    system = body.get("system")
    if isinstance(system, list):
        system = text_of(system)
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    return [*head, *({"role": m.get("role"), "content": _anthropic_content(m.get("content"))} for m in messages)]


def _anthropic_content(content: Any) -> Any:
    if not isinstance(content, list):
        return content
    parts: list[JSON] = []
    for block in (b for b in content if isinstance(b, dict)):
        if block.get("type") == "tool_result":
            parts.append({"type": "text", "text": text_of(block.get("content"))})
        elif block.get("type") == "image":
            parts.append({"type": "image_url"})
        else:
            parts.append(block)
    return parts


def _is_tool_result(message: Mapping[str, Any]) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)


def _anthropic_tool(body: JSON) -> str | None:
    """The chat fake's convention: the named tool_choice, else the first tool; none after a tool result."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and "name" in t]
    choice = body.get("tool_choice")
    choice = choice if isinstance(choice, dict) else {}
    messages = body.get("messages") or []
    if not tools or choice.get("type") == "none" or (messages and _is_tool_result(messages[-1])):
        return None
    return str(choice["name"]) if choice.get("type") == "tool" else str(tools[0]["name"])


def _anthropic_usage(prompt_tokens: int, output_tokens: int, behavior: Behavior) -> JSON:
    """input_tokens excludes the cached part: input + cache_creation + cache_read is the whole prompt."""
    read, created = behavior.cache_read_tokens, behavior.cache_creation_tokens
    return {
        "input_tokens": max(prompt_tokens - read - created, 0),
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": read,
        "output_tokens": output_tokens,
    }


def _anthropic_invalid(body: JSON, behavior: Behavior, *, needs_max_tokens: bool) -> web.Response | None:
    """The 400s a Messages request can get (pydantic's "<field>: Field required" wording, as Anthropic)."""
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return anthropic_error_response(400, "messages: Field required")
    if needs_max_tokens and not isinstance(body.get("max_tokens"), int):
        return anthropic_error_response(400, "max_tokens: Field required")
    prompt_tokens = count_prompt_tokens(anthropic_messages(body))
    limit = behavior.max_context_tokens
    if limit is not None and prompt_tokens > limit:
        return anthropic_error_response(400, f"prompt is too long: {prompt_tokens} tokens > {limit} maximum")
    return None


async def _messages(request: web.Request) -> web.StreamResponse:
    state = request.app[UPSTREAM_STATE]
    behavior = state.behavior
    record = request[_RECORD]
    body: JSON = record.body
    invalid = _anthropic_invalid(body, behavior, needs_max_tokens=True)
    if invalid is not None:
        return invalid
    messages = anthropic_messages(body)
    tool = _anthropic_tool(body)
    reply = behavior.reply or chat_reply(state.name, messages)
    pieces, finish = _cut(behavior, body["max_tokens"], split_pieces(reply))
    stop_reason = "tool_use" if tool else "max_tokens" if finish == "length" else "end_turn"
    usage = _anthropic_usage(count_prompt_tokens(messages), len(TOOL_ARGUMENT_FRAGMENTS) if tool else len(pieces),
                             behavior)
    tool_use = {"type": "tool_use", "id": f"toolu_{record.id}", "name": tool, "input": json.loads(TOOL_ARGUMENTS)}
    content = [tool_use] if tool else [{"type": "text", "text": "".join(pieces)}]
    message = {"id": f"msg_{record.id}", "type": "message", "role": "assistant", "model": body["model"],
               "content": content, "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}
    if body.get("stream"):
        return await _stream_message(request, message, pieces)
    return _json(_with_usage(behavior, message, usage))


def _message_events(behavior: Behavior, message: JSON, pieces: list[str]) -> list[JSON]:
    """Anthropic's sequence: message_start, content_block_start, ping, deltas, content_block_stop,
    message_delta (cumulative usage), message_stop. vLLM and llama.cpp send no ping; the real API does."""
    usage = message["usage"]
    # message_start carries the input side and a token or so of output (Anthropic says 1, vLLM 0).
    opening = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    started = _with_usage(behavior, opening, {**usage, "output_tokens": min(usage["output_tokens"], 1)})
    block = message["content"][0]
    if block["type"] == "tool_use":
        deltas = [{"type": "input_json_delta", "partial_json": f} for f in TOOL_ARGUMENT_FRAGMENTS]
        block = {**block, "input": {}}
    else:
        deltas = [{"type": "text_delta", "text": piece} for piece in pieces]
        block = {**block, "text": ""}
    # message_delta's usage is cumulative: the final output_tokens, the input side repeated (recent API;
    # vLLM repeats input_tokens only, llama.cpp sends output_tokens alone).
    delta = {"type": "message_delta", "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None}}
    return [
        {"type": "message_start", "message": started},
        {"type": "content_block_start", "index": 0, "content_block": block},
        {"type": "ping"},
        *({"type": "content_block_delta", "index": 0, "delta": d} for d in deltas),
        {"type": "content_block_stop", "index": 0},
        _with_usage(behavior, delta, usage),
        {"type": "message_stop"},
    ]


async def _stream_message(request: web.Request, message: JSON, pieces: list[str]) -> web.StreamResponse:
    """`event: <type>` before each data line, no [DONE]; a failure is an `error` event the SDK raises."""
    events = _message_events(request.app[UPSTREAM_STATE].behavior, message, pieces)
    error = {"type": "error", "error": {"type": "api_error", "message": MID_STREAM_FAILURE}}
    return await _send_sse(request, [_frame(e["type"], e) for e in events], lambda _: _frame("error", error), b"")


async def _count_tokens(request: web.Request) -> web.Response:
    body: JSON = request[_RECORD].body
    invalid = _anthropic_invalid(body, request.app[UPSTREAM_STATE].behavior, needs_max_tokens=False)
    if invalid is not None:
        return invalid
    # vLLM adds {"context_management": {"original_input_tokens": N}}; Anthropic and llama.cpp do not.
    return _json({"input_tokens": count_prompt_tokens(anthropic_messages(body))})


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

"""One record per API path: what differs between endpoints, and what a request can cost at worst.

The relay, the hold, the SSE scanner's caller and the built-in backend read :data:`ENDPOINTS`; adding an
endpoint is one record and, if its usage is named differently, one usage function.

Invariants this module keeps for every record:
- **What Lumen reads is what the backend sees.** The fields Lumen decides on (:data:`READ_FIELDS`) must
  have strict JSON types (a lax backend would read ``"16000"`` or ``16000.0`` that Lumen ignored), and a
  key that differs from one of them only in case is refused (Go backends such as Ollama match keys
  case-insensitively, last one winning). The body is re-serialised from the checked object, so duplicate
  keys cannot differ either.
- **The hold is the worst case.** Completion: prompts × choices (``n``, ``best_of``) × the output cap;
  when the request caps nothing, :func:`upstream_body` sets the model's ``max_output_tokens`` on the way
  out, so the backend can never produce more than was held. Prompt: see :func:`worst_case`.
- **What is billed is bounded by the request.** Reported usage is taken only when its counts are
  non-negative integers (else the request is billed an estimate), and is capped at :meth:`WorstCase.bound`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from .config import API_NAMES, Backend, Model
from .errors import ANTHROPIC_ERRORS, OPENAI_ERRORS, RESPONSES_ERRORS, BadRequest, ErrorShape

INT32_MAX = 2**31 - 1
MAX_CHOICES = 128  # OpenAI's limit on n; best_of is held to it too
MAX_BILLED_TOKENS = 2**40  # per count and row, whatever the request: sums of millions of rows fit SQLite
PER_ITEM_TOKENS = 2  # special tokens a backend adds per prompt or input of a list (BOS/EOS, CLS/SEP)
PART_DEPTH = 3  # content lists nested in parts (a tool result's images) are searched this deep

MEDIA_PARTS: Mapping[str, str] = {
    "image_url": "image", "input_image": "image", "image": "image",
    "input_audio": "audio", "audio": "audio", "audio_url": "audio",
    "video_url": "video", "video": "video",
    "file": "file", "input_file": "file", "document": "file",
}
"""Content-part types (OpenAI chat and Responses, Anthropic, vLLM extensions) and the kind of part they are."""

READ_FIELDS = frozenset({"model", "max_tokens", "max_completion_tokens", "max_output_tokens", "n", "best_of",
                         "stream", "stream_options", "messages", "prompt", "input", "previous_response_id"})
"""Top-level fields whose value Lumen acts on, on any endpoint; their case variants are refused."""
_FOLDED = {name.casefold(): name for name in READ_FIELDS}


class Usage(NamedTuple):
    """Token counts as a backend reported them, validated: ``cached`` is the part of ``prompt`` read
    from a cache (priced at ``cached_prompt``), never more than ``prompt``."""

    prompt: int
    completion: int
    cached: int = 0


def _count(value: Any) -> int | None:
    """A token count as billing accepts it: a non-negative int (not a bool, not a float), else None."""
    return value if type(value) is int and value >= 0 else None


def _optional(value: Any) -> int:
    """A count a backend may omit or send as null: 0 then; anything else invalid is 0 too."""
    return _count(value) or 0


def _cached(details: Any) -> int:
    return _optional(details.get("cached_tokens")) if isinstance(details, dict) else 0


def _counts(usage: Any, completion_default: int | None) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens", completion_default))
    if prompt is None or completion is None:
        return None
    return Usage(prompt, completion, min(_cached(usage.get("prompt_tokens_details")), prompt))


def completion_usage(usage: Any) -> Usage | None:
    """Chat and text completions: both counts must be there and valid."""
    return _counts(usage, None)


def embedding_usage(usage: Any) -> Usage | None:
    """Embeddings report prompt tokens only."""
    return _counts(usage, 0)


def responses_usage(usage: Any) -> Usage | None:
    """The Responses API: ``input_tokens`` includes the cached ones (``input_tokens_details.cached_tokens``)."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
    if prompt is None or completion is None:
        return None
    return Usage(prompt, completion, min(_cached(usage.get("input_tokens_details")), prompt))


def messages_usage(usage: Any) -> Usage | None:
    """Anthropic's ``input_tokens`` excludes cached input: the prompt is it plus cache writes and reads."""
    if not isinstance(usage, dict):
        return None
    uncached, completion = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
    if uncached is None or completion is None:
        return None
    read = _optional(usage.get("cache_read_input_tokens"))
    return Usage(uncached + _optional(usage.get("cache_creation_input_tokens")) + read, completion, read)


def one_prompt(value: Any) -> int:
    return 1


def prompt_count(value: Any) -> int:
    """``prompt`` of /v1/completions: a list of strings or of token lists is that many prompts."""
    if isinstance(value, list) and value and isinstance(value[0], str | list):
        return len(value)
    return 1


class StreamState(Protocol):
    """What a stream reader updates: the :class:`.sse.SseScanner` observing the stream."""

    usage: Any
    response_id: str | None
    done: bool
    events: int
    drop_usage_chunk: bool


@dataclass(frozen=True, slots=True)
class StreamReader:
    """How usage (and a response id) is found in one API's SSE stream.

    Only events that ``marker`` finds are decoded, then ``take`` reads the decoded event (the regex is a
    cheap filter, never trusted: text a model writes is escaped inside a string and cannot match it, and
    ``take`` looks at top-level fields only). ``take`` returns True when the event must not be relayed.
    """

    marker: re.Pattern[bytes]
    take: Callable[[dict[str, Any], StreamState], bool]
    done_marker: bytes | None = None  # a stream that ends with it ended normally (else ``take`` says)


def _take_chat(event: dict[str, Any], state: StreamState) -> bool:
    """Chat and text completions: the last non-null ``usage``; its chunk (``choices: []``) is dropped
    when Lumen asked for it on the client's behalf."""
    if event.get("usage") is None:
        return False
    state.usage = event["usage"]
    state.events -= 1
    return state.drop_usage_chunk and event.get("choices") == []


_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _take_response(event: dict[str, Any], state: StreamState) -> bool:
    """Responses: the response object rides in ``response.created`` (its id) and in the final event
    (``completed``, ``incomplete`` or ``failed``, with the usage)."""
    response = event.get("response")
    if not isinstance(response, dict):
        return False
    if isinstance(response.get("id"), str):
        state.response_id = response["id"]
    if event.get("type") in _RESPONSE_ENDS:
        state.usage = response.get("usage")
        state.done = True
    return False


def _take_message(event: dict[str, Any], state: StreamState) -> bool:
    """Anthropic: ``message_start`` has the input side (``message.usage``), each ``message_delta`` the
    cumulative output (and, on recent servers, the input again): merged, later counts win."""
    kind = event.get("type")
    if kind == "message_start":
        message = event.get("message")
        usage = message.get("usage") if isinstance(message, dict) else None
        state.usage = dict(usage) if isinstance(usage, dict) else usage
    elif kind == "message_delta":
        usage = event.get("usage")
        state.usage = {**state.usage, **usage} if isinstance(state.usage, dict) and isinstance(usage, dict) \
            else usage
    elif kind == "message_stop":
        state.done = True
    return False


CHAT_STREAM = StreamReader(re.compile(rb'"usage"\s*:\s*(?!null\b)'), _take_chat, b"[DONE]")
RESPONSES_STREAM = StreamReader(re.compile(rb'"type"\s*:\s*"response\.(?:created|completed|incomplete|failed)"'),
                                _take_response)
MESSAGES_STREAM = StreamReader(re.compile(rb'"type"\s*:\s*"message_(?:start|delta|stop)"'), _take_message)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One API path: where it goes, what its worst case reads, where its usage is, how its errors look."""

    path: str  # what clients call
    upstream: str  # appended to a backend's base URL (which ends in /v1)
    api: str  # the name a backend lists under ``apis:`` to serve this path
    streams: bool  # honours "stream": true with SSE
    output_fields: tuple[str, ...]  # fields that cap the output; () = no output tokens (embeddings)
    choice_fields: tuple[str, ...]  # fields that multiply the output
    input_field: str  # where the prompt lives
    prompts: Callable[[Any], int]  # how many prompts the input holds (each gets every choice)
    usage: Callable[[Any], Usage | None]  # validated counts from the answer's "usage" object
    stream: StreamReader = CHAT_STREAM
    errors: ErrorShape = OPENAI_ERRORS
    media: bool = True  # the input may hold content parts (images, audio, files)
    output_required: bool = False  # the API itself refuses a request without an output cap
    usage_option: bool = False  # stream usage comes only when asked for (``stream_options.include_usage``)
    billed: bool = True  # False: relayed and counted by the rate limits, never held or billed
    remembers: bool = False  # its answers' ids are kept for stateful follow-ups (the Responses API)
    forward_headers: tuple[str, ...] = ("Accept",)  # client headers the backend sees
    sends_x_api_key: bool = False  # a backend's api_key also goes as x-api-key (Anthropic's header)
    refused: Mapping[str, str] = field(default_factory=dict)  # fields Lumen cannot honour when set: why


CONVERSATION = ("Lumen does not serve the Conversations API, so a conversation cannot be tied to your account: "
                "continue with previous_response_id instead.")
MESSAGES_HEADERS = ("Accept", "anthropic-version", "anthropic-beta")
BACKGROUND = ("Background responses are not supported: Lumen bills a response when it ends, and a background one "
              "ends after the request. Leave 'background' unset (use \"stream\": true for long answers).")

ENDPOINTS: Mapping[str, Endpoint] = {e.path: e for e in (
    Endpoint("/v1/chat/completions", "/chat/completions", "chat", True, ("max_completion_tokens", "max_tokens"),
             ("n", "best_of"), "messages", one_prompt, completion_usage, usage_option=True),
    Endpoint("/v1/completions", "/completions", "completions", True, ("max_tokens",), ("n", "best_of"), "prompt",
             prompt_count, completion_usage, media=False, usage_option=True),
    Endpoint("/v1/embeddings", "/embeddings", "embeddings", False, (), (), "input", one_prompt, embedding_usage,
             media=False),
    Endpoint("/v1/responses", "/responses", "responses", True, ("max_output_tokens",), (), "input", one_prompt,
             responses_usage, RESPONSES_STREAM, RESPONSES_ERRORS, remembers=True,
             refused={"background": BACKGROUND, "conversation": CONVERSATION}),
    Endpoint("/v1/messages", "/messages", "messages", True, ("max_tokens",), (), "messages", one_prompt,
             messages_usage, MESSAGES_STREAM, ANTHROPIC_ERRORS, output_required=True,
             forward_headers=MESSAGES_HEADERS, sends_x_api_key=True),
    Endpoint("/v1/messages/count_tokens", "/messages/count_tokens", "messages", False, (), (), "messages",
             one_prompt, messages_usage, MESSAGES_STREAM, ANTHROPIC_ERRORS, billed=False,
             forward_headers=MESSAGES_HEADERS, sends_x_api_key=True),
)}
assert all(e.api in API_NAMES for e in ENDPOINTS.values()), "config.API_NAMES lists what apis: may name"
SERVED = ", ".join(ENDPOINTS) + ", GET /v1/models and the stateful /v1/responses/{id} calls"


def error_shape(path: str) -> ErrorShape:
    """The error shape the clients of ``path`` parse (unknown paths under an API's prefix too)."""
    endpoint = ENDPOINTS.get(path)
    if endpoint is not None:
        return endpoint.errors
    return ANTHROPIC_ERRORS if path.startswith("/v1/messages") else OPENAI_ERRORS


def _bad_type(name: str, expected: str, value: Any) -> BadRequest:
    got = "a boolean" if isinstance(value, bool) else f"a {type(value).__name__}"
    return BadRequest(f"Invalid type for '{name}': expected {expected}, but got {got} instead.",
                      param=name, code="invalid_type")


def _checked_int(body: Mapping[str, Any], name: str, minimum: int, maximum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise _bad_type(name, "an integer", value)
    if value < minimum:
        raise BadRequest(f"Invalid '{name}': integer below minimum value. Expected a value >= {minimum}, "
                         f"but got {value} instead.", param=name, code="integer_below_min_value")
    if value > maximum:
        raise BadRequest(f"Invalid '{name}': integer above maximum value. Expected a value <= {maximum}, "
                         f"but got {value} instead.", param=name, code="integer_above_max_value")
    return value


def check_fields(body: Mapping[str, Any], endpoint: Endpoint) -> None:
    """400 unless every field Lumen reads is exactly what any backend will read."""
    for key in body:
        if key not in READ_FIELDS and key.casefold() in _FOLDED:
            name = _FOLDED[key.casefold()]
            raise BadRequest(f"Unrecognized request argument supplied: {key} (did you mean '{name}'? Field "
                             "names are case-sensitive).", param=key)
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise _bad_type("stream", "a boolean", body["stream"])
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise _bad_type("stream_options", "an object", body["stream_options"])
    for name, why in endpoint.refused.items():
        value = body.get(name)
        if value is not None and value is not False:
            raise BadRequest(why, param=name)
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise _bad_type("previous_response_id", "a string", previous)
    for name in endpoint.output_fields:
        if endpoint.output_required and body.get(name) is None:
            raise BadRequest(f"{name}: Field required", param=name)
        _checked_int(body, name, 1 if endpoint.output_required else 0, INT32_MAX)
    for name in endpoint.choice_fields:
        _checked_int(body, name, 1, MAX_CHOICES)


def count_parts(items: Any) -> dict[str, int]:
    """Media parts per kind in a list of messages or input items: in their content lists (and the
    content lists of those parts, such as a tool result's images), or items that are parts themselves.
    Strings and text parts cost nothing here."""
    counts: dict[str, int] = {}
    if isinstance(items, list):
        _count_parts(items, counts, PART_DEPTH)
    return counts


def _count_parts(items: list[Any], counts: dict[str, int], depth: int) -> None:
    for item in items:
        if not isinstance(item, dict):
            continue
        kind_name = item.get("type")
        kind = MEDIA_PARTS.get(kind_name) if isinstance(kind_name, str) else None
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
        content = item.get("content")
        if depth > 1 and isinstance(content, list):
            _count_parts(content, counts, depth - 1)


class WorstCase(NamedTuple):
    """What a request may cost at most, in tokens: the hold, the tpm admission and the billing bound.

    A named tuple: built for every request, and a frozen dataclass costs ~4 times as much to build."""

    prompt: int  # held prompt tokens
    completion: int  # held completion tokens: prompts × choices × output cap
    typical_prompt: int  # billed when a backend reports no usage: ~4 bytes of JSON per token
    inject: int | None  # the output cap to set on the way out; None when the request sets its own

    @property
    def tokens(self) -> int:
        return self.prompt + self.completion

    def bound(self) -> tuple[int, int]:
        """The most one response may bill: twice the held prompt (1 byte per token, twice each media
        minimum), and exactly the held completion (the backend was told not to exceed it)."""
        return min(2 * self.prompt, MAX_BILLED_TOKENS), min(self.completion, MAX_BILLED_TOKENS)


def worst_case(body: Mapping[str, Any], body_size: int, endpoint: Endpoint, model: Model) -> WorstCase:
    """The request's worst case; ``body`` has passed :func:`check_fields`.

    Prompt: 2 bytes of JSON per token, a deliberate over-estimate (English runs ~4, short words like
    "a a a" reach 2), plus what bytes cannot see: special tokens a backend adds to each prompt or
    input of a list, and each media part at least its configured minimum. This runs for every
    request: plain loops, no intermediate lists.
    """
    value = body.get(endpoint.input_field)
    if endpoint.media:
        items = 1
        parts = count_parts(value)
        media = model.part_tokens.held_for(parts) if parts else 0
    else:
        items, media = prompt_count(value), 0
    prompt = body_size // 2 + 1 + PER_ITEM_TOKENS * items + media
    typical = body_size // 4 + 1 + media
    if not endpoint.output_fields:
        return WorstCase(prompt, 0, typical, None)
    cap: int | None = None
    for name in endpoint.output_fields:
        given = body.get(name)
        if given is not None and (cap is None or given > cap):
            cap = given
    choices = 1
    for name in endpoint.choice_fields:
        given = body.get(name)
        if given is not None and given > choices:
            choices = given
    inject = None
    if cap is None:
        cap = inject = model.max_output_tokens
    return WorstCase(prompt, endpoint.prompts(value) * choices * cap, typical, inject)


def upstream_body(body: Mapping[str, Any], endpoint: Endpoint, backend: Backend, worst: WorstCase,
                  ) -> tuple[dict[str, Any], bool]:
    """The object to send to ``backend``, and whether we asked for stream usage (and must drop its chunk).

    Only ``model``, the output cap (when the request has none) and ``stream_options.include_usage``
    change; everything else is the client's, re-serialised from the object Lumen checked.
    """
    out = dict(body)
    out["model"] = backend.model
    if worst.inject is not None:
        field = backend.max_tokens_field if backend.max_tokens_field in endpoint.output_fields else \
            endpoint.output_fields[-1]
        out[field] = worst.inject
    options = body.get("stream_options")
    client_asked = isinstance(options, dict) and options.get("include_usage") is True
    inject = endpoint.usage_option and backend.inject_stream_usage and body.get("stream") is True and not client_asked
    if inject:
        out["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return out, inject

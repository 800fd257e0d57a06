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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from .config import Backend, Model
from .errors import BadRequest

INT32_MAX = 2**31 - 1
MAX_CHOICES = 128  # OpenAI's limit on n; best_of is held to it too
MAX_BILLED_TOKENS = 2**40  # per count and row, whatever the request: sums of millions of rows fit SQLite
PER_ITEM_TOKENS = 2  # special tokens a backend adds per prompt or input of a list (BOS/EOS, CLS/SEP)

MEDIA_PARTS: Mapping[str, str] = {
    "image_url": "image", "input_image": "image", "image": "image",
    "input_audio": "audio", "audio": "audio", "audio_url": "audio",
    "video_url": "video", "video": "video",
    "file": "file", "input_file": "file",
}
"""Content-part types (OpenAI chat and Responses, vLLM extensions) and the kind of part they are."""

READ_FIELDS = frozenset({"model", "max_tokens", "max_completion_tokens", "n", "best_of", "stream",
                         "stream_options", "messages", "prompt", "input"})
"""Top-level fields whose value Lumen acts on, on any endpoint; their case variants are refused."""
_FOLDED = {name.casefold(): name for name in READ_FIELDS}

Usage = tuple[int, int]
"""(prompt_tokens, completion_tokens) as a backend reported them, validated."""


def _count(value: Any) -> int | None:
    """A token count as billing accepts it: a non-negative int (not a bool, not a float), else None."""
    return value if type(value) is int and value >= 0 else None


def _counts(usage: Any, completion_default: int | None) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens", completion_default))
    return None if prompt is None or completion is None else (prompt, completion)


def completion_usage(usage: Any) -> Usage | None:
    """Chat and text completions: both counts must be there and valid."""
    return _counts(usage, None)


def embedding_usage(usage: Any) -> Usage | None:
    """Embeddings report prompt tokens only."""
    return _counts(usage, 0)


def one_prompt(value: Any) -> int:
    return 1


def prompt_count(value: Any) -> int:
    """``prompt`` of /v1/completions: a list of strings or of token lists is that many prompts."""
    if isinstance(value, list) and value and isinstance(value[0], str | list):
        return len(value)
    return 1


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str  # what clients call
    upstream: str  # appended to a backend's base URL (which ends in /v1)
    streams: bool  # honours "stream": true with SSE
    output_fields: tuple[str, ...]  # fields that cap the output; () = no output tokens (embeddings)
    choice_fields: tuple[str, ...]  # fields that multiply the output
    input_field: str  # where the prompt lives
    prompts: Callable[[Any], int]  # how many prompts the input holds (each gets every choice)
    usage: Callable[[Any], Usage | None]  # validated counts from the body's "usage" object


ENDPOINTS: Mapping[str, Endpoint] = {e.path: e for e in (
    Endpoint("/v1/chat/completions", "/chat/completions", True, ("max_completion_tokens", "max_tokens"),
             ("n", "best_of"), "messages", one_prompt, completion_usage),
    Endpoint("/v1/completions", "/completions", True, ("max_tokens",), ("n", "best_of"), "prompt",
             prompt_count, completion_usage),
    Endpoint("/v1/embeddings", "/embeddings", False, (), (), "input", one_prompt, embedding_usage),
)}


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
    for name in endpoint.output_fields:
        _checked_int(body, name, 0, INT32_MAX)
    for name in endpoint.choice_fields:
        _checked_int(body, name, 1, MAX_CHOICES)


def count_parts(messages: Any) -> dict[str, int]:
    """Media parts per kind in chat messages' content lists (strings and text parts cost nothing here)."""
    counts: dict[str, int] = {}
    if not isinstance(messages, list):
        return counts
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            kind_name = part.get("type") if isinstance(part, dict) else None
            kind = MEDIA_PARTS.get(kind_name) if isinstance(kind_name, str) else None
            if kind is not None:
                counts[kind] = counts.get(kind, 0) + 1
    return counts


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

    def bound(self) -> Usage:
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
    if endpoint.input_field == "messages":
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
    inject = endpoint.streams and backend.inject_stream_usage and body.get("stream") is True and not client_asked
    if inject:
        out["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return out, inject

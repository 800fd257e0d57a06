"""The Responses and Anthropic Messages APIs of the built-in echo backend (``builtin:echo``).

They use the same wire formats as the model servers Lumen relays to, so a demo goes through the same
relay, SSE scanner and billing that real backends do. Each format follows vLLM's server:
- Responses: ``vllm/entrypoints/openai/responses/`` (``event:`` lines, a ``sequence_number`` on every
  event, usage only in the final ``response.completed``, no ``[DONE]``). DELETE and input_items follow
  OpenAI's reference, since vLLM has neither.
- Messages: ``vllm/entrypoints/anthropic/`` plus Anthropic's ``ping`` (message_start carries the input side
  of usage, message_delta the cumulative usage, no ``[DONE]``).

Replies repeat the last user text, one token per word; prompts count words plus 4 per message, as the
chat echo does. Output stops at ``max_output_tokens`` / ``max_tokens``.

The responses an app's echo created live in that app's :class:`EchoStore` (the runtime holds it), at most
STORE_LIMIT of them, oldest dropped: enough for retrieve, delete, input_items, cancel and
``previous_response_id`` in a demo. An unknown id gets OpenAI's 404 error body.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

JSON = dict[str, Any]
STORE_LIMIT = 1000  # responses kept for follow-ups; the oldest goes first
PREFIX = "Echo from Lumen's built-in model:"


@dataclass
class Answer:
    """What the echo answers: a status and a JSON body, or (status 200) the events of a stream."""

    status: int
    payload: Any = None
    events: list[JSON] = field(default_factory=list)
    is_stream: bool = False

    def body(self) -> bytes:
        return orjson.dumps(self.payload)

    def frames(self) -> Iterator[bytes]:
        """Each event as one SSE block, its `event:` line first (both formats name their events)."""
        for event in self.events:
            yield b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


@dataclass
class _Stored:
    response: JSON
    input_items: list[JSON]
    history: list[tuple[str, str]]  # (role, text) turns a previous_response_id continues


class EchoStore:
    """The responses one app's echo created, for its follow-ups: at most STORE_LIMIT, oldest dropped."""

    def __init__(self) -> None:
        self.responses: OrderedDict[str, _Stored] = OrderedDict()

    def keep(self, response_id: str, stored: _Stored) -> None:
        self.responses[response_id] = stored
        while len(self.responses) > STORE_LIMIT:
            self.responses.popitem(last=False)


def answer(path: str, body: Mapping[str, Any] | None, method: str, store: EchoStore) -> Answer:
    """The echo's answer to `method path` (relative to the API root) with the parsed JSON `body`."""
    route = urlsplit(path)
    parts = route.path.strip("/").split("/")
    request = dict(body or {})
    if method == "POST" and parts == ["messages"]:
        return _message(request)
    if method == "POST" and parts == ["messages", "count_tokens"]:
        return Answer(200, {"input_tokens": _prompt_tokens(_anthropic_turns(request))})
    if method == "POST" and parts == ["responses"]:
        return _create_response(request, store)
    if len(parts) >= 2 and parts[0] == "responses":
        return _follow_up(parts[1], parts[2:], method, parse_qs(route.query), store)
    return _openai_error(404, f"Unknown request URL: {method} {route.path}.", None)


# ---- shared ----


def _text(content: Any) -> str:
    """The words of a content value: a string, or the text of its parts (tool results included)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = [_text(p.get("content")) if p.get("type") == "tool_result" else str(p.get("text", ""))
             for p in content if isinstance(p, dict)]
    return " ".join(t for t in texts if t)


def _prompt_tokens(turns: list[tuple[str, str]]) -> int:
    return sum(len(text.split()) + 4 for _, text in turns)


def _reply_words(turns: list[tuple[str, str]], cap: Any) -> tuple[list[str], bool]:
    """The echo's words, cut at the output cap, and whether they were cut."""
    users = [text for role, text in turns if role == "user"]
    words = f"{PREFIX} {users[-1] if users else ''}".strip().split(" ")
    if isinstance(cap, int) and 0 <= cap < len(words):
        return words[:cap], True
    return words, False


def _deltas(words: list[str]) -> list[str]:
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


def _openai_error(status: int, message: str, param: str | None, code: str | None = None) -> Answer:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return Answer(status, {"error": {"message": message, "type": kind, "param": param, "code": code}})


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


# ---- Anthropic Messages ----


def _anthropic_turns(body: JSON) -> list[tuple[str, str]]:
    system = _text(body.get("system"))
    turns = [("system", system)] if system else []
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict):
            turns.append((str(message.get("role")), _text(message.get("content"))))
    return turns


def _anthropic_error(status: int, kind: str, message: str) -> Answer:
    return Answer(status, {"type": "error", "error": {"type": kind, "message": message}})


def _message(body: JSON) -> Answer:
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return _anthropic_error(400, "invalid_request_error", "messages: Field required")
    if not isinstance(body.get("max_tokens"), int):
        return _anthropic_error(400, "invalid_request_error", "max_tokens: Field required")
    turns = _anthropic_turns(body)
    words, cut = _reply_words(turns, body["max_tokens"])
    usage = {"input_tokens": _prompt_tokens(turns), "cache_creation_input_tokens": 0,
             "cache_read_input_tokens": 0, "output_tokens": len(words)}
    message = {"id": _new_id("msg"), "type": "message", "role": "assistant", "model": body.get("model", "echo"),
               "content": [{"type": "text", "text": " ".join(words)}],
               "stop_reason": "max_tokens" if cut else "end_turn", "stop_sequence": None, "usage": usage}
    if body.get("stream") is not True:
        return Answer(200, message)
    opening = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {**usage, "output_tokens": 1}}
    events: list[JSON] = [
        {"type": "message_start", "message": opening},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d}}
          for d in _deltas(words)),
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
         "usage": usage},
        {"type": "message_stop"},
    ]
    return Answer(200, events=events, is_stream=True)


# ---- Responses ----


def _input_turns(value: Any) -> list[tuple[str, str]]:
    """(role, text) of a Responses `input`: a string, or items (function outputs count as tool turns)."""
    if isinstance(value, str):
        return [("user", value)]
    turns = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, dict) and item.get("type") == "function_call_output":
            turns.append(("tool", str(item.get("output", ""))))
        elif isinstance(item, dict) and item.get("type", "message") == "message":
            turns.append((str(item.get("role", "user")), _text(item.get("content"))))
    return turns


def _input_items(value: Any) -> list[JSON]:
    """The stored form of the input: each message with an id and input_text parts."""
    items = [{"role": "user", "content": value}] if isinstance(value, str) else value if isinstance(value, list) else []
    stored = []
    for item in (i for i in items if isinstance(i, dict)):
        content = item.get("content")
        parts = [{"type": "input_text", "text": content}] if isinstance(content, str) else content
        stored.append({"id": _new_id("msg"), "type": "message", "role": item.get("role", "user"),
                       "content": parts, "status": "completed"} if item.get("type", "message") == "message"
                      else {"id": _new_id("item"), **item})
    return stored


def _response_object(body: JSON, response_id: str, status: str, output: list[JSON], usage: Any) -> JSON:
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()), "status": status,
        "background": False, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "model": body.get("model", "echo"), "output": output, "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"), "store": body.get("store", True) is not False,
        "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [], "top_p": 1.0, "truncation": "disabled", "usage": usage,
    }


def _create_response(body: JSON, store: EchoStore) -> Answer:
    if not isinstance(body.get("input"), str | list):
        return _openai_error(400, "Missing required parameter: 'input'.", "input")
    previous = body.get("previous_response_id")
    if previous is not None and previous not in store.responses:
        return _openai_error(404, f"Previous response with id '{previous}' not found.", "previous_response_id",
                             "previous_response_not_found")
    history = store.responses[previous].history if previous is not None else []
    instructions = body.get("instructions")
    turn = _input_turns(body["input"])
    system = [("system", instructions)] if isinstance(instructions, str) and instructions else []
    prompt = _prompt_tokens([*system, *history, *turn])
    words, cut = _reply_words(turn, body.get("max_output_tokens"))
    text = " ".join(words)
    usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": len(words),
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + len(words)}
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {"id": _new_id("msg"), "type": "message", "status": "completed", "role": "assistant", "content": [part]}
    response_id = _new_id("resp")
    final = _response_object(body, response_id, "incomplete" if cut else "completed", [item], usage)
    if body.get("store", True) is not False:
        store.keep(response_id, _Stored(final, _input_items(body["input"]), [*history, *turn, ("assistant", text)]))
    if body.get("stream") is not True:
        return Answer(200, final)
    initial = _response_object(body, response_id, "in_progress", [], None)
    return Answer(200, events=_response_events(initial, final, item, words), is_stream=True)


def _response_events(initial: JSON, final: JSON, item: JSON, words: list[str]) -> list[JSON]:
    part = item["content"][0]
    at = {"output_index": 0, "item_id": item["id"], "content_index": 0}
    events: list[JSON] = [
        {"type": "response.created", "response": initial},
        {"type": "response.in_progress", "response": initial},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**item, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **at, "part": {**part, "text": ""}},
        *({"type": "response.output_text.delta", **at, "delta": d, "logprobs": []} for d in _deltas(words)),
        {"type": "response.output_text.done", **at, "text": part["text"], "logprobs": []},
        {"type": "response.content_part.done", **at, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": final},  # vLLM: also when cut ("incomplete" inside)
    ]
    return [{"type": e["type"], "sequence_number": n, **e} for n, e in enumerate(events)]




def _follow_up(response_id: str, rest: list[str], method: str, query: dict[str, list[str]],
               store: EchoStore) -> Answer:
    """GET/DELETE /responses/{id}, POST /responses/{id}/cancel, GET /responses/{id}/input_items."""
    stored = store.responses.get(response_id)
    if stored is None:
        return _openai_error(404, f"Response with id '{response_id}' not found.", "response_id")
    if method == "GET" and not rest:
        return Answer(200, stored.response)
    if method == "DELETE" and not rest:
        del store.responses[response_id]
        return Answer(200, {"id": response_id, "object": "response", "deleted": True})
    if method == "POST" and rest == ["cancel"]:  # the echo answers at once: nothing is ever in progress
        return _openai_error(400, "Cannot cancel a synchronous response.", "response_id")
    if method == "GET" and rest == ["input_items"]:
        return Answer(200, _item_page(stored.input_items, query))
    return _openai_error(404, f"Unknown request URL: {method} /responses/{response_id}/{'/'.join(rest)}.", None)


def _item_page(items: list[JSON], query: dict[str, list[str]]) -> JSON:
    """One page of input items: `order` (desc by default, as OpenAI), `after` and `limit` (20)."""
    ordered = items if query.get("order") == ["asc"] else items[::-1]
    ids = [item["id"] for item in ordered]
    after = query.get("after", [""])[0]
    if after in ids:
        ordered = ordered[ids.index(after) + 1 :]
    limit = int(query.get("limit", ["20"])[0]) if query.get("limit", ["20"])[0].isdigit() else 20
    page = ordered[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}

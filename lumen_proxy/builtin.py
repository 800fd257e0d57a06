"""The built-in ``builtin:echo`` backend: a demo and smoke test with no model server.

It answers in OpenAI's exact wire format (chat, completions, embeddings; streams with
``stream_options.include_usage``), so the whole proxy path (auth, limits, billing, SSE relay) is the
same one real backends take. Replies repeat the last user message; token counts are word counts.
Like a real server it stops at ``max_tokens`` (the relay always sets one) and answers ``n`` choices.
The Responses and Anthropic Messages APIs, and the stored-response follow-ups, are in ``builtin_formats``.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from .builtin_formats import Answer, EchoStore, answer

STREAM_DELAY = 0.01  # seconds between chunks, so streaming is visible in a terminal


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: keep the text ones
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(len(_text_of(m.get("content")).split()) + 4 for m in messages if isinstance(m, dict))
    prompt = body.get("prompt", body.get("input", ""))
    items = prompt if isinstance(prompt, list) else [prompt]
    return max(1, sum(len(str(p).split()) for p in items))


def _reply(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    last = ""
    if isinstance(messages, list):
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        last = _text_of(users[-1].get("content")) if users else ""
    else:
        last = str(body.get("prompt", ""))
    return f"Echo from Lumen's built-in model: {last}".strip()


def _words(body: dict[str, Any]) -> list[str]:
    """The reply's words (one token each), cut at the request's output cap."""
    words = _reply(body).split(" ")
    caps = [v for v in (body.get("max_completion_tokens"), body.get("max_tokens")) if isinstance(v, int)]
    return words[:max(caps)] if caps else words


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and n > 0 else 1


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


_ANSWERED_HERE = ("/chat/completions", "/completions", "/embeddings")  # the rest: builtin_formats


class EchoUpstream:
    """Looks like an HTTP upstream response to the relay.

    ``path`` is relative to the API root (``/chat/completions``, ``/responses/resp_1/input_items``);
    ``body`` is the JSON body, None for GET, DELETE and cancel; ``store`` keeps the app's echo responses.
    """

    def __init__(self, path: str, body: dict[str, Any] | None, store: EchoStore, method: str = "POST") -> None:
        self.path, self.body = path, body or {}
        # Answered at once (the relay reads `status` first); None for chat, completions and embeddings.
        self.answer: Answer | None = None if path in _ANSWERED_HERE else answer(path, body, method, store)
        self.status = 200 if self.answer is None else self.answer.status
        if self.answer is not None:
            self.stream = self.answer.is_stream
        else:
            self.stream = self.body.get("stream") is True and path != "/embeddings"
        self.content_type = "text/event-stream" if self.stream else "application/json"
        self.retry_headers: dict[str, str] = {}
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.closed = False

    async def read(self, limit: int = 0) -> bytes:
        if self.answer is not None:
            return self.answer.body()
        prompt = _prompt_tokens(self.body)
        model = self.body.get("model", "echo")
        if self.path == "/embeddings":
            inputs = self.body.get("input", "")
            items = inputs if isinstance(inputs, list) else [inputs]
            data = [{"object": "embedding", "index": i, "embedding": _embed(str(x))} for i, x in enumerate(items)]
            return orjson.dumps({"object": "list", "data": data, "model": model,
                                 "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})
        words, n = _words(self.body), _choices(self.body)
        text = " ".join(words)
        finish = "stop" if len(words) == len(_reply(self.body).split(" ")) else "length"
        usage = _usage(prompt, n * len(words))
        if self.path == "/completions":
            choices: list[dict[str, Any]] = [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                                             for i in range(n)]
            return orjson.dumps({"id": self.id.replace("chatcmpl", "cmpl"), "object": "text_completion",
                                 "created": self.created, "model": model, "choices": choices, "usage": usage})
        message = {"role": "assistant", "content": text, "refusal": None}
        return orjson.dumps({
            "id": self.id, "object": "chat.completion", "created": self.created, "model": model,
            "choices": [{"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                        for i in range(n)],
            "usage": usage,
        })

    async def chunks(self) -> AsyncIterator[bytes]:
        if not self.stream:
            yield await self.read()
            return
        if self.answer is not None:
            for frame in self.answer.frames():
                if self.closed:
                    return
                yield frame
                await asyncio.sleep(STREAM_DELAY)
            return
        options = self.body.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True
        words, n = _words(self.body), _choices(self.body)
        finish = "stop" if len(words) == len(_reply(self.body).split(" ")) else "length"
        chat = self.path == "/chat/completions"
        extra = {"usage": None} if with_usage else {}
        base = {"id": self.id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": self.created, "model": self.body.get("model", "echo")}
        deltas: list[tuple[Any, Any]] = [({"role": "assistant", "content": ""}, None)] if chat else []
        deltas += [({"content": w if i == 0 else " " + w}, None) for i, w in enumerate(words)]
        deltas.append(({}, finish))
        for delta, finish_reason in deltas:
            if self.closed:
                return
            choices = [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason} if chat else
                       {"index": i, "text": delta.get("content", ""), "logprobs": None,
                        "finish_reason": finish_reason} for i in range(n)]
            yield b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"
            await asyncio.sleep(STREAM_DELAY)
        if with_usage:
            usage = _usage(_prompt_tokens(self.body), n * len(words))
            yield b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    def close(self) -> None:
        self.closed = True


def _embed(text: str, dims: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((b - 128) / 128, 4) for b in digest[:dims]]

"""The relay, non-stream: what the client sends reaches the backend unchanged but for ``model``, and
what the backend answers reaches the client unchanged. Driven by the real ``openai`` SDK, and by raw
aiohttp where the bytes themselves are the point.
"""

from __future__ import annotations

import base64
import gzip
import json
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import UPSTREAM_KEY, MakeProxy, Proxy, build_config, config_dict
from tests.fake_upstream import (
    TOOL_ARGUMENTS,
    WEATHER_TOOL,
    UpstreamServer,
    chat_reply,
    count_prompt_tokens,
    embedding_vector,
    serve_upstream,
)

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Explain quantum entanglement"}]

def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---- models ----


async def test_models_list_is_openais_list_format(proxy: Proxy, alice: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{proxy.base_url}/models", headers=bearer(alice)) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        listing = await response.json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["gpt-4o", "text-embedding-3-small", "echo"]
    for model in listing["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"}
        assert model["object"] == "model"
        assert isinstance(model["created"], int) and isinstance(model["owned_by"], str)


async def test_models_list_and_retrieve_with_the_sdk(proxy: Proxy, alice: str) -> None:
    client = proxy.sdk(alice)
    assert [m.id async for m in client.models.list()] == ["gpt-4o", "text-embedding-3-small", "echo"]
    model = await client.models.retrieve("gpt-4o")
    assert (model.id, model.object) == ("gpt-4o", "model")


async def test_retrieving_an_unknown_model_is_404_model_not_found(proxy: Proxy, alice: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await proxy.sdk(alice).models.retrieve("gpt-5-turbo-max")
    assert caught.value.code == "model_not_found"
    assert "gpt-5-turbo-max" in caught.value.message


# ---- chat, non-stream ----


async def test_chat_reply_and_usage_come_from_the_backend(
    proxy: Proxy, alice: str, upstream: UpstreamServer
) -> None:
    completion = await proxy.sdk(alice).chat.completions.create(model="gpt-4o", messages=HELLO)
    assert completion.choices[0].message.content == chat_reply("up1", HELLO)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == count_prompt_tokens(HELLO)
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


async def test_non_stream_body_reaches_the_client_byte_for_byte(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    upstream.state.behavior.cached_tokens = 3  # usage details must survive too
    body = {"model": "gpt-4o", "messages": HELLO}
    async with http.post(f"{proxy.base_url}/chat/completions", json=body, headers=bearer(alice)) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        received = await response.read()
    assert received == bytes(upstream.state.last.sent)
    assert json.loads(received)["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}


async def test_model_is_rewritten_to_the_backends_name_and_nothing_else_changes(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    body: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": HELLO,
        "temperature": 0.25,
        "max_tokens": 50,
        "seed": 7,
        "user": "alice@example.org",
    }
    async with http.post(f"{proxy.base_url}/chat/completions", json=body, headers=bearer(alice)) as response:
        assert response.status == 200
    assert upstream.state.last.body == {**body, "model": "fake-model"}


async def test_unknown_request_fields_pass_through(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}},
    }
    await proxy.sdk(alice).chat.completions.create(
        model="gpt-4o",
        messages=HELLO,
        tools=[WEATHER_TOOL],
        tool_choice="none",
        response_format=response_format,
        logprobs=True,
        top_logprobs=2,
        extra_body={"top_k": 40, "repetition_penalty": 1.1, "chat_template_kwargs": {"thinking": False}},
    )
    sent = upstream.state.last.body
    assert sent["model"] == "fake-model"
    assert sent["tools"] == [WEATHER_TOOL]
    assert sent["tool_choice"] == "none"
    assert sent["response_format"] == response_format
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2)
    assert (sent["top_k"], sent["repetition_penalty"]) == (40, 1.1)
    assert sent["chat_template_kwargs"] == {"thinking": False}


async def test_backend_gets_its_own_key_and_never_the_clients(
    proxy: Proxy, alice: str, upstream: UpstreamServer
) -> None:
    upstream.state.behavior.api_key = UPSTREAM_KEY  # the fake refuses any other key with 401
    await proxy.sdk(alice).chat.completions.create(model="gpt-4o", messages=HELLO)
    seen = upstream.state.last.headers
    assert seen["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert all(alice not in value for value in seen.values())


async def test_expect_100_continue_is_answered_here_and_not_forwarded(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    """curl sends `Expect: 100-continue` for large bodies; a backend that ignores it would stall us."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 5000}]}
    async with http.post(f"{proxy.base_url}/chat/completions", json=body, headers=bearer(alice),
                         expect100=True) as response:
        assert response.status == 200
    assert "Expect" not in upstream.state.last.headers


async def test_only_headers_lumen_means_to_send_go_upstream(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    """An allow list: before, OpenAI-Organization from the client reached OpenAI beside the admin's key (the
    client chose whom OpenAI bills), and Content-Encoding: gzip was forwarded for a body already decoded."""
    headers = {
        **bearer(alice),
        "Connection": "keep-alive, X-Hop-Only",
        "Keep-Alive": "timeout=5",
        "X-Hop-Only": "for the proxy only",
        "TE": "trailers",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Cookie": "session=abc",
        "OpenAI-Organization": "org-physics",
        "OpenAI-Project": "proj-x",
        "X-Custom-Trace": "trace-42",
        "X-Stainless-OS": "Linux",
        "Accept": "application/json",
    }
    body = {"model": "gpt-4o", "messages": HELLO}
    async with http.post(f"{proxy.base_url}/chat/completions", json=body, headers=headers) as response:
        assert response.status == 200
        request_id = response.headers["x-request-id"]
    seen = upstream.state.last.headers
    for name in ("Keep-Alive", "X-Hop-Only", "TE", "Proxy-Authorization", "Cookie", "OpenAI-Organization",
                 "OpenAI-Project", "X-Custom-Trace", "X-Stainless-OS"):
        assert name not in seen, name
    assert seen["Accept"] == "application/json" and seen["Accept-Encoding"] == "identity"
    assert seen["X-Request-ID"] == request_id  # a backend's log line can be matched with ours


async def test_a_gzipped_request_body_is_decoded_and_sent_plain(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    body = gzip.compress(json.dumps({"model": "gpt-4o", "messages": HELLO}).encode())
    async with http.post(f"{proxy.base_url}/chat/completions", data=body, headers={
            **bearer(alice), "Content-Type": "application/json", "Content-Encoding": "gzip"}) as response:
        assert response.status == 200
    assert "Content-Encoding" not in upstream.state.last.headers
    assert upstream.state.last.body["messages"] == HELLO


async def test_headers_a_backend_needs_come_from_its_config(
    make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = config_dict(tmp_path, [upstream.base_url])
    data["models"][0]["backends"][0]["headers"] = {"OpenAI-Organization": "org-dept", "OpenAI-Project": "proj-1"}
    proxy = await make_proxy(build_config(tmp_path, data))
    await proxy.account("alice")
    key = await proxy.key("alice")
    async with http.post(f"{proxy.base_url}/chat/completions", json={"model": "gpt-4o", "messages": HELLO},
                         headers={**bearer(key), "OpenAI-Organization": "org-student"}) as response:
        assert response.status == 200
    seen = upstream.state.last.headers
    assert (seen["OpenAI-Organization"], seen["OpenAI-Project"]) == ("org-dept", "proj-1")


async def test_tool_call_non_stream(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    completion = await proxy.sdk(alice).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert (call.function.name, call.function.arguments) == ("get_weather", TOOL_ARGUMENTS)
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_tool_result_turn_is_relayed(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": TOOL_ARGUMENTS}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    completion = await proxy.sdk(alice).chat.completions.create(
        model="gpt-4o", messages=messages, tools=[WEATHER_TOOL]
    )
    assert completion.choices[0].message.content == chat_reply("up1", messages)
    assert upstream.state.last.body["messages"] == messages


# ---- completions and embeddings: the same relay ----


async def test_text_completions_are_relayed(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    completion = await proxy.sdk(alice).completions.create(model="gpt-4o", prompt="Once upon a time", max_tokens=20)
    assert completion.choices[0].text == "Echo from up1: Once upon a time"
    assert completion.usage is not None and completion.usage.prompt_tokens == 4
    assert upstream.state.last.path == "/v1/completions"
    assert upstream.state.last.body == {"model": "fake-model", "prompt": "Once upon a time", "max_tokens": 20}


async def test_embeddings_are_relayed(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    client = proxy.sdk(alice)
    result = await client.embeddings.create(model="text-embedding-3-small", input=["alpha beta", "gamma"])
    assert [d.embedding for d in result.data] == [embedding_vector("alpha beta"), embedding_vector("gamma")]
    assert result.usage.prompt_tokens == 3
    assert upstream.state.last.path == "/v1/embeddings"
    assert upstream.state.last.body["model"] == "fake-embed"
    # The SDK asks for base64 by default; that choice reaches the backend and its answer comes back.
    assert upstream.state.last.body["encoding_format"] == "base64"


async def test_embeddings_base64_bytes_are_untouched(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "text-embedding-3-small", "input": "alpha", "encoding_format": "base64", "dimensions": 4}
    async with http.post(f"{proxy.base_url}/embeddings", json=body, headers=bearer(alice)) as response:
        assert response.status == 200
        received = await response.read()
    assert received == bytes(upstream.state.last.sent)
    encoded = json.loads(received)["data"][0]["embedding"]
    assert list(struct.unpack("<4f", base64.b64decode(encoded))) == embedding_vector("alpha", 4)


# ---- the backend's own errors ----


async def test_backend_4xx_reaches_the_client_with_its_status_and_body(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    upstream.state.behavior.max_context_tokens = 5
    body = {"model": "gpt-4o", "messages": HELLO}
    async with http.post(f"{proxy.base_url}/chat/completions", json=body, headers=bearer(alice)) as response:
        assert response.status == 400
        received = await response.read()
    assert received == bytes(upstream.state.last.sent)
    assert json.loads(received)["error"]["code"] == "context_length_exceeded"


async def test_backend_4xx_with_the_sdk(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    upstream.state.behavior.max_context_tokens = 5
    with pytest.raises(openai.BadRequestError) as caught:
        await proxy.sdk(alice).chat.completions.create(model="gpt-4o", messages=HELLO)
    assert caught.value.status_code == 400
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "messages"
    assert "maximum context length is 5 tokens" in caught.value.message


async def test_a_backends_own_429_passes_its_retry_after_to_the_client(
    tmp_path: Path, make_proxy: MakeProxy
) -> None:
    """OpenAI itself rate-limits the department: its Retry-After must reach the SDK, which then waits."""
    calls = 0

    async def chat(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            error = {"error": {"message": "Rate limit reached for gpt-4o", "type": "requests", "param": None,
                               "code": "rate_limit_exceeded"}}
            return web.json_response(error, status=429, headers={"Retry-After": "1", "retry-after-ms": "600"})
        body = await request.json()
        return web.json_response({
            "id": "chatcmpl-r", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "later"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with serve_upstream(app) as backend:
        proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [backend.base_url])))
        await proxy.account("alice")
        key = await proxy.key("alice")
        async with aiohttp.ClientSession() as http:
            async with http.post(proxy.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                 json={"model": "gpt-4o", "messages": HELLO}) as resp:
                assert resp.status == 429
                assert resp.headers["Retry-After"] == "1"
                assert resp.headers["retry-after-ms"] == "600"
                assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
        calls = 0
        started = time.monotonic()
        reply = await proxy.sdk(key, max_retries=1).chat.completions.create(model="gpt-4o", messages=HELLO)
        assert reply.choices[0].message.content == "later"
        assert calls == 2
        assert time.monotonic() - started >= 0.55  # the SDK waited as the backend asked (600 ms)


async def test_backend_4xx_to_a_stream_request_is_a_json_error(
    proxy: Proxy, alice: str, upstream: UpstreamServer
) -> None:
    upstream.state.behavior.max_context_tokens = 5
    with pytest.raises(openai.BadRequestError) as caught:
        await proxy.sdk(alice).chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    assert caught.value.code == "context_length_exceeded"


async def test_success_carries_a_request_id(proxy: Proxy, alice: str) -> None:
    first = await proxy.sdk(alice).chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    second = await proxy.sdk(alice).chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert first.request_id and second.request_id
    assert first.request_id != second.request_id


def server_timing(header: str) -> dict[str, float]:
    parts = (p.strip().split(";dur=") for p in header.split(","))
    return {name: float(value) for name, value in parts}


@pytest.mark.parametrize("stream", [False, True])
async def test_server_timing_splits_the_proxy_from_the_backend(
    proxy: Proxy, alice: str, upstream: UpstreamServer, stream: bool
) -> None:
    """Users and admins can see the proxy's own share without trusting our benchmark."""
    upstream.state.behavior.first_byte_delay = 0.2
    raw = await proxy.sdk(alice).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HELLO, stream=stream
    )
    timing = server_timing(raw.headers["server-timing"])
    assert timing["upstream"] >= 200  # milliseconds: the backend's wait is the backend's
    assert 0 <= timing["proxy"] < 100  # and not counted as ours
    parsed = raw.parse()
    if stream:
        chunks = [chunk async for chunk in parsed]  # type: ignore[union-attr]
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        assert parsed.usage is not None  # type: ignore[union-attr]


async def test_a_backend_that_compresses_still_reaches_the_client_intact(
    tmp_path: Path, make_proxy: MakeProxy
) -> None:
    """Real backends (OpenAI behind a CDN) gzip JSON whenever the request allows it."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        payload = {"id": "chatcmpl-z", "object": "chat.completion", "created": 1, "model": body["model"],
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "squeezed " * 200},
                                "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 200, "total_tokens": 201}}
        response = web.json_response(payload)
        response.enable_compression()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with serve_upstream(app) as gzipping:
        gz = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [gzipping.base_url])))
        await gz.account("alice")
        completion = await gz.sdk(await gz.key("alice")).chat.completions.create(model="gpt-4o", messages=HELLO)
    assert completion.choices[0].message.content == "squeezed " * 200
    assert completion.usage is not None and completion.usage.completion_tokens == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_connections_to_the_backend_are_reused(
    proxy: Proxy, alice: str, upstream: UpstreamServer, stream: bool
) -> None:
    """A request read to its end hands its connection back: a new TCP connection per request costs the
    proxy a third more CPU and the backend a handshake."""
    client = proxy.sdk(alice)
    for _ in range(5):
        if stream:
            _ = [chunk async for chunk in await client.chat.completions.create(
                model="gpt-4o", messages=HELLO, stream=True)]
        else:
            await client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert len({r.peer for r in upstream.state.requests}) == 1

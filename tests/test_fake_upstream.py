"""The fake upstream is faithful: the real `openai` SDKs (Python here, Node via tests/node) parse it.

Proxy tests trust the fake's wire format and its recordings; these tests are why they may.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Literal

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.fake_upstream import (
    TOOL_ARGUMENT_FRAGMENTS,
    TOOL_ARGUMENTS,
    WEATHER_TOOL,
    UpstreamServer,
    chat_reply,
    count_prompt_tokens,
    embedding_vector,
    make_upstream,
    serve_upstream,
    split_pieces,
)
from tests.nodejs import arun_node_example, ensure_node_modules, node_available

MODEL = "fake-model"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]

@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamServer]:
    async with serve_upstream(make_upstream("up1", models=(MODEL, "fake-embed"))) as server:
        yield server


@pytest.fixture
async def client(upstream: UpstreamServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=upstream.base_url, api_key="sk-backend", max_retries=0) as client:
        yield client


# ---- models ----


async def test_models_list_and_retrieve(client: openai.AsyncOpenAI) -> None:
    ids = [model.id async for model in client.models.list()]
    assert ids == [MODEL, "fake-embed"]
    model = await client.models.retrieve(MODEL)
    assert (model.object, model.owned_by) == ("model", "up1")


async def test_unknown_model_retrieve_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("nope")
    assert caught.value.code == "model_not_found"


# ---- chat, non-stream ----


async def test_chat_reply_reflects_system_prompt_and_turns(
    client: openai.AsyncOpenAI, upstream: UpstreamServer
) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "what now?"}]},
    ]
    completion = await client.chat.completions.create(model="gpt-4o", messages=messages)
    choice = completion.choices[0]
    assert choice.message.content == "Echo from up1 [messages=4 system=yes]: what now?"
    assert choice.message.content == chat_reply("up1", messages)
    assert (choice.finish_reason, completion.model, completion.object) == (
        "stop",
        "gpt-4o",
        "chat.completion",
    )
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == count_prompt_tokens(messages) == 7 + 3 * 4
    assert completion.usage.completion_tokens == len(split_pieces(choice.message.content))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


async def test_request_is_recorded_with_headers_body_and_sent_bytes(
    client: openai.AsyncOpenAI, upstream: UpstreamServer
) -> None:
    raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
    record = upstream.state.last
    assert (record.method, record.path, record.status) == ("POST", "/v1/chat/completions", 200)
    assert record.authorization == "Bearer sk-backend"
    assert record.body == {"model": MODEL, "messages": HELLO}
    assert bytes(record.sent) == raw.content
    assert raw.headers["x-request-id"] == record.id == "up1-1"
    assert record.finished and not record.disconnected


async def test_cached_tokens_are_reported(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.cached_tokens = 2
    completion = await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 2


async def test_max_tokens_truncates_with_finish_reason_length(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert completion.choices[0].message.content == "Echo from "
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 2


async def test_reply_override(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.reply = "one two three"
    completion = await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert completion.choices[0].message.content == "one two three"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


async def test_omit_usage_non_stream(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.omit_usage = True
    completion = await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert completion.usage is None


# ---- chat, stream ----


async def test_stream_without_include_usage_has_no_usage(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat_reply("up1", HELLO)
    assert [c.choices[0].finish_reason for c in chunks][-2:] == [None, "stop"]
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    events = upstream.state.last.events()
    assert events[-1] == "[DONE]"
    assert all("usage" not in event for event in events[:-1])


async def test_stream_with_include_usage_ends_with_usage_chunk(
    client: openai.AsyncOpenAI, upstream: UpstreamServer
) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    *content_chunks, usage_chunk = chunks
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == count_prompt_tokens(HELLO)
    assert usage_chunk.usage.completion_tokens == len(content_chunks) - 2  # less the role and finish chunks
    # On the wire every other chunk carries an explicit "usage": null, as OpenAI sends it.
    events = upstream.state.last.events()
    assert all(event["usage"] is None for event in events[:-2])
    assert upstream.state.last.body["stream_options"] == {"include_usage": True}


async def test_omit_usage_even_when_asked(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.omit_usage = True
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)


async def test_stream_bytes_on_the_wire_are_the_recorded_bytes(upstream: UpstreamServer) -> None:
    body = {"model": MODEL, "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{upstream.base_url}/chat/completions", json=body) as response:
            assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            received = await response.read()
    assert received == bytes(upstream.state.last.sent)
    assert received.startswith(b'data: {"id":"chatcmpl-up1-1","object":"chat.completion.chunk"')
    assert received.endswith(b"\n\ndata: [DONE]\n\n")


async def test_stream_is_written_chunk_by_chunk(upstream: UpstreamServer) -> None:
    upstream.state.behavior.chunk_delay = 0.05
    body = {"model": MODEL, "messages": HELLO, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{upstream.base_url}/chat/completions", json=body) as response:
            first_line = await response.content.readline()
            assert first_line.startswith(b"data: {")
            assert not upstream.state.last.finished  # the first event arrived before the last was written
            await response.read()
    assert upstream.state.last.finished


async def test_keep_alive_comments_are_ignored_by_the_sdk(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.keep_alive = True
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == chat_reply("up1", HELLO)
    assert bytes(upstream.state.last.sent).startswith(b": keep-alive\n\ndata: {")


# ---- tool calls ----


async def test_tool_call_non_stream(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER_TOOL])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_tool_call_stream_fragments_concatenate_to_json(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        tools=[WEATHER_TOOL],
        stream=True,
    )
    name, fragments, finish = "", [], None
    async for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or []:
            assert call.index == 0
            name += call.function.name or "" if call.function else ""
            fragments.append(call.function.arguments if call.function and call.function.arguments else "")
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather"
    assert [f for f in fragments if f] == list(TOOL_ARGUMENT_FRAGMENTS)
    assert json.loads("".join(fragments)) == json.loads(TOOL_ARGUMENTS) == {"city": "Paris"}
    assert finish == "tool_calls"


async def test_tool_call_stream_through_the_sdk_stream_helper(client: openai.AsyncOpenAI) -> None:
    async with client.chat.completions.stream(model=MODEL, messages=HELLO, tools=[WEATHER_TOOL]) as stream:
        final = await stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_tool_result_turn_gets_a_text_reply(client: openai.AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        *HELLO,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": TOOL_ARGUMENTS},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    completion = await client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    assert completion.choices[0].message.content == "Echo from up1 [messages=3 system=no]: sunny"


# ---- text completions and embeddings ----


async def test_completions_non_stream(client: openai.AsyncOpenAI) -> None:
    completion = await client.completions.create(model=MODEL, prompt="Say this is a test")
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "Echo from up1: Say this is a test"
    assert completion.usage is not None and completion.usage.prompt_tokens == 5


async def test_completions_stream_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(
        model=MODEL, prompt="Say this", stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Echo from up1: Say this"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 2


@pytest.mark.parametrize("encoding_format", [openai.omit, "float"])
async def test_embeddings(
    client: openai.AsyncOpenAI, upstream: UpstreamServer, encoding_format: Literal["float"] | openai.Omit
) -> None:
    result = await client.embeddings.create(model="fake-embed", input=["a b", "c"], encoding_format=encoding_format)
    assert [e.index for e in result.data] == [0, 1]
    assert result.data[0].embedding == embedding_vector("a b")
    assert result.data[1].embedding == embedding_vector("c")
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (3, 3)
    # The Python SDK asks for base64 unless told otherwise; the fake answers in the format asked for.
    asked = encoding_format if isinstance(encoding_format, str) else "base64"
    assert upstream.state.last.body["encoding_format"] == asked


async def test_embeddings_dimensions(client: openai.AsyncOpenAI) -> None:
    result = await client.embeddings.create(model="fake-embed", input="x", dimensions=40)
    assert len(result.data[0].embedding) == 40


# ---- error modes ----


@pytest.mark.parametrize(
    ("status", "error_class"),
    [(500, openai.InternalServerError), (502, openai.InternalServerError), (503, openai.InternalServerError)],
)
async def test_fail_status(
    client: openai.AsyncOpenAI,
    upstream: UpstreamServer,
    status: int,
    error_class: type[openai.APIStatusError],
) -> None:
    upstream.state.behavior.fail_status = status
    with pytest.raises(error_class) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert caught.value.status_code == status
    assert caught.value.type == "server_error"
    assert upstream.state.last.status == status


async def test_fail_times_then_recover(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.fail_status = 503
    upstream.state.behavior.fail_times = 1
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model=MODEL, messages=HELLO)
    completion = await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert completion.choices[0].message.content == chat_reply("up1", HELLO)


async def test_context_length_exceeded(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.max_context_tokens = 4
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO)
    error = caught.value
    assert (error.status_code, error.code, error.param, error.type) == (
        400,
        "context_length_exceeded",
        "messages",
        "invalid_request_error",
    )
    assert "maximum context length is 4 tokens" in error.message


async def test_wrong_backend_key_is_401(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.api_key = "sk-other"
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert caught.value.code == "invalid_api_key"


async def test_strict_models_rejects_unknown_model(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.strict_models = True
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert caught.value.code == "model_not_found"


async def test_old_vllm_rejects_stream_options(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.stream_options = "reject"
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
    assert "Extra inputs are not permitted" in caught.value.message
    assert caught.value.body == {
        "object": "error",
        "message": caught.value.message.removeprefix("Error code: 400 - "),
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }


async def test_stream_options_without_stream_rejected_like_vllm(
    client: openai.AsyncOpenAI, upstream: UpstreamServer
) -> None:
    upstream.state.behavior.stream_options = "reject_unless_stream"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            stream_options={"include_usage": True},
        )
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert [chunk async for chunk in stream][-1].usage is not None


async def test_slow_first_byte_times_out_and_is_seen_as_a_disconnect(upstream: UpstreamServer) -> None:
    upstream.state.behavior.first_byte_delay = 5.0
    async with openai.AsyncOpenAI(base_url=upstream.base_url, api_key="x", max_retries=0, timeout=0.2) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model=MODEL, messages=HELLO)
    await asyncio.wait_for(upstream.state.disconnected.wait(), timeout=2)
    assert upstream.state.last.disconnected and upstream.state.disconnects == 1


async def test_client_leaving_mid_stream_is_seen_at_once(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.chunk_delay = 5.0  # the handler sleeps: only cancellation can notice the client
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    first = await anext(aiter(stream))
    assert first.choices[0].delta.role == "assistant"
    await stream.close()
    await asyncio.wait_for(upstream.state.disconnected.wait(), timeout=2)
    record = upstream.state.last
    assert record.disconnected and not record.finished
    assert len(record.events()) == 1


async def test_die_mid_stream_truncates_the_body(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.die_after_chunks = 2
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 2
    events = upstream.state.last.events()
    assert len(events) == 2 and "[DONE]" not in events
    assert upstream.state.disconnects == 0  # the upstream hung up, not the client


async def test_error_event_mid_stream(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.error_event_after_chunks = 3
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 3
    assert upstream.state.last.events()[-2:] == [
        {
            "error": {
                "message": "The upstream model failed mid-stream.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        },
        "[DONE]",
    ]


async def test_stop_and_restart_on_the_same_port(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    port = upstream.port
    await upstream.stop()
    with pytest.raises(openai.APIConnectionError):
        await client.models.list()
    await upstream.start()
    assert upstream.port == port
    assert [model.id async for model in client.models.list()] == [MODEL, "fake-embed"]


async def test_two_upstreams_share_nothing() -> None:
    async with serve_upstream(make_upstream("up1")) as one, serve_upstream(make_upstream("up2")) as two:
        async with openai.AsyncOpenAI(base_url=two.base_url, api_key="x", max_retries=0) as client:
            completion = await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert completion.choices[0].message.content == chat_reply("up2", HELLO)
    assert one.state.requests == [] and len(two.state.requests) == 1


async def test_reset_restores_defaults(upstream: UpstreamServer) -> None:
    state = upstream.state
    state.behavior.fail_status = 500
    state.disconnected.set()
    state.reset()
    assert state.behavior.fail_status is None and state.requests == []
    assert not state.disconnected.is_set()


# ---- the README's Node.js examples, with the real `openai` npm package ----

needs_node = pytest.mark.skipif(not node_available(), reason="node is not on PATH")


@pytest.fixture(scope="module")
def node_modules() -> None:
    ensure_node_modules()


@needs_node
@pytest.mark.usefixtures("node_modules")
async def test_node_chat_example(upstream: UpstreamServer) -> None:
    result = await arun_node_example("chat", upstream.base_url, "sk-node")
    assert result.returncode == 0, result.stderr
    prompt = [{"role": "user", "content": "Explain quantum entanglement in plain English"}]
    assert result.stdout == chat_reply("up1", prompt) + "\n"
    record = upstream.state.last
    assert record.authorization == "Bearer sk-node"
    assert record.body == {"model": "gpt-4o", "messages": prompt}


@needs_node
@pytest.mark.usefixtures("node_modules")
async def test_node_stream_example(upstream: UpstreamServer) -> None:
    """The seed's `client.chat.completions.stream(...)` form, iterated chunk by chunk."""
    result = await arun_node_example("stream", upstream.base_url, "sk-node", model=MODEL)
    assert result.returncode == 0, result.stderr
    prompt = [{"role": "user", "content": "Write a haiku about machine learning"}]
    assert result.stdout == chat_reply("up1", prompt)
    assert upstream.state.last.body == {"model": MODEL, "messages": prompt, "stream": True}


@needs_node
@pytest.mark.usefixtures("node_modules")
async def test_node_models_example(upstream: UpstreamServer) -> None:
    result = await arun_node_example("models", upstream.base_url, "sk-node")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [MODEL, "fake-embed"]


@needs_node
@pytest.mark.usefixtures("node_modules")
async def test_node_example_fails_loudly_on_upstream_error(upstream: UpstreamServer) -> None:
    upstream.state.behavior.fail_status = 400
    result = await arun_node_example("chat", upstream.base_url, "sk-node")
    assert result.returncode != 0
    assert "400" in result.stderr

"""The fake upstream is faithful: the real `openai` SDKs (Python here, Node via tests/node) and the
`anthropic` SDK parse it.

Proxy tests trust the fake's wire format and its recordings; these tests are why they may.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
import anthropic
import openai
import orjson
import pytest
from anthropic.types import Message, MessageParam, TextBlockParam
from openai.types.chat import ChatCompletionMessageParam
from openai.types.responses import Response, ResponseInputItemParam

from tests.fake_upstream import (
    ANTHROPIC_WEATHER_TOOL,
    MID_STREAM_FAILURE,
    NOT_SET,
    RESPONSES_WEATHER_TOOL,
    TOOL_ARGUMENT_FRAGMENTS,
    TOOL_ARGUMENTS,
    WEATHER_TOOL,
    UpstreamServer,
    anthropic_messages,
    chat_reply,
    count_prompt_tokens,
    embedding_vector,
    make_upstream,
    response_conversation,
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


# ---- Responses API, with the real `openai` SDK ----

RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * len(split_pieces(chat_reply("up1", [{"role": "user", "content": "hi"}]))),
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


async def test_responses_create(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.cached_tokens = 2
    response = await client.responses.create(model=MODEL, instructions="Be terse.", input="hello there")
    conversation = response_conversation({"instructions": "Be terse.", "input": "hello there"})
    assert response.output_text == chat_reply("up1", conversation)
    assert (response.status, response.object, response.model) == ("completed", "response", MODEL)
    assert response.usage is not None
    assert response.usage.input_tokens == count_prompt_tokens(conversation)
    assert response.usage.output_tokens == len(split_pieces(response.output_text))
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.usage.input_tokens_details.cached_tokens == 2
    assert upstream.state.response_ids == [response.id] and response.id.startswith("resp_")
    # Strict: every field the SDK requires is there (but usage: this SDK wants a cache_write_tokens no server sends).
    Response.model_validate({**orjson.loads(bytes(upstream.state.last.sent)), "usage": None})


async def test_responses_stream_event_sequence(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    stream = await client.responses.create(model=MODEL, input="hi", stream=True)
    events = [event async for event in stream]
    assert [e.type for e in events] == RESPONSE_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == chat_reply("up1", [{"role": "user", "content": "hi"}])
    created, in_progress, completed = events[0], events[1], events[-1]
    assert created.type == "response.created" and in_progress.type == "response.in_progress"
    assert created.response.usage is None and in_progress.response.status == "in_progress"
    assert completed.type == "response.completed" and completed.response.usage is not None
    assert completed.response.output_text == text
    assert completed.response.usage.input_tokens == count_prompt_tokens([{"role": "user", "content": "hi"}])
    assert completed.response.usage.output_tokens == len(split_pieces(text))
    record = upstream.state.last
    assert record.event_names() == [event["type"] for event in record.events()] == RESPONSE_EVENTS  # no [DONE]


@pytest.mark.parametrize("openai_style", [False, True])
async def test_responses_cut_at_max_output_tokens(
    client: openai.AsyncOpenAI, upstream: UpstreamServer, openai_style: bool
) -> None:
    upstream.state.behavior.incomplete_event = openai_style
    response = await client.responses.create(model=MODEL, input="hi", max_output_tokens=2)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "".join(split_pieces(chat_reply("up1", [{"role": "user", "content": "hi"}]))[:2])
    assert response.usage is not None and response.usage.output_tokens == 2
    # Not the SDK's stream helper: its get_final_response() raises without a `response.completed` event.
    events = [event async for event in await client.responses.create(
        model=MODEL, input="hi", max_output_tokens=2, stream=True)]
    last = events[-1]
    assert last.type == ("response.incomplete" if openai_style else "response.completed")
    assert last.response.output_text == response.output_text and last.response.status == "incomplete"
    assert last.response.usage == response.usage


async def test_responses_previous_response_id_continues_the_conversation(
    client: openai.AsyncOpenAI, upstream: UpstreamServer
) -> None:
    first = await client.responses.create(model=MODEL, instructions="Be terse.", input="hello there")
    second = await client.responses.create(model=MODEL, input="and now?", previous_response_id=first.id)
    # The history is the first turn's input and reply; its instructions are not carried over (as OpenAI).
    history = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first.output_text}]
    conversation = response_conversation({"input": "and now?"}, history)
    assert second.output_text == chat_reply("up1", conversation)
    assert second.usage is not None and second.usage.input_tokens == count_prompt_tokens(conversation)
    assert second.previous_response_id == first.id
    assert upstream.state.response_ids == [first.id, second.id]


async def test_responses_unknown_previous_response_id_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.create(model=MODEL, input="hi", previous_response_id="resp_nope")
    assert caught.value.param == "previous_response_id"
    assert caught.value.message.endswith("Previous response with id 'resp_nope' not found.")


async def test_responses_retrieve_input_items_and_delete(client: openai.AsyncOpenAI) -> None:
    items: list[ResponseInputItemParam] = [
        {"role": "user", "content": "one"},
        {"role": "user", "content": [{"type": "input_text", "text": "two"}]},
    ]
    created = await client.responses.create(model=MODEL, input=items)
    assert await client.responses.retrieve(created.id) == created
    listed = [item async for item in client.responses.input_items.list(created.id, order="asc")]
    texts = [p.text for item in listed if item.type == "message" for p in item.content if p.type == "input_text"]
    assert texts == ["one", "two"]
    newest_first = [item.id async for item in client.responses.input_items.list(created.id, limit=1)]
    assert newest_first == [item.id for item in reversed(listed)]  # desc by default, paged one by one
    await client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.retrieve(created.id)
    assert caught.value.param == "response_id"


async def test_responses_store_false_is_not_kept(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    created = await client.responses.create(model=MODEL, input="hi", store=False)
    assert orjson.loads(bytes(upstream.state.last.sent))["store"] is False
    assert upstream.state.response_ids == [created.id]
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model=MODEL, input="again", previous_response_id=created.id)


async def test_responses_background_retrieve_and_cancel(client: openai.AsyncOpenAI) -> None:
    queued = await client.responses.create(model=MODEL, input="hi", background=True)
    assert (queued.status, queued.usage) == ("queued", None)
    done = await client.responses.retrieve(queued.id)
    assert done.status == "completed" and done.usage is not None
    assert done.usage.input_tokens == count_prompt_tokens([{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response"):
        await client.responses.cancel(done.id)
    other = await client.responses.create(model=MODEL, input="hi", background=True)
    cancelled = await client.responses.cancel(other.id)
    assert cancelled.status == "cancelled" and (await client.responses.retrieve(other.id)).status == "cancelled"


async def test_responses_tool_call(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    response = await client.responses.create(model=MODEL, input="weather?", tools=[RESPONSES_WEATHER_TOOL])
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id.startswith("call_")
    assert response.usage is not None and response.usage.output_tokens == len(TOOL_ARGUMENT_FRAGMENTS)
    async with client.responses.stream(model=MODEL, input="weather?", tools=[RESPONSES_WEATHER_TOOL]) as stream:
        final = await stream.get_final_response()
    assert [item.type for item in final.output] == ["function_call"]
    events = upstream.state.last.events()
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert deltas == list(TOOL_ARGUMENT_FRAGMENTS)
    assert [e["type"] for e in events][-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]


async def test_responses_function_output_turn_gets_a_text_reply(client: openai.AsyncOpenAI) -> None:
    items: list[ResponseInputItemParam] = [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": TOOL_ARGUMENTS},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    response = await client.responses.create(model=MODEL, input=items, tools=[RESPONSES_WEATHER_TOOL])
    assert response.output_text == "Echo from up1 [messages=3 system=no]: sunny"


async def test_responses_follow_up_must_reach_the_fake_that_created_it() -> None:
    async with serve_upstream(make_upstream("up1")) as one, serve_upstream(make_upstream("up2")) as two:
        async with (
            openai.AsyncOpenAI(base_url=one.base_url, api_key="x", max_retries=0) as first,
            openai.AsyncOpenAI(base_url=two.base_url, api_key="x", max_retries=0) as second,
        ):
            created = await first.responses.create(model=MODEL, input="hi")
            with pytest.raises(openai.NotFoundError):
                await second.responses.create(model=MODEL, input="more", previous_response_id=created.id)
            await first.responses.create(model=MODEL, input="more", previous_response_id=created.id)
    assert created.id in one.state.response_ids and created.id not in two.state.response_ids


async def test_responses_usage_override_and_omit(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    lie = {"input_tokens": -5, "surprise": True}
    upstream.state.behavior.usage_override = lie
    await client.responses.create(model=MODEL, input="hi")
    assert orjson.loads(bytes(upstream.state.last.sent))["usage"] == lie
    await (await client.responses.create(model=MODEL, input="hi", stream=True)).close()
    await client.responses.create(model=MODEL, input="hi", stream=True)
    upstream.state.behavior.usage_override = NOT_SET
    upstream.state.behavior.omit_usage = True
    assert (await client.responses.create(model=MODEL, input="hi")).usage is None


async def test_responses_stream_usage_override_is_in_the_final_event_only(
    client: openai.AsyncOpenAI, upstream: UpstreamServer
) -> None:
    upstream.state.behavior.usage_override = "12"
    async for _ in await client.responses.create(model=MODEL, input="hi", stream=True):
        pass
    events = upstream.state.last.events()
    assert events[-1]["response"]["usage"] == "12"
    assert [e["response"]["usage"] for e in events[:2]] == [None, None]
    assert all("usage" not in e for e in events[2:-1])


async def test_responses_error_event_and_death_mid_stream(
    client: openai.AsyncOpenAI, upstream: UpstreamServer
) -> None:
    upstream.state.behavior.error_event_after_chunks = 3
    events = [event async for event in await client.responses.create(model=MODEL, input="hi", stream=True)]
    assert [e.type for e in events] == [*RESPONSE_EVENTS[:3], "error"]  # the SDK yields it, no [DONE] after
    assert upstream.state.last.events()[-1] == {
        "type": "error", "sequence_number": 3, "code": "server_error", "message": MID_STREAM_FAILURE, "param": None
    }
    upstream.state.behavior.error_event_after_chunks = None
    upstream.state.behavior.die_after_chunks = 2
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for event in await client.responses.create(model=MODEL, input="hi", stream=True):
            received.append(event)
    assert len(received) == len(upstream.state.last.events()) == 2


async def test_responses_errors_are_openai_shaped(client: openai.AsyncOpenAI, upstream: UpstreamServer) -> None:
    upstream.state.behavior.max_context_tokens = 2
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model=MODEL, input="hello there")
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "input")
    upstream.state.behavior.fail_status = 503
    with pytest.raises(openai.InternalServerError) as failed:
        await client.responses.retrieve("resp_any")
    assert failed.value.type == "server_error"


# ---- Anthropic Messages API, with the real `anthropic` SDK ----

MESSAGE_EVENTS = ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop",
                  "message_delta", "message_stop"]
HI: list[MessageParam] = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def claude(upstream: UpstreamServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=upstream.origin, api_key="sk-ant", max_retries=0) as client:
        yield client


async def test_messages_create(claude: anthropic.AsyncAnthropic, upstream: UpstreamServer) -> None:
    upstream.state.behavior.cache_read_tokens = 3
    upstream.state.behavior.cache_creation_tokens = 2
    system: list[TextBlockParam] = [{"type": "text", "text": "Be terse."}]
    message = await claude.messages.create(model="claude-x", max_tokens=100, system=system, messages=HI)
    prompt = anthropic_messages({"system": system, "messages": HI})
    (block,) = message.content
    assert block.type == "text" and block.text == chat_reply("up1", prompt)
    assert (message.stop_reason, message.stop_sequence, message.model) == ("end_turn", None, "claude-x")
    usage = message.usage
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (3, 2)
    assert usage.input_tokens == count_prompt_tokens(prompt) - 3 - 2  # input_tokens excludes the cached part
    assert usage.output_tokens == len(split_pieces(block.text))
    assert upstream.state.last.authorization == "Bearer sk-ant"  # anthropic 2.x; older SDKs sent x-api-key
    Message.model_validate(orjson.loads(bytes(upstream.state.last.sent)))  # strict: every required field


async def test_messages_stream(claude: anthropic.AsyncAnthropic, upstream: UpstreamServer) -> None:
    async with claude.messages.stream(model="claude-x", max_tokens=100, system="Be terse.", messages=HI) as stream:
        final = await stream.get_final_message()
    prompt = anthropic_messages({"system": "Be terse.", "messages": HI})
    (block,) = final.content
    assert block.type == "text" and block.text == chat_reply("up1", prompt)
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == count_prompt_tokens(prompt)
    assert final.usage.output_tokens == len(split_pieces(block.text))
    record = upstream.state.last
    events = record.events()
    names = [e["type"] for e in events]
    assert record.event_names() == names  # every data line has its `event:` line; no [DONE]
    assert [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]] == MESSAGE_EVENTS
    assert names.count("content_block_delta") == len(split_pieces(block.text))
    start, delta = events[0]["message"]["usage"], events[-2]["usage"]
    assert start["input_tokens"] == delta["input_tokens"] == final.usage.input_tokens
    assert start["output_tokens"] == 1 and delta["output_tokens"] == final.usage.output_tokens  # cumulative


async def test_messages_max_tokens(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(model="claude-x", max_tokens=2, messages=HI)
    (block,) = message.content
    assert block.type == "text" and block.text == "".join(split_pieces(chat_reply("up1", HI))[:2])
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 2)


async def test_messages_without_max_tokens_is_400(upstream: UpstreamServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(upstream.origin + "/v1/messages", json={"model": "c", "messages": HI}) as response:
            assert response.status == 400
            assert await response.json() == {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
            }


async def test_messages_count_tokens(claude: anthropic.AsyncAnthropic) -> None:
    system: list[TextBlockParam] = [{"type": "text", "text": "one two"}, {"type": "text", "text": "three"}]
    counted = await claude.messages.count_tokens(model="claude-x", system=system, messages=HI)
    assert counted.input_tokens == count_prompt_tokens(anthropic_messages({"system": system, "messages": HI}))


async def test_messages_tool_use(claude: anthropic.AsyncAnthropic, upstream: UpstreamServer) -> None:
    message = await claude.messages.create(model="claude-x", max_tokens=100, messages=HI,
                                           tools=[ANTHROPIC_WEATHER_TOOL])
    (block,) = message.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Paris"}
    assert message.stop_reason == "tool_use"
    assert message.usage.output_tokens == len(TOOL_ARGUMENT_FRAGMENTS)
    async with claude.messages.stream(model="claude-x", max_tokens=100, messages=HI,
                                      tools=[ANTHROPIC_WEATHER_TOOL]) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "tool_use" and final.content[0].input == {"city": "Paris"}
    assert final.stop_reason == "tool_use"
    fragments = [e["delta"]["partial_json"] for e in upstream.state.last.events()
                 if e["type"] == "content_block_delta"]
    assert fragments == list(TOOL_ARGUMENT_FRAGMENTS)


async def test_messages_tool_result_turn_gets_a_text_reply(claude: anthropic.AsyncAnthropic) -> None:
    messages: list[MessageParam] = [
        *HI,
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
    ]
    message = await claude.messages.create(model="claude-x", max_tokens=100, messages=messages,
                                           tools=[ANTHROPIC_WEATHER_TOOL])
    assert message.content[0].type == "text"
    assert message.content[0].text == "Echo from up1 [messages=3 system=no]: sunny"


async def test_messages_usage_override_in_every_usage_event(
    claude: anthropic.AsyncAnthropic, upstream: UpstreamServer
) -> None:
    lie = {"input_tokens": 1, "output_tokens": 2**40}
    upstream.state.behavior.usage_override = lie
    message = await claude.messages.create(model="claude-x", max_tokens=100, messages=HI)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (1, 2**40)
    async with claude.messages.stream(model="claude-x", max_tokens=100, messages=HI) as stream:
        final = await stream.get_final_message()
    assert final.usage.output_tokens == 2**40
    events = upstream.state.last.events()
    assert events[0]["message"]["usage"] == events[-2]["usage"] == lie
    upstream.state.behavior.omit_usage = True
    await claude.messages.create(model="claude-x", max_tokens=100, messages=HI)
    assert "usage" not in orjson.loads(bytes(upstream.state.last.sent))


async def test_messages_error_event_mid_stream(claude: anthropic.AsyncAnthropic, upstream: UpstreamServer) -> None:
    upstream.state.behavior.error_event_after_chunks = 4
    with pytest.raises(anthropic.APIStatusError, match="failed mid-stream"):
        async with claude.messages.stream(model="claude-x", max_tokens=100, messages=HI) as stream:
            await stream.get_final_message()
    assert upstream.state.last.event_names() == [*MESSAGE_EVENTS[:4], "error"]


@pytest.mark.parametrize(
    ("setting", "error_class", "error_type"),
    [
        ({"fail_status": 529}, anthropic.InternalServerError, "overloaded_error"),
        ({"fail_status": 429}, anthropic.RateLimitError, "rate_limit_error"),
        ({"api_key": "sk-other"}, anthropic.AuthenticationError, "authentication_error"),
        ({"strict_models": True}, anthropic.NotFoundError, "not_found_error"),
        ({"max_context_tokens": 3}, anthropic.BadRequestError, "invalid_request_error"),
    ],
)
async def test_messages_errors_are_anthropic_shaped(
    claude: anthropic.AsyncAnthropic,
    upstream: UpstreamServer,
    setting: dict[str, Any],
    error_class: type[anthropic.APIStatusError],
    error_type: str,
) -> None:
    for name, value in setting.items():
        setattr(upstream.state.behavior, name, value)
    with pytest.raises(error_class) as caught:
        await claude.messages.create(model="claude-x", max_tokens=100, messages=HI)
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == error_type


async def test_named_event_streams_with_keep_alive_and_gzip(
    client: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic, upstream: UpstreamServer
) -> None:
    upstream.state.behavior.keep_alive = True
    upstream.state.behavior.force_gzip = True
    async with claude.messages.stream(model="claude-x", max_tokens=100, messages=HI) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == chat_reply("up1", HI)
    assert bytes(upstream.state.last.sent).startswith(b": keep-alive\n\nevent: message_start\ndata: {")
    events = [event async for event in await client.responses.create(model=MODEL, input="hi", stream=True)]
    assert [e.type for e in events] == RESPONSE_EVENTS


@pytest.mark.parametrize("header", [{"x-api-key": "sk-ant"}, {"Authorization": "Bearer sk-ant"}])
async def test_messages_take_the_backend_key_either_way(upstream: UpstreamServer, header: dict[str, str]) -> None:
    upstream.state.behavior.api_key = "sk-ant"
    body = {"model": "c", "max_tokens": 5, "messages": HI}
    async with aiohttp.ClientSession() as session:
        async with session.post(upstream.origin + "/v1/messages", json=body, headers=header) as response:
            assert response.status == 200
            assert (await response.json())["type"] == "message"


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

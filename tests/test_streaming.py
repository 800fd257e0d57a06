"""Streams: every SSE byte the backend sends reaches the client unchanged, as it arrives.

The one exception is the usage-only chunk the proxy asked for on the client's behalf (to bill the
stream); it is dropped, and everything else stays byte for byte what the backend wrote.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from lumen_proxy.sse import SseScanner
from tests.conftest import Proxy
from tests.fake_upstream import (
    TOOL_ARGUMENT_FRAGMENTS,
    TOOL_ARGUMENTS,
    WEATHER_TOOL,
    UpstreamServer,
    chat_reply,
    count_prompt_tokens,
    split_pieces,
)

POEM: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write a short poem about data science"}]

async def post_stream(http: aiohttp.ClientSession, proxy: Proxy, key: str, body: dict[str, Any],
                      path: str = "/chat/completions") -> bytes:
    """POST a stream request and return every byte of the response body."""
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(proxy.base_url + path, json=body, headers=headers) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        return await response.read()


def events_of(raw: bytes) -> list[bytes]:
    """The SSE events of a body, each with its blank-line terminator."""
    return [event + b"\n\n" for event in raw.split(b"\n\n") if event]


def is_usage_only(event: bytes) -> bool:
    if not event.startswith(b"data: {"):
        return False
    data = json.loads(event[len(b"data: "):])
    return data.get("choices") == [] and isinstance(data.get("usage"), dict)


# ---- byte for byte ----


async def test_stream_bytes_are_exactly_what_the_backend_sent_when_the_client_asked_for_usage(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "gpt-4o", "messages": POEM, "stream": True, "stream_options": {"include_usage": True}}
    received = await post_stream(http, proxy, alice, body)
    assert received == bytes(upstream.state.last.sent)
    assert received.endswith(b"data: [DONE]\n\n")
    assert sum(is_usage_only(e) for e in events_of(received)) == 1
    # Only the model name and the missing output cap (the model's max_output_tokens) changed on the way.
    assert upstream.state.last.body == {**body, "model": "fake-model", "max_tokens": 1000}


async def test_without_include_usage_only_the_usage_chunk_is_dropped(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "gpt-4o", "messages": POEM, "stream": True}
    received = await post_stream(http, proxy, alice, body)
    # The proxy asked the backend for usage on the client's behalf, to bill the stream ...
    assert upstream.state.last.body["stream_options"] == {"include_usage": True}
    sent = events_of(bytes(upstream.state.last.sent))
    usage_only = [e for e in sent if is_usage_only(e)]
    assert len(usage_only) == 1
    # ... and the client got every other event exactly as sent, in order.
    assert received == b"".join(e for e in sent if not is_usage_only(e))
    assert received.endswith(b"data: [DONE]\n\n")


async def test_the_client_sdk_sees_no_usage_chunk_it_did_not_ask_for(
    proxy: Proxy, alice: str, upstream: UpstreamServer
) -> None:
    stream = await proxy.sdk(alice).chat.completions.create(model="gpt-4o", messages=POEM, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat_reply("up1", POEM)


async def test_the_usage_chunk_reaches_a_client_that_asked(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    stream = await proxy.sdk(alice).chat.completions.create(
        model="gpt-4o", messages=POEM, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == count_prompt_tokens(POEM)
    assert last.usage.completion_tokens == len(split_pieces(chat_reply("up1", POEM)))


async def test_usage_null_on_every_chunk_passes_through_untouched(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "gpt-4o", "messages": POEM, "stream": True, "stream_options": {"include_usage": True}}
    received = await post_stream(http, proxy, alice, body)
    content_events = [e for e in events_of(received) if e.startswith(b"data: {") and not is_usage_only(e)]
    assert content_events
    assert all(b'"usage":null' in e for e in content_events)
    assert received.count(b'"usage":null') == bytes(upstream.state.last.sent).count(b'"usage":null')


async def test_sse_comments_pass_through(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    upstream.state.behavior.keep_alive = True
    body = {"model": "gpt-4o", "messages": POEM, "stream": True, "stream_options": {"include_usage": True}}
    received = await post_stream(http, proxy, alice, body)
    assert received == bytes(upstream.state.last.sent)
    assert received.startswith(b": keep-alive\n\n")
    assert received.count(b": keep-alive\n\n") == received.count(b"data: {")


async def test_an_upstream_error_event_is_relayed_and_the_sdk_raises(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    upstream.state.behavior.error_event_after_chunks = 2
    body = {"model": "gpt-4o", "messages": POEM, "stream": True, "stream_options": {"include_usage": True}}
    received = await post_stream(http, proxy, alice, body)
    assert received == bytes(upstream.state.last.sent)
    stream = await proxy.sdk(alice).chat.completions.create(model="gpt-4o", messages=POEM, stream=True)
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        async for _ in stream:
            pass


# ---- tool calls and text completions ----


async def test_streamed_tool_call_arguments_concatenate_to_the_exact_json(
    proxy: Proxy, alice: str, upstream: UpstreamServer
) -> None:
    stream = await proxy.sdk(alice).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL],
        stream=True,
    )
    fragments: list[str] = []
    names: list[str] = []
    finish: list[str | None] = []
    async for chunk in stream:
        for choice in chunk.choices:
            finish.append(choice.finish_reason)
            for call in choice.delta.tool_calls or []:
                if call.function and call.function.name:
                    names.append(call.function.name)
                if call.function and call.function.arguments:
                    fragments.append(call.function.arguments)
    assert names == ["get_weather"]
    assert fragments == list(TOOL_ARGUMENT_FRAGMENTS)  # the same split, not re-chunked
    assert "".join(fragments) == TOOL_ARGUMENTS
    assert json.loads("".join(fragments)) == {"city": "Paris"}
    assert finish[-1] == "tool_calls"


async def test_streamed_tool_call_bytes_are_untouched(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": "gpt-4o", "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER_TOOL],
        "stream": True, "stream_options": {"include_usage": True},
    }
    received = await post_stream(http, proxy, alice, body)
    assert received == bytes(upstream.state.last.sent)
    assert b'"arguments":"{\\""' in received  # the fragment that splits a key survives as sent


async def test_sdk_stream_helper_accumulates_tool_call_arguments(
    proxy: Proxy, alice: str, upstream: UpstreamServer
) -> None:
    async with proxy.sdk(alice).chat.completions.stream(
        model="gpt-4o", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL]
    ) as stream:
        done = [event async for event in stream if event.type == "tool_calls.function.arguments.done"]
    assert [(e.name, e.arguments) for e in done] == [("get_weather", TOOL_ARGUMENTS)]


async def test_text_completion_stream_is_byte_for_byte(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "gpt-4o", "prompt": "Once upon a time", "stream": True, "stream_options": {"include_usage": True}}
    received = await post_stream(http, proxy, alice, body, path="/completions")
    assert upstream.state.last.path == "/v1/completions"
    assert received == bytes(upstream.state.last.sent)


async def test_text_completion_stream_with_the_sdk(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    stream = await proxy.sdk(alice).completions.create(model="gpt-4o", prompt="Once upon a time", stream=True)
    text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    assert text == "Echo from up1: Once upon a time"


# ---- as it arrives ----


async def test_events_are_flushed_as_they_arrive(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    upstream.state.behavior.chunk_delay = 0.1
    upstream.state.behavior.reply = "one two three four"  # 7 events: role, 4 words, finish, usage
    body = {"model": "gpt-4o", "messages": POEM, "stream": True}
    started = time.monotonic()
    async with http.post(f"{proxy.base_url}/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {alice}"}) as response:
        first = await response.content.readuntil(b"\n\n")
        first_at = time.monotonic() - started
        assert not upstream.state.last.finished  # the backend is still generating
        rest = await response.read()
    total = time.monotonic() - started
    assert first.startswith(b'data: {"id":"chatcmpl-')
    assert total - first_at >= 0.4  # the first event was not held back until the end
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_client_disconnect_mid_stream_closes_the_upstream_request(
    proxy: Proxy, alice: str, upstream: UpstreamServer
) -> None:
    upstream.state.behavior.chunk_delay = 5.0  # the proxy has nothing to write: it must notice anyway
    body = {"model": "gpt-4o", "messages": POEM, "stream": True}
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{proxy.base_url}/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {alice}"})
        await response.content.readuntil(b"\n\n")
        response.close()  # the user pressed Ctrl-C
        left_at = time.monotonic()
        await asyncio.wait_for(upstream.state.disconnected.wait(), timeout=1.0)
    assert time.monotonic() - left_at < 1.0
    record = upstream.state.last
    assert record.disconnected and not record.finished
    assert b"data: [DONE]" not in record.sent


async def test_sdk_client_that_stops_reading_closes_the_upstream_request(
    proxy: Proxy, alice: str, upstream: UpstreamServer
) -> None:
    upstream.state.behavior.chunk_delay = 5.0
    stream = await proxy.sdk(alice).chat.completions.create(model="gpt-4o", messages=POEM, stream=True)
    async for _ in stream:
        break
    await stream.close()
    await asyncio.wait_for(upstream.state.disconnected.wait(), timeout=1.0)
    assert upstream.state.last.disconnected


# ---- a backend that breaks mid-stream ----


async def test_backend_dying_mid_stream_ends_with_an_error_event_and_the_sdk_raises(
    proxy: Proxy, alice: str, upstream: UpstreamServer
) -> None:
    upstream.state.behavior.die_after_chunks = 3
    client = proxy.sdk(alice)
    stream = await client.chat.completions.create(model="gpt-4o", messages=POEM, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError, match="broke off the stream"):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "".join(split_pieces(chat_reply("up1", POEM))[:2])
    # The server is fine: the next request works.
    upstream.state.behavior.die_after_chunks = None
    completion = await client.chat.completions.create(model="gpt-4o", messages=POEM)
    assert completion.choices[0].message.content == chat_reply("up1", POEM)


async def test_backend_dying_mid_stream_raw_bytes(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    upstream.state.behavior.die_after_chunks = 3
    body = {"model": "gpt-4o", "messages": POEM, "stream": True, "stream_options": {"include_usage": True}}
    received = await post_stream(http, proxy, alice, body)
    sent = bytes(upstream.state.last.sent)
    assert received.startswith(sent)  # what did arrive went on unchanged
    error = json.loads(received[len(sent):].removeprefix(b"data: ").strip())
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["code"] == "bad_gateway"
    assert b"[DONE]" not in received


async def test_an_event_without_end_is_bounded(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    """One event larger than the proxy's line buffer (4 MiB) ends the stream instead of eating memory."""
    upstream.state.behavior.reply = "x" * (5 * 1024 * 1024)  # one piece, so one 5 MiB event
    body = {"model": "gpt-4o", "messages": POEM, "stream": True}
    received = await post_stream(http, proxy, alice, body)
    *relayed, last = events_of(received)
    assert relayed == events_of(bytes(upstream.state.last.sent))[:1]  # the role chunk, as sent
    assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "bad_gateway"
    completion = await proxy.sdk(alice).chat.completions.create(model="gpt-4o", messages=POEM)
    assert completion.choices[0].message.content == "x" * (5 * 1024 * 1024)  # non-stream bodies have no such limit


async def test_a_bug_mid_stream_ends_it_with_an_error_event_and_bills(
    proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the error middleware wrote a second `HTTP/1.1 500` status line into the chunked body."""
    real_feed = SseScanner.feed
    fed = 0

    def feed(self: SseScanner, chunk: bytes) -> bytes:
        nonlocal fed
        fed += 1
        if fed == 3:
            raise KeyError("a bug")
        return real_feed(self, chunk)

    monkeypatch.setattr(SseScanner, "feed", feed)
    upstream.state.behavior.chunk_delay = 0.02  # one event per read
    async with http.post(f"{proxy.base_url}/chat/completions", headers={"Authorization": f"Bearer {alice}"},
                         json={"model": "gpt-4o", "messages": POEM, "stream": True}) as response:
        assert response.status == 200
        received = await response.read()
        request_id = response.headers["x-request-id"]
    assert b"HTTP/1.1" not in received
    *relayed, last = events_of(received)
    error = json.loads(last.removeprefix(b"data: ").strip())["error"]
    assert error["code"] == "internal_error" and request_id in error["message"]
    assert len(relayed) == 2  # what was fed before the bug went out as it came
    await proxy.flush()
    [found] = await proxy.rt.store.usage_rows(request_id)
    assert (found["status"], found["partial"]) == (500, 1) and found["cost"] > 0
    assert proxy.rt.wallets.held == {}

"""The Anthropic Messages API through Lumen, driven by the real ``anthropic`` SDK.

Relayed byte for byte like chat, billed from the backend's own usage: Anthropic's ``input_tokens``
excludes cached input, so the billed prompt is input + cache writes + cache reads, with cache reads
priced at ``cached_prompt``. Refusals in Anthropic's shape are in test_messages_errors.py.
"""

from __future__ import annotations

import json
import sqlite3
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest

from lumen_proxy.billing import cost
from lumen_proxy.config import Price
from tests.conftest import UPSTREAM_KEY, MakeProxy, Proxy, build_config, config_dict, eventually, priced_proxy, query
from tests.fake_upstream import UpstreamServer

MICRO = 1_000_000
USER = [{"role": "user", "content": "one two three four five six seven eight nine ten"}]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
PRICE = Price(prompt=3 * MICRO, completion=15 * MICRO, cached_prompt=MICRO * 3 // 10)  # 3, 15, 0.3 per million


@pytest.fixture
async def priced(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> Proxy:
    """gpt-4o priced like a Claude model with a cache discount."""
    return await priced_proxy(make_proxy, upstream, tmp_path, {"prompt": 3, "completion": 15, "cached_prompt": 0.3})


def claude(proxy: Proxy, key: str, **kwargs: Any) -> anthropic.AsyncAnthropic:
    kwargs.setdefault("max_retries", 0)
    return anthropic.AsyncAnthropic(api_key=key, base_url=proxy.origin, **kwargs)


def row_of(proxy: Proxy, request_id: str) -> sqlite3.Row:
    rows = query(proxy.rt.config.database, "SELECT * FROM usage WHERE request_id = ?", request_id)
    assert len(rows) == 1, request_id
    return rows[0]


def balance(proxy: Proxy, account: str = "alice") -> int:
    return int(query(proxy.rt.config.database, "SELECT balance FROM accounts WHERE name = ?", account)[0][0])


def expected_cost(usage: anthropic.types.Usage) -> tuple[int, int, int]:
    """(prompt, completion, micro-coins) from the usage the SDK parsed: the backend's own numbers."""
    read = usage.cache_read_input_tokens or 0
    prompt = usage.input_tokens + (usage.cache_creation_input_tokens or 0) + read
    return prompt, usage.output_tokens, cost(PRICE, prompt, usage.output_tokens, read)


async def test_create_is_billed_from_anthropic_usage_with_cache(priced: Proxy, upstream: UpstreamServer) -> None:
    upstream.state.behavior.cache_read_tokens = 8
    upstream.state.behavior.cache_creation_tokens = 2
    client = claude(priced, await priced.key("alice"))
    raw = await client.messages.with_raw_response.create(model="gpt-4o", max_tokens=100, messages=USER)
    message = await raw.parse()
    await client.close()
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.cache_read_input_tokens == 8 and message.usage.cache_creation_input_tokens == 2
    prompt, completion, coins = expected_cost(message.usage)
    assert prompt > message.usage.input_tokens  # Anthropic's input_tokens leaves the cached part out
    await priced.flush()
    row = row_of(priced, raw.headers["x-request-id"])
    assert (row["endpoint"], row["status"], row["model"]) == ("/v1/messages", 200, "gpt-4o")
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost"]) == (prompt, completion, coins)
    assert (row["estimated"], row["partial"], row["capped"]) == (0, 0, 0)
    assert json.loads(row["details"]) == {"cache_read_input_tokens": 8, "cache_creation_input_tokens": 2}
    assert balance(priced) == 1000 * MICRO - coins
    assert coins < cost(PRICE, prompt, completion)  # the discount applied
    assert raw.headers["request-id"] == raw.headers["x-request-id"]


async def test_stream_is_relayed_byte_for_byte_and_billed(priced: Proxy, upstream: UpstreamServer) -> None:
    upstream.state.behavior.cache_read_tokens = 5
    client = claude(priced, await priced.key("alice"))
    async with client.messages.stream(model="gpt-4o", max_tokens=100, messages=USER) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        message = await stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    await client.close()
    assert text == message.content[0].text and text  # type: ignore[union-attr]
    sent = upstream.state.last
    assert sent.path == "/v1/messages" and sent.body["stream"] is True
    assert "stream_options" not in sent.body  # Anthropic streams always carry usage: nothing injected
    assert message.usage.output_tokens == [e for e in sent.events() if e["type"] == "message_delta"][-1][
        "usage"]["output_tokens"]
    prompt, completion, coins = expected_cost(message.usage)
    await priced.flush()
    row = row_of(priced, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost"]) == (prompt, completion, coins)
    assert (row["endpoint"], row["estimated"], row["partial"]) == ("/v1/messages", 0, 0)


async def test_raw_stream_bytes_are_the_backends(priced: Proxy, upstream: UpstreamServer,
                                                 http: aiohttp.ClientSession) -> None:
    key = await priced.key("alice")
    body = {"model": "gpt-4o", "max_tokens": 100, "messages": USER, "stream": True}
    async with http.post(priced.origin + "/v1/messages", json=body,
                         headers={"x-api-key": key, "anthropic-version": "2023-06-01"}) as response:
        received = await response.read()
        assert response.headers["Content-Type"].startswith("text/event-stream")
    assert received == bytes(upstream.state.last.sent)
    assert b"event: message_start" in received and b"event: message_stop" in received


async def test_tool_use_round_trip(priced: Proxy, upstream: UpstreamServer) -> None:
    client = claude(priced, await priced.key("alice"))
    first = await client.messages.create(model="gpt-4o", max_tokens=200, messages=USER, tools=[WEATHER])
    assert first.stop_reason == "tool_use"
    tool_use = next(b for b in first.content if b.type == "tool_use")
    assert tool_use.name == "get_weather" and isinstance(tool_use.input, dict)
    async with client.messages.stream(model="gpt-4o", max_tokens=200, messages=USER, tools=[WEATHER]) as stream:
        streamed = await stream.get_final_message()
    streamed_use = next(b for b in streamed.content if b.type == "tool_use")
    assert streamed_use.input == tool_use.input  # input_json_delta fragments relayed intact
    second = await client.messages.create(model="gpt-4o", max_tokens=200, tools=[WEATHER], messages=[
        *USER, {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}]}])
    await client.close()
    assert second.stop_reason == "end_turn" and second.content[0].type == "text"
    await priced.flush()
    rows = query(priced.rt.config.database, "SELECT * FROM usage WHERE endpoint = '/v1/messages' ORDER BY id")
    assert [r["completion_tokens"] for r in rows] == [first.usage.output_tokens, streamed.usage.output_tokens,
                                                      second.usage.output_tokens]
    assert balance(priced) == 1000 * MICRO - sum(r["cost"] for r in rows)


async def test_count_tokens_is_relayed_and_not_billed(priced: Proxy, upstream: UpstreamServer) -> None:
    client = claude(priced, await priced.key("alice"))
    raw = await client.messages.with_raw_response.count_tokens(model="gpt-4o", messages=USER)
    counted = await raw.parse()
    await client.close()
    assert counted.input_tokens > 0
    assert upstream.state.last.path == "/v1/messages/count_tokens"
    assert upstream.state.last.body["model"] == "fake-model"  # the backend's name, as for every call
    await priced.flush()
    row = row_of(priced, raw.headers["x-request-id"])
    assert (row["endpoint"], row["cost"], row["prompt_tokens"]) == ("/v1/messages/count_tokens", 0, 0)
    assert balance(priced) == 1000 * MICRO


async def test_headers_both_ways(priced: Proxy, upstream: UpstreamServer) -> None:
    """anthropic-version and anthropic-beta reach the backend; the client's key never does; the backend's
    own key goes as Bearer and as x-api-key (what Anthropic's API reads); a Bearer key works too."""
    key = await priced.key("alice")
    client = claude(priced, key, default_headers={"anthropic-beta": "prompt-caching-2024-07-31",
                                                  "anthropic-version": "2023-06-01", "X-Secret-Client-Header": "no"})
    await client.messages.create(model="gpt-4o", max_tokens=10, messages=USER)
    await client.close()
    seen = upstream.state.last.headers
    assert seen["anthropic-version"] == "2023-06-01"
    assert seen["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert seen["x-api-key"] == UPSTREAM_KEY and seen["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "X-Secret-Client-Header" not in seen and key not in json.dumps(dict(seen))
    bearer = anthropic.AsyncAnthropic(auth_token=key, base_url=priced.origin, max_retries=0)  # ANTHROPIC_AUTH_TOKEN
    message = await bearer.messages.create(model="gpt-4o", max_tokens=10, messages=USER)
    await bearer.close()
    assert message.content


@pytest.mark.parametrize("lie", [-5, "12", None, {}, 10**12, 2**63])
async def test_lying_usage_is_estimated_or_capped(priced: Proxy, upstream: UpstreamServer, lie: Any) -> None:
    upstream.state.behavior.usage_override = {"input_tokens": lie, "output_tokens": lie}
    client = claude(priced, await priced.key("alice"))
    raw = await client.messages.with_raw_response.create(model="gpt-4o", max_tokens=100, messages=USER)
    await client.close()
    await priced.flush()
    row = row_of(priced, raw.headers["x-request-id"])
    if isinstance(lie, int) and lie > 0:
        assert row["capped"] == 1 and row["completion_tokens"] == 100  # never beyond max_tokens
    else:
        assert row["estimated"] == 1 and row["completion_tokens"] >= 1
    assert balance(priced) == 1000 * MICRO - row["cost"]


async def test_the_hold_is_max_tokens(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url])))
    await proxy.account("poor", coins=0.01)  # gpt-4o: 10 coins per million output tokens -> 1,000 tokens
    client = claude(proxy, await proxy.key("poor"))
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.messages.create(model="gpt-4o", max_tokens=5000, messages=USER)
    assert caught.value.status_code == 402
    message = await client.messages.create(model="gpt-4o", max_tokens=50, messages=USER)
    await client.close()
    assert message.usage.output_tokens <= 50
    assert len(upstream.state.requests_to("/v1/messages")) == 1


async def test_a_stream_the_backend_breaks_ends_with_an_anthropic_error_event(
        priced: Proxy, upstream: UpstreamServer) -> None:
    upstream.state.behavior.die_after_chunks = 3
    client = claude(priced, await priced.key("alice"))
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client.messages.stream(model="gpt-4o", max_tokens=100, messages=USER) as stream:
            async for _ in stream:
                pass
    await client.close()
    assert caught.value.body == {"type": "error", "error": {
        "type": "api_error", "message": "The model backend broke off the stream."}}
    await priced.flush()
    rows = query(priced.rt.config.database, "SELECT * FROM usage WHERE endpoint = '/v1/messages'")
    assert len(rows) == 1 and rows[0]["partial"] == 1 and rows[0]["status"] == 502
    assert rows[0]["prompt_tokens"] > 0  # billed for what was sent: the input side came in message_start


async def test_client_leaving_mid_stream_is_billed_and_the_backend_sees_it(
        priced: Proxy, upstream: UpstreamServer, http: aiohttp.ClientSession) -> None:
    upstream.state.behavior.chunk_delay = 0.05
    upstream.state.behavior.reply = "word " * 200
    key = await priced.key("alice")
    body = {"model": "gpt-4o", "max_tokens": 500, "messages": USER, "stream": True}
    async with http.post(priced.origin + "/v1/messages", json=body, headers={"x-api-key": key}) as response:
        await response.content.readuntil(b"content_block_delta")
    assert await eventually(lambda: _async(upstream.state.disconnects > 0))
    await priced.flush()
    assert await eventually(lambda: _async(len(query(priced.rt.config.database, "SELECT 1 FROM usage")) == 1))
    row = query(priced.rt.config.database, "SELECT * FROM usage")[0]
    assert row["partial"] == 1 and row["cost"] > 0
    assert balance(priced) == 1000 * MICRO - row["cost"]


async def _async(value: bool) -> bool:
    return value


async def test_the_demo_echo_speaks_messages(proxy: Proxy, alice: str) -> None:
    client = claude(proxy, alice)
    message = await client.messages.create(model="echo", max_tokens=100, messages=USER)
    async with client.messages.stream(model="echo", max_tokens=100, messages=USER) as stream:
        streamed = await stream.get_final_message()
    await client.close()
    assert message.content[0].text == streamed.content[0].text  # type: ignore[union-attr]
    assert "one two three" in message.content[0].text  # type: ignore[union-attr]
    await proxy.flush()
    rows = query(proxy.rt.config.database, "SELECT * FROM usage WHERE model = 'echo' ORDER BY id")
    echo = Fraction(1, MICRO)  # 1 coin per million tokens, both ways
    for row, usage in zip(rows, (message.usage, streamed.usage), strict=True):
        assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.input_tokens, usage.output_tokens)
        assert row["cost"] == -(-(usage.input_tokens + usage.output_tokens) * echo * MICRO // 1)


async def test_anthropic_clients_list_models_in_their_shape(proxy: Proxy, http: aiohttp.ClientSession) -> None:
    """``client.models.list()`` of the Anthropic SDK: the account's models, in Anthropic's list shape;
    an OpenAI client (no anthropic-version header) still gets OpenAI's."""
    await proxy.account("echo-only", models=["echo"])
    key = await proxy.key("echo-only")
    client = claude(proxy, key)
    listed = [m async for m in client.models.list()]
    one = await client.models.retrieve("echo")
    await client.close()
    assert [m.id for m in listed] == ["echo"] and one.id == "echo" and one.display_name == "echo"
    async with http.get(proxy.base_url + "/models", headers={"Authorization": f"Bearer {key}"}) as response:
        assert (await response.json())["object"] == "list"

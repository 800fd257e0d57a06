"""The Responses API through the real app: the `openai` SDK and the OpenAI Agents SDK as clients, the fake
upstream and the built-in echo as backends, the usage table as the judge.

What is billed is what the backend reported (``usage.input_tokens`` / ``output_tokens``, cached input at
``cached_prompt``), bounded by the request's worst case; follow-ups on a response (retrieve, input_items,
cancel, delete, ``previous_response_id``) reach the backend that made it, for the account that made it
only; what Lumen cannot bill (``background``) or would read differently from a backend is refused before
any backend is asked.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from agents import Agent, OpenAIProvider, RunConfig, Runner, function_tool, set_tracing_disabled
from openai.types.responses import ResponseUsage

from lumen_proxy.billing import cost, worst_cost
from lumen_proxy.config import Price
from tests.conftest import MakeProxy, Proxy, auth, build_config, config_dict, eventually, priced_proxy, query
from tests.fake_upstream import (
    RESPONSES_WEATHER_TOOL,
    TOOL_ARGUMENT_FRAGMENTS,
    TOOL_ARGUMENTS,
    RecordedRequest,
    UpstreamServer,
    chat_reply,
    response_conversation,
)

MICRO = 1_000_000
START = 1000 * MICRO  # every test account's coins (tests/conftest.py)
MAX_OUTPUT = 1000  # gpt-4o's max_output_tokens in tests/conftest.py
HELLO = "hello there"
MODELS = ["gpt-4o", "echo"]  # the fake upstream, the built-in echo


def reply_for(model: str, text: str) -> str:
    """What the backend of ``model`` answers to the single input ``text``."""
    if model == "echo":
        return f"Echo from Lumen's built-in model: {text}"
    return chat_reply("up1", response_conversation({"input": text}))


def price_of(proxy: Proxy, model: str) -> Price:
    return proxy.rt.config.by_name[model].price


def usage_row(proxy: Proxy, request_id: str) -> sqlite3.Row:
    rows = query(proxy.rt.config.database, "SELECT * FROM usage WHERE request_id = ?", request_id)
    assert len(rows) == 1, request_id
    return rows[0]


def response_rows(proxy: Proxy) -> list[sqlite3.Row]:
    return query(proxy.rt.config.database, "SELECT * FROM usage WHERE endpoint = '/v1/responses' ORDER BY id")


def balance(proxy: Proxy, account: str) -> int:
    return int(query(proxy.rt.config.database, "SELECT balance FROM accounts WHERE name = ?", account)[0][0])


def reported_usage(record: RecordedRequest) -> Any:
    """The usage object the fake sent: in the answer, or in a stream's final event."""
    if record.body.get("stream"):
        return record.events()[-1]["response"]["usage"]
    return orjson.loads(bytes(record.sent))["usage"]


def assert_billed(proxy: Proxy, row: sqlite3.Row, model: str, usage: ResponseUsage) -> None:
    """The row bills exactly the usage the SDK parsed, at the model's prices."""
    cached = usage.input_tokens_details.cached_tokens if usage.input_tokens_details else 0
    assert (row["endpoint"], row["model"], row["status"]) == ("/v1/responses", model, 200)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.input_tokens, usage.output_tokens)
    assert row["cost"] == cost(price_of(proxy, model), usage.input_tokens, usage.output_tokens, cached) > 0
    assert (row["estimated"], row["partial"], row["capped"]) == (0, 0, 0)


def assert_rows_bill_what_the_fake_sent(proxy: Proxy, upstream: UpstreamServer) -> None:
    """One row per request the fake answered, in order, each billing the usage it sent."""
    sent = [reported_usage(r) for r in upstream.state.requests_to("/v1/responses")]
    rows = response_rows(proxy)
    assert [(r["status"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (200, u["input_tokens"], u["output_tokens"]) for u in sent]
    assert [r["cost"] for r in rows] == [cost(price_of(proxy, "gpt-4o"), u["input_tokens"], u["output_tokens"])
                                         for u in sent]
    assert balance(proxy, "alice") == START - sum(r["cost"] for r in rows)


# -- create: text arrives, the usage row bills what the backend reported ------------------------------------
@pytest.mark.parametrize("model", MODELS)
async def test_create_bills_the_usage_the_backend_reported(proxy: Proxy, alice: str, model: str) -> None:
    raw = await proxy.sdk(alice).responses.with_raw_response.create(model=model, input=HELLO)
    response = raw.parse()
    assert response.output_text == reply_for(model, HELLO)
    assert response.usage is not None
    await proxy.flush()
    assert_billed(proxy, usage_row(proxy, raw.headers["x-request-id"]), model, response.usage)
    assert balance(proxy, "alice") == START - usage_row(proxy, raw.headers["x-request-id"])["cost"]


@pytest.mark.parametrize("model", MODELS)
async def test_stream_events_carry_the_text_and_bill_the_final_usage(proxy: Proxy, alice: str, model: str) -> None:
    stream = await proxy.sdk(alice).responses.create(model=model, input=HELLO, stream=True)
    events = [event async for event in stream]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == reply_for(model, HELLO)
    final = events[-1]
    assert final.type == "response.completed" and final.response.usage is not None
    assert final.response.output_text == text
    await proxy.flush()
    row = usage_row(proxy, stream.response.headers["x-request-id"])
    assert_billed(proxy, row, model, final.response.usage)
    assert balance(proxy, "alice") == START - row["cost"]


@pytest.mark.parametrize("model", MODELS)
async def test_stream_helper_final_response_is_billed(proxy: Proxy, alice: str, model: str) -> None:
    async with proxy.sdk(alice).responses.stream(model=model, input=HELLO) as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == reply_for(model, HELLO)
    assert final.usage is not None
    await proxy.flush()
    (row,) = response_rows(proxy)
    assert_billed(proxy, row, model, final.usage)
    assert balance(proxy, "alice") == START - row["cost"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_the_client_receives_the_backends_bytes(
        proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession, stream: bool) -> None:
    async with http.post(proxy.base_url + "/responses", headers=auth(alice),
                         json={"model": "gpt-4o", "input": HELLO, "stream": stream}) as response:
        assert response.status == 200
        received = await response.read()
    assert received == bytes(upstream.state.last.sent)
    assert response.content_type == ("text/event-stream" if stream else "application/json")
    # Upstream: the backend's model name, and the model's output cap on a request that set none.
    assert upstream.state.last.body == {"model": "fake-model", "input": HELLO, "stream": stream,
                                        "max_output_tokens": MAX_OUTPUT}


@pytest.fixture
async def cached_proxy(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> Proxy:
    """gpt-4o with a cached_prompt price (half the prompt price), and alice."""
    return await priced_proxy(make_proxy, upstream, tmp_path, {"prompt": 2.5, "completion": 10, "cached_prompt": 1.25})


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_cached_input_is_priced_at_cached_prompt(
        cached_proxy: Proxy, upstream: UpstreamServer, stream: bool) -> None:
    proxy = cached_proxy
    client = proxy.sdk(await proxy.key("alice"))
    upstream.state.behavior.cached_tokens = 3
    if stream:
        async with client.responses.stream(model="gpt-4o", input=HELLO) as events:
            response = await events.get_final_response()
    else:
        response = await client.responses.create(model="gpt-4o", input=HELLO)
    usage = response.usage
    assert usage is not None and usage.input_tokens_details.cached_tokens == 3 < usage.input_tokens
    await proxy.flush()
    (row,) = response_rows(proxy)
    price = price_of(proxy, "gpt-4o")
    assert (price.prompt, price.cached) == (2_500_000, 1_250_000)
    assert_billed(proxy, row, "gpt-4o", usage)
    assert row["cost"] == cost(price, usage.input_tokens, usage.output_tokens, 3) \
        < cost(price, usage.input_tokens, usage.output_tokens)
    details = json.loads(row["details"])
    sent = reported_usage(upstream.state.last)
    assert details == {k: v for k, v in sent.items() if k.endswith("_details")}
    assert details["input_tokens_details"] == {"cached_tokens": 3}
    assert balance(proxy, "alice") == START - row["cost"]


# -- tools and conversations ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_function_tool_call(proxy: Proxy, alice: str, upstream: UpstreamServer, stream: bool) -> None:
    client = proxy.sdk(alice)
    if stream:
        async with client.responses.stream(model="gpt-4o", input="weather?", tools=[RESPONSES_WEATHER_TOOL]) as s:
            fragments = [e.delta async for e in s if e.type == "response.function_call_arguments.delta"]
            response = await s.get_final_response()
        assert fragments == list(TOOL_ARGUMENT_FRAGMENTS)  # relayed as the backend split them
    else:
        response = await client.responses.create(model="gpt-4o", input="weather?", tools=[RESPONSES_WEATHER_TOOL])
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == json.loads(TOOL_ARGUMENTS)
    assert upstream.state.last.body["tools"] == [RESPONSES_WEATHER_TOOL]
    assert response.usage is not None
    await proxy.flush()
    (row,) = response_rows(proxy)
    assert_billed(proxy, row, "gpt-4o", response.usage)


async def test_previous_response_id_continues_after_a_function_call(
        proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    client = proxy.sdk(alice)
    first = await client.responses.create(model="gpt-4o", input="weather?", tools=[RESPONSES_WEATHER_TOOL])
    (call,) = first.output
    assert call.type == "function_call"
    second = await client.responses.create(
        model="gpt-4o", previous_response_id=first.id, tools=[RESPONSES_WEATHER_TOOL],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    history = upstream.state.stored_responses[first.id].conversation
    assert second.output_text == chat_reply("up1", response_conversation(upstream.state.last.body, history))
    assert second.output_text.endswith(": sunny")
    third = await client.responses.create(model="gpt-4o", previous_response_id=second.id, input="thanks")
    history = upstream.state.stored_responses[second.id].conversation
    assert third.output_text == chat_reply("up1", response_conversation({"input": "thanks"}, history))
    assert [r.body.get("previous_response_id") for r in upstream.state.requests_to("/v1/responses")] == [
        None, first.id, second.id]
    await proxy.flush()
    assert_rows_bill_what_the_fake_sent(proxy, upstream)


@pytest.fixture
async def two_backends(make_proxy: MakeProxy, upstream: UpstreamServer, upstream2: UpstreamServer,
                       tmp_path: Path) -> Proxy:
    """gpt-4o rotating over two fakes, and alice."""
    proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url, upstream2.base_url])))
    await proxy.account("alice")
    return proxy


def calls_about(fake: UpstreamServer, response_id: str) -> list[tuple[str, str]]:
    """(method, path) of every request ``fake`` saw that names ``response_id`` (in its path or as previous)."""
    return [(r.method, r.path) for r in fake.state.requests if response_id in r.path
            or (isinstance(r.body, dict) and r.body.get("previous_response_id") == response_id)]


async def test_follow_ups_reach_the_backend_that_made_the_response(
        two_backends: Proxy, upstream: UpstreamServer, upstream2: UpstreamServer) -> None:
    proxy = two_backends
    client = proxy.sdk(await proxy.key("alice"))
    created = [await client.responses.create(model="gpt-4o", input=f"hi {i}") for i in range(4)]
    fakes = (upstream, upstream2)
    assert all(fake.state.response_ids for fake in fakes)  # the creates rotated over both
    rounds = 3
    for _ in range(rounds):
        for response in created:
            assert await client.responses.retrieve(response.id) == response
            items = [item async for item in client.responses.input_items.list(response.id)]
            assert [p.text for item in items if item.type == "message" for p in item.content
                    if p.type == "input_text"] == [response.output_text.rsplit(": ", 1)[1]]
            with pytest.raises(openai.BadRequestError) as caught:  # the backend's own answer: it is done
                await client.responses.cancel(response.id)
            assert caught.value.body == {"message": "Cannot cancel a synchronous response.",
                                         "type": "invalid_request_error", "param": "response_id", "code": None}
            more = await client.responses.create(model="gpt-4o", input="and?", previous_response_id=response.id)
            assert more.previous_response_id == response.id
            await client.responses.create(model="gpt-4o", input="in between")  # rotation goes on meanwhile
    for response in created:
        await client.responses.delete(response.id)
    for fake in fakes:  # plain creates kept rotating over both backends
        assert any(r.body["input"] == "in between" for r in fake.state.requests_to("/v1/responses"))
    for response in created:
        (holder,) = [fake for fake in fakes if response.id in fake.state.response_ids]
        (other,) = [fake for fake in fakes if fake is not holder]
        path = f"/v1/responses/{response.id}"
        assert sorted(calls_about(holder, response.id)) == sorted(
            [("GET", path), ("GET", path + "/input_items"), ("POST", path + "/cancel"),
             ("POST", "/v1/responses")] * rounds + [("DELETE", path)])
        assert calls_about(other, response.id) == []
        assert response.id not in holder.state.stored_responses  # deleted where it lived
    seen = sum(len(fake.state.requests) for fake in fakes)
    with pytest.raises(openai.NotFoundError):  # Lumen forgot it with the delete: nobody is asked
        await client.responses.retrieve(created[0].id)
    assert sum(len(fake.state.requests) for fake in fakes) == seen


async def test_follow_ups_on_the_builtin_echo(proxy: Proxy, alice: str) -> None:
    client = proxy.sdk(alice)
    first = await client.responses.create(model="echo", input=HELLO)
    assert await client.responses.retrieve(first.id) == first
    items = [item async for item in client.responses.input_items.list(first.id)]
    assert [p.text for item in items if item.type == "message" for p in item.content if p.type == "input_text"] == [
        HELLO]
    second = await client.responses.create(model="echo", input="again", previous_response_id=first.id)
    assert second.output_text == reply_for("echo", "again")
    await client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)
    await proxy.flush()
    rows = response_rows(proxy)
    assert [(r["status"], r["estimated"]) for r in rows] == [(200, 0), (200, 0)]
    assert balance(proxy, "alice") == START - sum(r["cost"] for r in rows)


@pytest.mark.parametrize("model", MODELS)
async def test_input_items_order_and_limit_reach_the_backend(proxy: Proxy, alice: str, model: str) -> None:
    client = proxy.sdk(alice)
    created = await client.responses.create(model=model, input=[{"role": "user", "content": "one"},
                                                                 {"role": "user", "content": "two"}])

    def texts(items: list[Any]) -> list[str]:
        return [p.text for item in items if item.type == "message" for p in item.content if p.type == "input_text"]

    assert texts((await client.responses.input_items.list(created.id)).data) == ["two", "one"]  # newest first
    page = await client.responses.input_items.list(created.id, order="asc", limit=1)
    assert (texts(page.data), page.has_more) == (["one"], True)
    assert texts([item async for item in client.responses.input_items.list(created.id, order="asc", limit=1)]) == [
        "one", "two"]  # the SDK pages on with `after`


# -- hostile callers and lying backends ----------------------------------------------------------------------
FOLLOW_UPS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    # name: (method, path under /v1 with {id}, JSON body)
    "retrieve": ("GET", "/responses/{id}", None),
    "delete": ("DELETE", "/responses/{id}", None),
    "cancel": ("POST", "/responses/{id}/cancel", None),
    "input_items": ("GET", "/responses/{id}/input_items", None),
    "previous_response_id": ("POST", "/responses",
                             {"model": "gpt-4o", "input": "more", "previous_response_id": "{id}"}),
}


async def follow_up(http: aiohttp.ClientSession, proxy: Proxy, key: str, name: str, response_id: str,
                    ) -> tuple[int, str, bytes]:
    method, path, body = FOLLOW_UPS[name]
    data = orjson.dumps(body).decode().replace("{id}", response_id).encode() if body is not None else None
    async with http.request(method, proxy.base_url + path.replace("{id}", response_id), data=data,
                            headers={**auth(key), "Content-Type": "application/json"}) as response:
        return response.status, response.content_type, await response.read()


async def test_another_account_gets_the_same_404_as_for_an_unknown_id(
        proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession) -> None:
    await proxy.account("mallory")
    mallory = await proxy.key("mallory")
    created = await proxy.sdk(alice).responses.create(model="gpt-4o", input=HELLO)
    unknown = created.id[:-1] + "9"  # the same length and shape, never made
    assert unknown not in upstream.state.response_ids
    for name in FOLLOW_UPS:
        theirs = await follow_up(http, proxy, mallory, name, created.id)
        assert theirs[0] == 404, name
        for asker in (mallory, alice):  # an id nobody made, with the same length and shape
            status, content_type, body = await follow_up(http, proxy, asker, name, unknown)
            assert theirs == (status, content_type, body.replace(unknown.encode(), created.id.encode())), name
    assert [(r.method, r.path) for r in upstream.state.requests] == [("POST", "/v1/responses")]  # only alice's
    assert await proxy.sdk(alice).responses.retrieve(created.id) == created  # it was there all along
    await proxy.flush()
    assert balance(proxy, "mallory") == START


@pytest.fixture
async def bad_request(proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession) -> Any:
    """POST a /v1/responses body; assert it is a 400 that reached no backend and cost nothing; its error."""

    async def send(fields: dict[str, Any]) -> dict[str, Any]:
        async with http.post(proxy.base_url + "/responses", headers=auth(alice),
                             json={"model": "gpt-4o", "input": HELLO, **fields}) as response:
            assert response.status == 400
            error = (await response.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert upstream.state.requests == []
        await proxy.flush()
        assert balance(proxy, "alice") == START
        return dict(error)

    return send


@pytest.mark.parametrize("value", [5, ["resp_1"], {"id": "resp_1"}, True, ""],
                         ids=["int", "list", "object", "bool", "empty"])
async def test_previous_response_id_must_be_a_string(bad_request: Any, value: Any) -> None:
    error = await bad_request({"previous_response_id": value})
    assert (error["param"], error["code"]) == ("previous_response_id", "invalid_type")


@pytest.mark.parametrize("key", ["Previous_Response_Id", "PREVIOUS_RESPONSE_ID", "Max_Output_Tokens", "Input",
                                 "Stream"])
async def test_a_case_variant_of_a_field_lumen_reads_is_refused(bad_request: Any, key: str) -> None:
    error = await bad_request({key: "resp_1" if "response" in key.lower() else 5})
    assert error["param"] == key
    assert "case-sensitive" in error["message"]


@pytest.mark.parametrize("value, code", [
    (-1, "integer_below_min_value"), (1.5, "invalid_type"), (16000.0, "invalid_type"), ("100", "invalid_type"),
    (True, "invalid_type"), (False, "invalid_type"), (2**31, "integer_above_max_value"),
], ids=["negative", "float", "integral float", "string", "true", "false", "2**31"])
async def test_max_output_tokens_must_be_an_integer_in_range(bad_request: Any, value: Any, code: str) -> None:
    error = await bad_request({"max_output_tokens": value})
    assert (error["param"], error["code"]) == ("max_output_tokens", code)


@pytest.mark.parametrize("value", [True, "true", 1], ids=["true", "string", "one"])
async def test_background_is_refused(bad_request: Any, value: Any) -> None:
    error = await bad_request({"background": value})
    assert error["param"] == "background"
    assert "bills a response when it ends" in error["message"]


@pytest.mark.parametrize("value", ["conv_123", {"id": "conv_123"}, 0])
async def test_conversation_is_refused(bad_request: Any, value: Any) -> None:
    """Conversations are state Lumen cannot tie to an account (it does not serve that API)."""
    error = await bad_request({"conversation": value})
    assert error["param"] == "conversation" and "previous_response_id" in error["message"]


async def test_background_through_the_sdk_is_a_400_and_false_is_fine(
        proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    client = proxy.sdk(alice)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="gpt-4o", input=HELLO, background=True)
    assert caught.value.param == "background"
    assert upstream.state.requests == []
    response = await client.responses.create(model="gpt-4o", input=HELLO, background=False)
    assert response.status == "completed" and upstream.state.last.body["background"] is False


LIES: dict[str, Any] = {
    "negative": {"input_tokens": -5, "output_tokens": 3, "total_tokens": -2},
    "strings": {"input_tokens": "12", "output_tokens": "3", "total_tokens": "15"},
    "not an object": -5,
    "huge": {"input_tokens": 10**12, "output_tokens": 10**12, "total_tokens": 2 * 10**12},
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_lying_usage_is_estimated_or_capped_and_the_ledger_balances(
        proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession, stream: bool) -> None:
    price = price_of(proxy, "gpt-4o")
    costs = []
    for name, lie in LIES.items():
        upstream.state.behavior.usage_override = lie
        raw = orjson.dumps({"model": "gpt-4o", "input": HELLO, "stream": stream})
        async with http.post(proxy.base_url + "/responses", data=raw,
                             headers={**auth(alice), "Content-Type": "application/json"}) as response:
            assert response.status == 200
            received = await response.read()
        assert received == bytes(upstream.state.last.sent)  # relayed as sent, lie included
        await proxy.flush()
        row = usage_row(proxy, response.headers["x-request-id"])
        held_prompt = len(raw) // 2 + 1 + 2  # README: size / 2 + 1, + 2 per input
        if name == "huge":  # capped at twice the held prompt and at the held completion
            assert (row["capped"], row["estimated"]) == (1, 0), name
            assert (row["prompt_tokens"], row["completion_tokens"]) == (2 * held_prompt, MAX_OUTPUT), name
        else:  # billed as if absent: an estimate, never 0
            assert (row["capped"], row["estimated"]) == (0, 1), name
            assert row["prompt_tokens"] == len(raw) // 4 + 1, name
            estimate = len(upstream.state.last.events()) if stream else len(received) // 4
            assert row["completion_tokens"] == estimate > 0, name
        assert (row["status"], row["partial"]) == (200, 0), name
        assert row["cost"] == cost(price, row["prompt_tokens"], row["completion_tokens"]) > 0, name
        costs.append(row["cost"])
    assert balance(proxy, "alice") == START - sum(costs)
    assert proxy.rt.wallets.held == {}


async def test_a_request_without_max_output_tokens_gets_the_models_and_holds_it(
        proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession) -> None:
    account_id = (await proxy.rt.store.account("alice")).id
    price = price_of(proxy, "gpt-4o")
    for fields, cap in [({}, MAX_OUTPUT), ({"max_output_tokens": 7}, 7)]:
        upstream.state.reset()
        gate = upstream.state.behavior.gate = asyncio.Event()
        raw = orjson.dumps({"model": "gpt-4o", "input": HELLO, **fields})
        sent = asyncio.ensure_future(http.post(proxy.base_url + "/responses", data=raw,
                                               headers={**auth(alice), "Content-Type": "application/json"}))

        async def arrived() -> bool:
            return len(upstream.state.requests) == 1

        assert await eventually(arrived)
        assert upstream.state.last.body["max_output_tokens"] == cap
        assert proxy.rt.wallets.held == {account_id: worst_cost(price, len(raw) // 2 + 1 + 2, cap)}
        gate.set()
        async with await sent as response:
            assert response.status == 200
            usage = (await response.json())["usage"]
        await proxy.flush()
        row = usage_row(proxy, response.headers["x-request-id"])
        assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["input_tokens"], usage["output_tokens"])
        assert proxy.rt.wallets.held == {}


async def test_402_when_the_models_max_output_tokens_does_not_fit(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    data = config_dict(tmp_path, [upstream.base_url])
    data["models"][0]["max_output_tokens"] = 100_000  # × 10 coins per million: 1 coin before the prompt
    proxy = await make_proxy(build_config(tmp_path, data))
    await proxy.account("poor", coins=1)
    client = proxy.sdk(await proxy.key("poor"))
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as caught:
            await client.responses.create(model="gpt-4o", input=HELLO, stream=stream)
        assert (caught.value.status_code, caught.value.code) == (402, "insufficient_quota")
    assert upstream.state.requests == []
    response = await client.responses.create(model="gpt-4o", input=HELLO, max_output_tokens=10)  # this fits
    assert upstream.state.last.body["max_output_tokens"] == 10
    assert response.usage is not None
    await proxy.flush()
    rows = response_rows(proxy)
    assert [(r["status"], r["cost"]) for r in rows[:2]] == [(402, 0), (402, 0)]
    assert_billed(proxy, rows[2], "gpt-4o", response.usage)
    assert balance(proxy, "poor") == MICRO - rows[2]["cost"]


async def test_a_client_leaving_mid_stream_is_billed_partial(
        proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession) -> None:
    upstream.state.behavior.reply = "word " * 60
    upstream.state.behavior.chunk_delay = 0.05
    response = await http.post(proxy.base_url + "/responses", headers=auth(alice),
                               json={"model": "gpt-4o", "input": HELLO, "stream": True})
    assert (await response.content.readany()).startswith(b"event: response.created\n")
    request_id = response.headers["x-request-id"]
    response.close()  # the client goes away after the first event
    await asyncio.wait_for(upstream.state.disconnected.wait(), 5)  # and the backend is told

    async def logged() -> bool:
        await proxy.flush()
        return bool(query(proxy.rt.config.database, "SELECT 1 FROM usage WHERE request_id = ?", request_id))

    assert await eventually(logged)
    row = usage_row(proxy, request_id)
    assert (row["status"], row["partial"], row["estimated"]) == (200, 1, 1)  # the 200 went out before it left
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] >= 1
    assert row["cost"] == cost(price_of(proxy, "gpt-4o"), row["prompt_tokens"], row["completion_tokens"]) > 0
    assert balance(proxy, "alice") == START - row["cost"]
    assert proxy.rt.wallets.held == {}


async def test_a_backend_dying_mid_stream_ends_it_with_an_error_and_is_billed_partial(
        proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    upstream.state.behavior.die_after_chunks = 4
    stream = await proxy.sdk(alice).responses.create(model="gpt-4o", input=HELLO, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="broke off the stream"):  # the SDK raises on the error event
        async for event in stream:
            received.append(event.type)
    assert received == [e["type"] for e in upstream.state.last.events()]  # what the backend sent, then the end
    await proxy.flush()
    row = usage_row(proxy, stream.response.headers["x-request-id"])
    assert (row["status"], row["partial"], row["estimated"]) == (502, 1, 1)
    assert row["completion_tokens"] == len(received)  # the events seen
    assert row["cost"] == cost(price_of(proxy, "gpt-4o"), row["prompt_tokens"], row["completion_tokens"]) > 0
    assert balance(proxy, "alice") == START - row["cost"]
    assert proxy.rt.wallets.held == {}


# -- backends' apis ------------------------------------------------------------------------------------------
async def test_responses_go_only_to_the_backend_that_serves_them(
        make_proxy: MakeProxy, upstream: UpstreamServer, upstream2: UpstreamServer, tmp_path: Path) -> None:
    data = config_dict(tmp_path, [upstream.base_url, upstream2.base_url])
    data["models"][0]["backends"][0]["apis"] = ["chat"]
    proxy = await make_proxy(build_config(tmp_path, data))
    await proxy.account("alice")
    client = proxy.sdk(await proxy.key("alice"))
    made = []
    for i in range(3):
        made.append(await client.responses.create(model="gpt-4o", input=f"hi {i}"))
        async for _ in await client.responses.create(model="gpt-4o", input=f"hi {i}", stream=True):
            pass
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    await client.responses.retrieve(made[0].id)
    await client.responses.create(model="gpt-4o", input="more", previous_response_id=made[1].id)
    assert [r.path for r in upstream.state.requests if "/responses" in r.path] == []
    assert len(upstream2.state.requests_to("/v1/responses")) == 7
    assert upstream.state.requests_to("/v1/chat/completions")  # chat still rotates over both
    assert upstream2.state.requests_to("/v1/chat/completions")


async def test_a_model_served_only_on_chat_is_404_on_responses(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    data = config_dict(tmp_path, [upstream.base_url])
    data["models"][0]["backends"][0]["apis"] = ["chat"]
    proxy = await make_proxy(build_config(tmp_path, data))
    await proxy.account("alice")
    client = proxy.sdk(await proxy.key("alice"))
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            await client.responses.create(model="gpt-4o", input=HELLO, stream=stream)
        assert (caught.value.code, caught.value.param) == ("model_not_found", "model")
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["message"] == ("The model `gpt-4o` is not served on /v1/responses; it is served on "
                                                "/v1/chat/completions.")
    assert upstream.state.requests == []
    reply = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    await proxy.flush()
    assert balance(proxy, "alice") == START - sum(r["cost"] for r in query(proxy.rt.config.database,
                                                                              "SELECT cost FROM usage"))


# -- the OpenAI Agents SDK, with its defaults (the Responses API) --------------------------------------------
@pytest.fixture
def agents_run(proxy: Proxy, alice: str) -> RunConfig:
    """A run config whose default provider talks to the proxy; no traces are made or sent anywhere."""
    set_tracing_disabled(True)
    client = proxy.sdk(alice)
    assert client.base_url.host == "127.0.0.1"
    return RunConfig(model_provider=OpenAIProvider(openai_client=client), tracing_disabled=True)


async def test_agents_sdk_run(agents_run: RunConfig, proxy: Proxy, upstream: UpstreamServer) -> None:
    agent = Agent(name="Assistant", instructions="You are terse.", model="gpt-4o")
    result = await Runner.run(agent, "hi", run_config=agents_run)
    (request,) = upstream.state.requests_to("/v1/responses")
    assert request.body["instructions"] == "You are terse."
    assert result.final_output == chat_reply("up1", response_conversation(request.body))
    await proxy.flush()
    assert_rows_bill_what_the_fake_sent(proxy, upstream)


async def test_agents_sdk_run_with_a_function_tool(
        agents_run: RunConfig, proxy: Proxy, upstream: UpstreamServer) -> None:
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        cities.append(city)
        return f"sunny in {city}"

    agent = Agent(name="Assistant", instructions="Use the tool.", model="gpt-4o", tools=[get_weather])
    result = await Runner.run(agent, "What is the weather in Paris?", run_config=agents_run)
    assert cities == [json.loads(TOOL_ARGUMENTS)["city"]]  # the fake called the tool
    first, second = upstream.state.requests_to("/v1/responses")
    assert [t["name"] for t in first.body["tools"]] == ["get_weather"]
    assert second.body["input"][-1]["type"] == "function_call_output"
    assert result.final_output == chat_reply("up1", response_conversation(second.body))
    assert result.final_output.endswith(": sunny in Paris")
    await proxy.flush()
    assert_rows_bill_what_the_fake_sent(proxy, upstream)


async def test_agents_sdk_run_streamed(agents_run: RunConfig, proxy: Proxy, upstream: UpstreamServer) -> None:
    agent = Agent(name="Assistant", instructions="You are terse.", model="gpt-4o")
    result = Runner.run_streamed(agent, "hi", run_config=agents_run)
    deltas = [event.data.delta async for event in result.stream_events()
              if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"]
    (request,) = upstream.state.requests_to("/v1/responses")
    assert request.body["stream"] is True
    assert "".join(deltas) == result.final_output == chat_reply("up1", response_conversation(request.body))
    await proxy.flush()
    assert_rows_bill_what_the_fake_sent(proxy, upstream)

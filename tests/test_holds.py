"""The hold is the request's real worst case, and what goes upstream can never cost more than was held.

An account with 1 coin sends 20 concurrent requests of each shape a careless or hostile key holder
would try; the backend answers only once every request is either with it or refused, so they all
overlap. Before this was fixed the balance ended at -11.8 (n: 64), -2.28 (no max_tokens, a backend
generating to its own limit), -2.8 (100 image parts in a 6 KB body), -0.9 (a list of prompts).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lumen_proxy.billing import cost
from lumen_proxy.config import Price
from tests.conftest import MakeProxy, Proxy, auth, build_config, config_dict, eventually, query
from tests.fake_upstream import IMAGE_TOKENS, UpstreamServer

MICRO = 1_000_000
GPT4O = Price(prompt=2_500_000, completion=10_000_000)  # tests/conftest.py: 2.5 and 10 coins per million
MAX_OUTPUT = 1000  # the model's max_output_tokens in tests/conftest.py
USER = [{"role": "user", "content": "hi"}]
LONG_REPLY = "word " * 20_000  # more than any max_tokens below: only a cap stops the backend


def image_parts(count: int) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "what is on these?"}]
    parts += [{"type": "image_url", "image_url": {"url": f"https://e.org/{i}.png"}} for i in range(count)]
    return [{"role": "user", "content": parts}]


SHAPES: dict[str, tuple[str, dict[str, Any], bool]] = {
    # name: (path, body, does the backend ignore max_tokens?)
    "n=64": ("/chat/completions", {"model": "gpt-4o", "messages": USER, "n": 64, "max_tokens": 1000}, False),
    "no max_tokens, backend ignores caps": ("/chat/completions", {"model": "gpt-4o", "messages": USER}, True),
    "100 image parts": ("/chat/completions", {"model": "gpt-4o", "messages": image_parts(100), "max_tokens": 10},
                        False),
    "50 prompts": ("/completions", {"model": "gpt-4o", "prompt": [f"p{i}" for i in range(50)], "max_tokens": 1000},
                   False),
    "best_of=20": ("/completions", {"model": "gpt-4o", "prompt": "once", "best_of": 20, "max_tokens": 1000}, False),
}


async def post(session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url, json=body, headers=auth(key)) as response:
        return response.status, await response.json()


async def concurrent_run(proxy: Proxy, upstream: UpstreamServer, key: str, path: str, body: dict[str, Any],
                         count: int = 20) -> list[int]:
    """Send ``count`` requests at once; the backend answers when each is with it or refused."""
    gate = upstream.state.behavior.gate = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.ensure_future(post(session, proxy.base_url + path, key, body)) for _ in range(count)]

        async def all_placed() -> bool:
            return sum(t.done() for t in tasks) + len(upstream.state.requests) == count

        assert await eventually(all_placed)
        gate.set()
        results = await asyncio.gather(*tasks)
    await proxy.flush()
    return [status for status, _ in results]


def db_balance(proxy: Proxy, account: str) -> int:
    return int(query(proxy.rt.config.database, "SELECT balance FROM accounts WHERE name = ?", account)[0][0])


@pytest.mark.parametrize("shape", SHAPES)
async def test_concurrent_requests_of_any_shape_cannot_take_a_balance_below_zero(
        proxy: Proxy, upstream: UpstreamServer, shape: str) -> None:
    path, body, ignores_caps = SHAPES[shape]
    upstream.state.behavior.reply = LONG_REPLY
    upstream.state.behavior.ignore_max_tokens = ignores_caps
    await proxy.account("student", coins=1)
    key = await proxy.key("student")

    statuses = await concurrent_run(proxy, upstream, key, path, body)

    assert statuses.count(200) >= 1 and set(statuses) <= {200, 402}, statuses
    assert db_balance(proxy, "student") >= 0  # an honest backend's prompt is under the estimate: no overrun at all
    assert proxy.rt.wallets.held == {}
    rows = query(proxy.rt.config.database, "SELECT sum(cost) AS spent FROM usage")
    assert db_balance(proxy, "student") == MICRO - rows[0]["spent"]


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 16000.0), ("max_tokens", "16000"), ("max_tokens", -1), ("max_tokens", True),
    ("max_completion_tokens", 1.5), ("max_completion_tokens", [100]), ("max_tokens", 2**31),
    ("n", "2"), ("n", 0), ("n", 2.0), ("n", False), ("n", 129), ("best_of", "3"),
    ("stream", "true"), ("stream", 1), ("stream_options", "include_usage"),
])
async def test_a_field_lumen_reads_must_have_its_exact_type(
        proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession, field: str, value: Any,
) -> None:
    """vLLM's lax parsing would read "16000" or 16000.0 as 16000, which the hold would not have seen."""
    status, error = await post(http, proxy.base_url + "/chat/completions", alice,
                               {"model": "gpt-4o", "messages": USER, field: value})
    assert status == 400
    assert error["error"]["param"] == field and error["error"]["type"] == "invalid_request_error"
    assert upstream.state.requests == []


@pytest.mark.parametrize("key", ["Model", "MAX_TOKENS", "Max_Completion_Tokens", "N", "Stream", "STREAM_OPTIONS",
                                 "Messages", "ſtream", "max_to\u212aens"])  # long s and Kelvin sign fold in Go
async def test_a_case_variant_of_a_field_lumen_reads_is_refused(
        proxy: Proxy, upstream: UpstreamServer, http: aiohttp.ClientSession, key: str) -> None:
    """Go backends (Ollama) match keys case-insensitively, the last one winning: "Model" would choose the model."""
    await proxy.account("cheap", models=["echo"])
    cheap = await proxy.key("cheap")
    value: Any = {"Model": "gpt-4o", "Messages": USER}.get(key, 16000)
    status, error = await post(http, proxy.base_url + "/chat/completions", cheap,
                               {"model": "echo", "messages": USER, key: value})
    assert status == 400, error
    assert error["error"]["param"] == key and "case-sensitive" in error["error"]["message"]
    await proxy.flush()
    assert [tuple(r) for r in query(proxy.rt.config.database, "SELECT status, cost FROM usage")] == [(400, 0)]


async def test_the_model_lumen_checked_is_the_one_upstream_even_with_duplicate_keys(
        proxy: Proxy, upstream: UpstreamServer, http: aiohttp.ClientSession) -> None:
    """The body goes upstream re-encoded from the object Lumen checked: one key each, the last value."""
    await proxy.account("poor", coins=0.02)
    key = await proxy.key("poor")
    raw = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_tokens": 100000}'
    async with http.post(proxy.base_url + "/chat/completions", data=raw,
                         headers={**auth(key), "Content-Type": "application/json"}) as response:
        assert response.status == 402  # 100,000 tokens do not fit in 0.02 coins: Lumen saw the last one
    raw = raw.replace(b"100000", b"7")
    async with http.post(proxy.base_url + "/chat/completions", data=raw,
                         headers={**auth(key), "Content-Type": "application/json"}) as response:
        assert response.status == 200
    sent = upstream.state.last
    assert sent.body["max_tokens"] == 7


async def test_a_request_without_a_cap_gets_the_models_max_output_tokens_upstream(
        proxy: Proxy, alice: str, upstream: UpstreamServer, http: aiohttp.ClientSession) -> None:
    upstream.state.behavior.reply = LONG_REPLY
    chat = proxy.base_url + "/chat/completions"
    status, answer = await post(http, chat, alice, {"model": "gpt-4o", "messages": USER})
    assert status == 200
    assert upstream.state.last.body["max_tokens"] == MAX_OUTPUT
    assert answer["usage"]["completion_tokens"] == MAX_OUTPUT
    status, _ = await post(http, proxy.base_url + "/completions", alice, {"model": "gpt-4o", "prompt": "once"})
    assert status == 200 and upstream.state.last.body["max_tokens"] == MAX_OUTPUT
    status, _ = await post(http, proxy.base_url + "/chat/completions", alice,
                           {"model": "gpt-4o", "messages": USER, "max_completion_tokens": 3})
    assert status == 200
    assert upstream.state.last.body["max_completion_tokens"] == 3 and "max_tokens" not in upstream.state.last.body
    status, _ = await post(http, proxy.base_url + "/embeddings", alice,
                           {"model": "text-embedding-3-small", "input": "x"})
    assert status == 200 and "max_tokens" not in upstream.state.last.body


async def test_a_backend_can_ask_for_max_completion_tokens(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    data = config_dict(tmp_path, [upstream.base_url])
    data["models"][0]["backends"][0]["max_tokens_field"] = "max_completion_tokens"  # OpenAI's o-series
    proxy = await make_proxy(build_config(tmp_path, data))
    await proxy.account("alice")
    key = await proxy.key("alice")
    status, _ = await post(http, proxy.base_url + "/chat/completions", key, {"model": "gpt-4o", "messages": USER})
    assert status == 200
    sent = upstream.state.last.body
    assert sent["max_completion_tokens"] == MAX_OUTPUT and "max_tokens" not in sent
    status, _ = await post(http, proxy.base_url + "/completions", key, {"model": "gpt-4o", "prompt": "once"})
    assert status == 200 and upstream.state.last.body["max_tokens"] == MAX_OUTPUT  # the only cap completions have


def body_size(body: dict[str, Any]) -> int:
    return len(json.dumps(body).encode())  # aiohttp's json= encodes with json.dumps


HELD: dict[str, tuple[str, dict[str, Any], Any]] = {
    # name: (path, body, held (prompt, completion) as a function of the body size)
    "chat, n=3": ("/chat/completions", {"model": "gpt-4o", "messages": USER, "n": 3, "max_tokens": 50},
                  lambda size: (size // 2 + 1 + 2, 3 * 50)),
    "chat, both caps": ("/chat/completions", {"model": "gpt-4o", "messages": USER, "max_tokens": 9,
                                              "max_completion_tokens": 40}, lambda size: (size // 2 + 3, 40)),
    "chat, images": ("/chat/completions", {"model": "gpt-4o", "messages": image_parts(4), "max_tokens": 5},
                     lambda size: (size // 2 + 3 + 4 * IMAGE_TOKENS, 5)),
    "completions, 4 prompts × best_of 3": (
        "/completions", {"model": "gpt-4o", "prompt": ["a", "b", "c", "d"], "best_of": 3, "n": 2, "max_tokens": 7},
        lambda size: (size // 2 + 1 + 2 * 4, 4 * 3 * 7)),
    "completions, token ids are one prompt": (
        "/completions", {"model": "gpt-4o", "prompt": [1, 2, 3], "max_tokens": 7},
        lambda size: (size // 2 + 3, 7)),
    "embeddings, 5 inputs": ("/embeddings", {"model": "text-embedding-3-small", "input": ["a"] * 5},
                             lambda size: (size // 2 + 1 + 2 * 5, 0)),
}


@pytest.mark.parametrize("shape", HELD)
async def test_the_hold_is_the_documented_worst_case(proxy: Proxy, alice: str, upstream: UpstreamServer,
                                                     http: aiohttp.ClientSession, shape: str) -> None:
    path, body, held = HELD[shape]
    model = proxy.rt.config.model(body["model"])
    assert model is not None
    upstream.state.behavior.gate = asyncio.Event()
    pending = asyncio.ensure_future(post(http, proxy.base_url + path, alice, body))
    assert await eventually(lambda: _is(len(upstream.state.requests) == 1))
    prompt, completion = held(body_size(body))
    account_id = next(a.id for a in proxy.rt.view.accounts.values() if a.name == "alice")
    assert proxy.rt.wallets.held == {account_id: cost(model.price, prompt, completion)}
    upstream.state.behavior.gate.set()
    status, _ = await pending
    assert status == 200 and proxy.rt.wallets.held == {}


async def _is(value: bool) -> bool:
    return value


async def test_part_tokens_are_configured_per_model(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    data = config_dict(tmp_path, [upstream.base_url])
    data["models"][0]["part_tokens"] = {"image": 16384}  # a vLLM model with dynamic resolution
    proxy = await make_proxy(build_config(tmp_path, data))
    await proxy.account("poor", coins=0.1)
    key = await proxy.key("poor")
    body = {"model": "gpt-4o", "messages": image_parts(3), "max_tokens": 1}
    status, error = await post(http, proxy.base_url + "/chat/completions", key, body)
    assert status == 402, error  # 3 × 16,384 prompt tokens × 2.5 coins per million = 0.12 coins
    body["messages"] = image_parts(2)  # 0.08 coins
    status, _ = await post(http, proxy.base_url + "/chat/completions", key, body)
    assert status == 200

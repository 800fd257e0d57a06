"""Errors Lumen itself produces on the Anthropic Messages API are in Anthropic's shape.

The Anthropic SDKs (and Claude Code) read ``{"type": "error", "error": {"type", "message"}}``; OpenAI's
shape would reach a user as an unparsed blob. Each refusal is driven through the real ``anthropic`` SDK
with the key in ``x-api-key``, as it sends it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest

from tests.conftest import MakeProxy, Proxy, build_config, config_dict
from tests.fake_upstream import UpstreamServer

USER = [{"role": "user", "content": "hi"}]


def claude(proxy: Proxy, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=key, base_url=proxy.origin, max_retries=0)


async def refusal(client: anthropic.AsyncAnthropic, **overrides: Any) -> anthropic.APIStatusError:
    body: dict[str, Any] = {"model": "gpt-4o", "max_tokens": 50, "messages": USER, **overrides}
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.messages.create(**body)
    await client.close()
    return caught.value


def anthropic_shape(error: anthropic.APIStatusError, status: int, kind: str) -> str:
    assert error.status_code == status
    assert isinstance(error.body, dict)
    assert error.body["type"] == "error"
    assert set(error.body) == {"type", "error"}
    assert error.body["error"]["type"] == kind
    message = error.body["error"]["message"]
    assert isinstance(message, str) and message
    assert error.response.headers["request-id"] == error.response.headers["x-request-id"]
    assert error.request_id == error.response.headers["request-id"]  # what the SDK shows users to quote
    return message


async def test_unknown_key_is_authentication_error(proxy: Proxy, alice: str) -> None:
    error = await refusal(claude(proxy, "sk-lumen-not-a-key"))
    assert isinstance(error, anthropic.AuthenticationError)
    message = anthropic_shape(error, 401, "authentication_error")
    assert "not-a-key" not in message  # never the whole key


async def test_missing_key_names_both_headers(proxy: Proxy, http: aiohttp.ClientSession) -> None:
    async with http.post(proxy.origin + "/v1/messages", json={"model": "gpt-4o"}) as response:
        body = await response.json()
    assert response.status == 401
    assert body["error"]["type"] == "authentication_error"
    assert "x-api-key" in body["error"]["message"] and "Authorization" in body["error"]["message"]


async def test_missing_max_tokens_is_invalid_request(proxy: Proxy, alice: str, upstream: UpstreamServer,
                                                     http: aiohttp.ClientSession) -> None:
    """The Messages API requires max_tokens; Lumen refuses before the backend sees anything."""
    async with http.post(proxy.origin + "/v1/messages", json={"model": "gpt-4o", "messages": USER},
                         headers={"x-api-key": alice}) as response:
        body = await response.json()
    assert response.status == 400
    assert body == {"type": "error", "error": {"type": "invalid_request_error",
                                               "message": "max_tokens: Field required"}}
    for bad in (0, -1, "50", 5.0, True, 2**31):
        async with http.post(proxy.origin + "/v1/messages", json={"model": "gpt-4o", "messages": USER,
                                                                  "max_tokens": bad},
                             headers={"x-api-key": alice}) as response:
            assert response.status == 400, bad
            assert (await response.json())["error"]["type"] == "invalid_request_error"
    assert not upstream.state.requests


async def test_no_coins_is_billing_error(proxy: Proxy) -> None:
    await proxy.account("broke", coins=0)
    error = await refusal(claude(proxy, await proxy.key("broke")))
    assert anthropic_shape(error, 402, "billing_error").startswith("You do not have enough coins")


async def test_model_not_allowed_is_permission_error(proxy: Proxy) -> None:
    await proxy.account("echo-only", models=["echo"])
    error = await refusal(claude(proxy, await proxy.key("echo-only")))
    assert isinstance(error, anthropic.PermissionDeniedError)
    assert "gpt-4o" in anthropic_shape(error, 403, "permission_error")


async def test_unknown_model_is_not_found_error(proxy: Proxy, alice: str) -> None:
    error = await refusal(claude(proxy, alice), model="claude-nonexistent")
    assert isinstance(error, anthropic.NotFoundError)
    assert "claude-nonexistent" in anthropic_shape(error, 404, "not_found_error")


async def test_unknown_path_under_messages_is_not_found_error(proxy: Proxy, alice: str,
                                                              http: aiohttp.ClientSession) -> None:
    async with http.post(proxy.origin + "/v1/messages/batches", json={}, headers={"x-api-key": alice}) as response:
        body = await response.json()
    assert response.status == 404
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert "/v1/messages/batches" in body["error"]["message"] and "/v1/messages" in body["error"]["message"]


async def test_rate_limit_is_rate_limit_error(make_proxy: MakeProxy, upstream: UpstreamServer,
                                              tmp_path: Path) -> None:
    proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url],
                                                                limits={"rpm": 1})))
    await proxy.account("alice")
    client = claude(proxy, await proxy.key("alice"))
    with pytest.raises(anthropic.NotFoundError):  # a refused request counts against rpm too
        await client.messages.create(model="nope", max_tokens=50, messages=USER)
    error = await refusal(client)
    assert isinstance(error, anthropic.RateLimitError)
    anthropic_shape(error, 429, "rate_limit_error")
    assert int(error.response.headers["Retry-After"]) >= 1


async def test_no_backend_is_overloaded_error(make_proxy: MakeProxy, tmp_path: Path) -> None:
    """A model whose only backend refuses connections: 503, in Anthropic's shape."""
    data = config_dict(tmp_path, ["http://127.0.0.1:9/v1"])
    proxy = await make_proxy(build_config(tmp_path, data))
    await proxy.account("alice")
    error = await refusal(claude(proxy, await proxy.key("alice")))
    anthropic_shape(error, 503, "overloaded_error")
    assert "Retry-After" in error.response.headers

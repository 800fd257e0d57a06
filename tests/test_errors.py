"""Every error the proxy itself produces: OpenAI's JSON shape, the right status, nothing internal.

Shape: ``{"error": {"message", "type", "param", "code"}}``, Content-Type application/json, and an
``x-request-id`` the admin can find in the logs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import MakeProxy, Proxy, build_config, config_dict
from tests.fake_upstream import UpstreamServer

CHAT = "/chat/completions"
HELLO = [{"role": "user", "content": "hello"}]


async def error_of(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """Check the status and the OpenAI error shape; return the inner error object."""
    assert response.status == status
    assert response.content_type == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    body = await response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    text = error["message"].lower()
    assert "traceback" not in text and "exception" not in text
    return error


# ---- 400: the body ----


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param(b"this is not json", None, id="not-json"),
        pytest.param(b'{"model": "gpt-4o", "messages": [', None, id="truncated-json"),
        pytest.param(b"", None, id="empty"),
        pytest.param(b'[{"model": "gpt-4o"}]', None, id="array"),
        pytest.param(b'"gpt-4o"', None, id="string"),
        pytest.param(b"null", None, id="null"),
        pytest.param(b'{"messages": []}', "model", id="no-model"),
        pytest.param(b'{"model": 4, "messages": []}', "model", id="model-not-a-string"),
        pytest.param(b'{"model": null, "messages": []}', "model", id="model-null"),
        pytest.param(b'{"model": "", "messages": []}', "model", id="model-empty"),
    ],
)
async def test_bad_body_is_400(
    proxy: Proxy, alice: str, http: aiohttp.ClientSession, upstream: UpstreamServer, body: bytes, param: str | None
) -> None:
    headers = {"Authorization": f"Bearer {alice}", "Content-Type": "application/json"}
    async with http.post(proxy.base_url + CHAT, data=body, headers=headers) as response:
        error = await error_of(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert upstream.state.requests == []


async def test_bad_body_with_the_sdk(proxy: Proxy, alice: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await proxy.sdk(alice).chat.completions.create(model=None, messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.param == "model"


# ---- 413: too big ----


@pytest.fixture
async def small(make_proxy: MakeProxy, tmp_path: Path, upstream: UpstreamServer) -> tuple[Proxy, str]:
    """A proxy whose bodies may be at most 0.01 MiB (10485 bytes)."""
    small = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url], max_body_mb=0.01)))
    await small.account("alice")
    return small, await small.key("alice")


def chat_body(size: int) -> bytes:
    return b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "' + b"a" * size + b'"}]}'


async def test_body_over_the_limit_is_413(
    small: tuple[Proxy, str], http: aiohttp.ClientSession, upstream: UpstreamServer
) -> None:
    proxy, key = small
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with http.post(proxy.base_url + CHAT, data=chat_body(20_000), headers=headers) as response:
        error = await error_of(response, 413)
    assert error["code"] == "request_too_large"
    assert error["message"] == "Request body is larger than the limit of 0.01 MiB."
    assert upstream.state.requests == []


async def test_chunked_body_over_the_limit_is_413(
    small: tuple[Proxy, str], http: aiohttp.ClientSession, upstream: UpstreamServer
) -> None:
    """No Content-Length to check up front: the limit holds while reading."""
    proxy, key = small

    async def chunks() -> AsyncIterator[bytes]:
        body = chat_body(20_000)
        for i in range(0, len(body), 4096):
            yield body[i : i + 4096]

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with http.post(proxy.base_url + CHAT, data=chunks(), headers=headers) as response:
        error = await error_of(response, 413)
    assert error["code"] == "request_too_large"
    assert upstream.state.requests == []


async def test_body_under_the_limit_passes(small: tuple[Proxy, str], http: aiohttp.ClientSession) -> None:
    proxy, key = small
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with http.post(proxy.base_url + CHAT, data=chat_body(8_000), headers=headers) as response:
        assert response.status == 200


async def test_413_with_the_sdk(small: tuple[Proxy, str]) -> None:
    proxy, key = small
    with pytest.raises(openai.APIStatusError) as caught:
        await proxy.sdk(key).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "a" * 20_000}]
        )
    assert caught.value.status_code == 413


# ---- 404 ----


async def test_unknown_model_is_404_model_not_found(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await proxy.sdk(alice).chat.completions.create(model="gpt-7", messages=HELLO)
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert caught.value.body == {
        "message": "The model `gpt-7` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert upstream.state.requests == []


async def test_backend_model_name_is_not_a_public_name(proxy: Proxy, alice: str) -> None:
    """Clients name models by their public name; the backend's name is not an alias."""
    with pytest.raises(openai.NotFoundError):
        await proxy.sdk(alice).chat.completions.create(model="fake-model", messages=HELLO)


@pytest.mark.parametrize("path", ["/v1/nope", "/v1/chat/completion", "/nope", "/v2/models", "/v1/audio/speech"])
async def test_unknown_path_is_404(proxy: Proxy, alice: str, http: aiohttp.ClientSession, path: str) -> None:
    async with http.get(proxy.origin + path, headers={"Authorization": f"Bearer {alice}"}) as response:
        error = await error_of(response, 404)
    assert error["type"] == "invalid_request_error"
    assert path in error["message"]


async def test_unknown_post_path_is_404(proxy: Proxy, alice: str, http: aiohttp.ClientSession) -> None:
    """The 404 names the path and says what Lumen serves (it used to say only "the API lives under /v1/")."""
    body = {"model": "gpt-4o", "input": "hi"}
    async with http.post(proxy.base_url + "/audio/speech", json=body,
                         headers={"Authorization": f"Bearer {alice}"}) as response:
        error = await error_of(response, 404)
    assert "POST /v1/audio/speech" in error["message"]
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/embeddings"):
        assert path in error["message"]


# ---- 405 ----


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/embeddings", "POST"),
        ("DELETE", "/v1/completions", "POST"),
        ("POST", "/v1/models", "GET"),
    ],
)
async def test_wrong_method_is_405(
    proxy: Proxy, alice: str, http: aiohttp.ClientSession, method: str, path: str, allowed: str
) -> None:
    async with http.request(method, proxy.origin + path, headers={"Authorization": f"Bearer {alice}"}) as response:
        error = await error_of(response, 405)
        assert allowed in response.headers["Allow"]  # RFC 9110: a 405 says what is allowed
    assert error["code"] == "method_not_allowed"
    assert method in error["message"]


# ---- 401 ----


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="no-header"),
        pytest.param("Bearer", id="empty-bearer"),
        pytest.param("Basic YWxpY2U6c2VjcmV0", id="basic"),
        pytest.param("Bearer sk_not_a_real_key_0123456789abcdef", id="unknown-key"),
    ],
)
async def test_missing_or_wrong_key_is_401(
    proxy: Proxy, http: aiohttp.ClientSession, upstream: UpstreamServer, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    async with http.post(proxy.base_url + CHAT, json={"model": "gpt-4o", "messages": HELLO},
                         headers=headers) as response:
        error = await error_of(response, 401)
    assert error["code"] == "invalid_api_key"
    assert "sk_not_a_real_key_0123456789abcdef" not in error["message"]  # never echo a whole key
    assert upstream.state.requests == []


async def test_wrong_key_with_the_sdk(proxy: Proxy, alice: str) -> None:
    client = proxy.sdk(alice[:-4] + "XXXX")
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await client.models.list()


async def test_401_comes_before_the_body_is_judged(proxy: Proxy, http: aiohttp.ClientSession) -> None:
    """Without a key nobody learns anything, not even that the body is bad."""
    async with http.post(proxy.base_url + CHAT, data=b"not json") as response:
        await error_of(response, 401)
    async with http.get(proxy.base_url + "/models/gpt-7") as response:
        await error_of(response, 401)


# ---- the server survives ----


async def test_errors_do_not_disturb_the_next_request(proxy: Proxy, alice: str, http: aiohttp.ClientSession) -> None:
    headers = {"Authorization": f"Bearer {alice}", "Content-Type": "application/json"}
    for body in (b"{", b"[]", b'{"model": 1}'):
        async with http.post(proxy.base_url + CHAT, data=body, headers=headers) as response:
            assert response.status == 400
    completion = await proxy.sdk(alice).chat.completions.create(model="gpt-4o", messages=HELLO)
    assert completion.choices[0].message.content

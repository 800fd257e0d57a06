"""CORS: browser-based chat tools call the API directly, as they can call OpenAI's."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from lumen_proxy.config import ConfigError
from tests.conftest import MakeProxy, Proxy, auth, build_config, config_dict
from tests.fake_upstream import UpstreamServer

ORIGIN = "https://chat.example.org"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


async def test_preflight_is_answered_for_any_path_of_the_api(proxy: Proxy, http: aiohttp.ClientSession) -> None:
    headers = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    async with http.options(proxy.base_url + "/chat/completions", headers=headers) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-stainless-os"


async def test_responses_to_a_browser_carry_the_cors_headers(
    proxy: Proxy, alice: str, http: aiohttp.ClientSession
) -> None:
    headers = {**auth(alice), "Origin": ORIGIN}
    async with http.post(proxy.base_url + "/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "x-request-id" in resp.headers["Access-Control-Expose-Headers"]
    async with http.post(proxy.base_url + "/chat/completions", json={**CHAT, "stream": True}, headers=headers) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == "*"  # streams too
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    async with http.get(proxy.base_url + "/models", headers={"Origin": ORIGIN}) as resp:
        assert resp.status == 401
        assert resp.headers["Access-Control-Allow-Origin"] == "*"  # so the page can read the error


async def test_clients_without_an_origin_get_no_cors_headers(
    proxy: Proxy, alice: str, http: aiohttp.ClientSession
) -> None:
    async with http.post(proxy.base_url + "/chat/completions", json=CHAT, headers=auth(alice)) as resp:
        assert resp.status == 200
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_a_list_of_origins_allows_only_those(
    tmp_path: Path, make_proxy: MakeProxy, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    config = config_dict(tmp_path, [upstream.base_url], cors_origins=[ORIGIN])
    proxy = await make_proxy(build_config(tmp_path, config))
    preflight = {"Access-Control-Request-Method": "POST"}
    async with http.options(proxy.base_url + "/chat/completions", headers={**preflight, "Origin": ORIGIN}) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert resp.headers["Vary"] == "Origin"
    async with http.options(proxy.base_url + "/chat/completions",
                            headers={**preflight, "Origin": "https://evil.example"}) as resp:
        assert resp.status == 405  # not ours to answer: the browser blocks the call
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_an_empty_list_turns_cors_off(
    tmp_path: Path, make_proxy: MakeProxy, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url], cors_origins=[])))
    headers = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    async with http.options(proxy.base_url + "/chat/completions", headers=headers) as resp:
        assert resp.status == 405
        assert "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize(("bad", "problem"), [
    ("*", r"cors_origins: must be a list of origins"),
    (["chat.example.org"], r"cors_origins\[0\]: must be \"\*\" or start with http:// or https://"),
])
def test_cors_origins_must_be_a_list_of_origins(tmp_path: Path, bad: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        build_config(tmp_path, config_dict(tmp_path, ["http://127.0.0.1:1/v1"], cors_origins=bad))

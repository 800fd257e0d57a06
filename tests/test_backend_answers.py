"""What a backend answers is bounded and decoded before it reaches a client, or it is a 502, unbilled.

A non-stream answer is read whole (its usage is at the end), so it has a size limit (max_response_mb);
a body compressed although Lumen asked for identity is decoded (gzip, deflate) or refused; a redirect
is never relayed (it would arrive without its Location, and was billed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import MakeProxy, Proxy, auth, build_config, config_dict, query
from tests.fake_upstream import UpstreamServer

USER = [{"role": "user", "content": "one two three"}]


async def ask(proxy: Proxy, key: str, **extra: Any) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as session, session.post(
            proxy.base_url + "/chat/completions", json={"model": "gpt-4o", "messages": USER, **extra},
            headers=auth(key)) as response:
        return response.status, await response.read(), response.headers["x-request-id"]


async def row(proxy: Proxy, request_id: str) -> Any:
    await proxy.flush()
    [found] = query(proxy.rt.config.database, "SELECT status, cost FROM usage WHERE request_id = ?", request_id)
    return tuple(found)


async def test_an_answer_over_the_size_limit_is_a_502_unbilled(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url], max_response_mb=1)))
    await proxy.account("alice")
    key = await proxy.key("alice")
    huge = orjson.dumps({"choices": [{"message": {"content": "x" * (2 * 1024 * 1024)}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    upstream.state.behavior.canned = (200, {"Content-Type": "application/json"}, huge)
    status, body, request_id = await ask(proxy, key)
    assert status == 502 and orjson.loads(body)["error"]["code"] == "bad_gateway"
    assert await row(proxy, request_id) == (502, 0)
    upstream.state.behavior.force_gzip = True  # small on the wire, 2 MB once decoded: still over
    status, _, request_id = await ask(proxy, key)
    assert status == 502 and await row(proxy, request_id) == (502, 0)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_gzipped_answer_is_decoded_and_billed(
        proxy: Proxy, alice: str, upstream: UpstreamServer, stream: bool) -> None:
    upstream.state.behavior.force_gzip = True
    status, body, request_id = await ask(proxy, alice, stream=stream)
    assert status == 200
    if stream:
        assert body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n")
    else:
        assert orjson.loads(body)["usage"]["completion_tokens"] > 0
    assert (await row(proxy, request_id))[1] > 0
    assert upstream.state.last.headers["Accept-Encoding"] == "identity"


async def test_an_encoding_lumen_cannot_decode_is_a_502(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    upstream.state.behavior.canned = (200, {"Content-Type": "application/json", "Content-Encoding": "br"},
                                      b"\x8b\x02\x80{}\x03")
    status, body, request_id = await ask(proxy, alice)
    assert status == 502 and b"\x8b" not in body
    assert await row(proxy, request_id) == (502, 0)


async def test_corrupt_gzip_is_a_502(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    upstream.state.behavior.canned = (200, {"Content-Type": "application/json", "Content-Encoding": "gzip"},
                                      b"\x1f\x8b\x08\x00garbage-not-deflate")
    status, _, request_id = await ask(proxy, alice)
    assert status == 502 and await row(proxy, request_id) == (502, 0)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_from_a_backend_is_a_502_unbilled(
        proxy: Proxy, alice: str, upstream: UpstreamServer, status: int) -> None:
    upstream.state.behavior.canned = (status, {"Location": "https://elsewhere.example/v1/chat/completions"},
                                      orjson.dumps({"usage": {"prompt_tokens": 5, "completion_tokens": 5}}))
    answered, body, request_id = await ask(proxy, alice)
    assert answered == 502 and b"elsewhere" not in body
    assert await row(proxy, request_id) == (502, 0)
    assert len(upstream.state.requests) == 1  # not followed

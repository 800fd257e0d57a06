"""Refuse before paying: what a key alone decides is decided before its body is read or parsed.

A key with no coins, over its rate limit or at its concurrency limit is answered while the body is
still on the wire; bodies are read within a size limit and a deadline, and a body packed with more
JSON values than its size justifies is refused before it is parsed. Client strings (model names) never
become state: metrics labels and daily aggregates only ever hold configured names.
"""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import (
    LumenProcess,
    MakeProxy,
    Proxy,
    auth,
    build_config,
    cli,
    config_dict,
    eventually,
    query,
    write_config,
)
from tests.fake_upstream import UpstreamServer

USER = [{"role": "user", "content": "hi"}]


async def headers_only(port: int, key: str, length: int, path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    """Send a POST's headers announcing ``length`` bytes and no body; return the status and body we get."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status = int(head.split(b" ", 2)[1])
        size = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")))
        return status, await asyncio.wait_for(reader.readexactly(size), 5)
    finally:
        writer.close()


async def test_a_key_without_coins_is_refused_before_its_body_is_read(proxy: Proxy, upstream: UpstreamServer) -> None:
    await proxy.account("broke", coins=0, models=["gpt-4o"])  # no free model among its models
    key = await proxy.key("broke")
    status, body = await headers_only(proxy.server.port, key, 7 * 1024 * 1024)  # the body never comes
    assert status == 402 and orjson.loads(body)["error"]["code"] == "insufficient_quota"


async def test_a_key_without_coins_may_still_use_a_free_model(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    data = config_dict(tmp_path, [upstream.base_url])
    data["models"][2]["price"] = {"prompt": 0, "completion": 0}  # echo costs nothing
    proxy = await make_proxy(build_config(tmp_path, data))
    await proxy.account("broke", coins=0)
    key = await proxy.key("broke")
    for model, status in (("echo", 200), ("gpt-4o", 402)):
        async with http.post(proxy.base_url + "/chat/completions", json={"model": model, "messages": USER},
                             headers=auth(key)) as response:
            assert response.status == status


async def test_a_key_over_its_rate_limit_is_refused_before_its_body_is_read(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url], limits={"rpm": 1})))
    await proxy.account("alice")
    key = await proxy.key("alice")
    async with http.post(proxy.base_url + "/chat/completions", json={"model": "gpt-4o", "messages": USER},
                         headers=auth(key)) as response:
        assert response.status == 200
    status, body = await headers_only(proxy.server.port, key, 7 * 1024 * 1024)
    assert status == 429 and orjson.loads(body)["error"]["type"] == "rate_limit_exceeded"


async def test_a_key_at_its_concurrency_limit_is_refused_before_its_body_is_read(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url],
                                                                limits={"concurrency": 1})))
    await proxy.account("alice")
    key = await proxy.key("alice")
    upstream.state.behavior.gate = asyncio.Event()
    first = asyncio.ensure_future(http.post(proxy.base_url + "/chat/completions", headers=auth(key),
                                            json={"model": "gpt-4o", "messages": USER}))
    assert await eventually(lambda: arrived(upstream))
    status, _ = await headers_only(proxy.server.port, key, 7 * 1024 * 1024)
    assert status == 429
    upstream.state.behavior.gate.set()
    async with await first as response:
        assert response.status == 200


async def arrived(upstream: UpstreamServer) -> bool:
    return bool(upstream.state.requests)


async def test_a_body_that_does_not_arrive_in_time_is_a_408(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    data = config_dict(tmp_path, [upstream.base_url], timeouts={"request_body": 0.3})
    proxy = await make_proxy(build_config(tmp_path, data))
    await proxy.account("alice")
    key = await proxy.key("alice")
    started = time.monotonic()
    status, body = await headers_only(proxy.server.port, key, 1000)  # announces 1000 bytes, sends none
    assert status == 408 and orjson.loads(body)["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < 3
    await proxy.flush()
    assert [tuple(r) for r in query(proxy.rt.config.database, "SELECT status, cost FROM usage")] == [(408, 0)]


async def test_a_body_with_more_json_values_than_its_size_justifies_is_refused_unparsed(
        proxy: Proxy, alice: str, http: aiohttp.ClientSession) -> None:
    dense = b'{"model": "gpt-4o", "messages": [' + b"{}," * 400_000 + b'{"role": "user", "content": "hi"}]}'
    async with http.post(proxy.base_url + "/chat/completions", data=io.BytesIO(dense),
                         headers={**auth(alice), "Content-Type": "application/json"}) as response:
        assert response.status == 400
        assert "too many values" in (await response.json())["error"]["message"]
    # What a context window holds is far from the limit: 1.1 MB of CSV (~400,000 tokens), 200,000 commas.
    text = "id,name,score,city,country,time\n1,ab,12,Berlin,DE,17:00\n" * 20_000
    long = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": text}], "max_tokens": 1})
    async with http.post(proxy.base_url + "/chat/completions", data=io.BytesIO(long),
                         headers={**auth(alice), "Content-Type": "application/json"}) as response:
        assert response.status == 200


async def test_the_body_limit_is_per_model(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path,
                                           http: aiohttp.ClientSession) -> None:
    data = config_dict(tmp_path, [upstream.base_url], max_body_mb=1)
    data["models"][0]["max_body_mb"] = 4  # gpt-4o takes images
    proxy = await make_proxy(build_config(tmp_path, data))
    await proxy.account("vision", coins=1000)
    await proxy.account("text", coins=1000, models=["echo", "text-embedding-3-small"])
    image = "data:image/png;base64," + "A" * (2 * 1024 * 1024)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}]}], "max_tokens": 1}
    vision = {**auth(await proxy.key("vision")), "Content-Type": "application/json"}
    async with http.post(proxy.base_url + "/chat/completions", data=io.BytesIO(orjson.dumps(body)),
                         headers=vision) as response:
        assert response.status == 200
    text_key = await proxy.key("text")
    status, _ = await headers_only(proxy.server.port, text_key, 2 * 1024 * 1024)  # refused unread
    assert status == 413
    body["model"] = "echo"
    async with http.post(proxy.base_url + "/chat/completions", data=io.BytesIO(orjson.dumps(body)),
                         headers={**auth(text_key), "Content-Type": "application/json"}) as response:
        assert response.status == 413


async def test_invented_model_names_never_become_labels_or_report_lines(
        proxy: Proxy, alice: str, http: aiohttp.ClientSession, config_file: Path) -> None:
    for i in range(50):
        async with http.post(proxy.base_url + "/chat/completions", headers=auth(alice),
                             json={"model": f"invented-{i}", "messages": USER}) as response:
            assert response.status == 404
    async with http.get(proxy.origin + "/metrics") as response:
        metrics = await response.text()
    assert "invented" not in metrics
    await proxy.flush()
    assert query(proxy.rt.config.database, "SELECT DISTINCT model FROM usage_daily")[0][0] == "-"
    assert len(query(proxy.rt.config.database, "SELECT DISTINCT model FROM usage")) == 1
    done = await asyncio.to_thread(cli, "usage", "--by", "model", "--json", config=config_file)
    assert done.returncode == 0 and [row["model"] for row in orjson.loads(done.stdout)] == ["-"]


# -- memory, through the real process ----------------------------------------------------------------------------
def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024


@pytest.mark.parametrize("unit", [b"{},", b'"ab",', b"[],"])
async def test_a_body_at_the_size_limit_costs_a_small_multiple_of_its_size(
        lumen_process: Any, tmp_path: Path, unit: bytes) -> None:
    """Before: a 31 MiB body of {},{},... took +1,005 MiB of RSS from a key with 0 coins."""
    data = {"database": "lumen.db", "models": [{"name": "m", "backends": [{"url": "builtin:echo"}]}]}
    server: LumenProcess = lumen_process(write_config(tmp_path, data))
    await asyncio.to_thread(cli, "accounts", "add", "alice", "--coins", "10", config=server.config)
    key = (await asyncio.to_thread(cli, "keys", "create", "alice", config=server.config)).stdout.strip()
    size = 8 * 1024 * 1024 - 100
    body = b'{"model": "m", "messages": [' + unit * ((size - 40) // len(unit)) + b'1]}'
    before = peak_rss(server.process.pid)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(server.base_url + "/chat/completions", data=io.BytesIO(body),
                                    headers={**auth(key), "Content-Type": "application/json"}) as response:
                assert response.status == 400
    grown = peak_rss(server.process.pid) - before
    assert grown < 4 * len(body), f"+{grown / 2**20:.0f} MiB for a {len(body) / 2**20:.0f} MiB body"


async def test_raising_max_body_mb_by_reload_applies_fully(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Before: after a reload to 4 MiB, a 1.5 MB body still got 413 "over the limit of 4 MiB" (aiohttp's own cap)."""
    proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url], max_body_mb=1)))
    await proxy.account("alice")
    key = await proxy.key("alice")
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 1_500_000}],
                         "max_tokens": 1})
    headers = {**auth(key), "Content-Type": "application/json"}
    async with http.post(proxy.base_url + "/chat/completions", data=io.BytesIO(body), headers=headers) as response:
        assert response.status == 413 and "1 MiB" in (await response.json())["error"]["message"]
    proxy.rt.apply(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url], max_body_mb=4)))
    async with http.post(proxy.base_url + "/chat/completions", data=io.BytesIO(body), headers=headers) as response:
        assert response.status == 200
    proxy.rt.apply(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url], max_body_mb=0.5)))
    async with http.post(proxy.base_url + "/chat/completions", data=io.BytesIO(body), headers=headers) as response:
        assert response.status == 413 and "0.5 MiB" in (await response.json())["error"]["message"]

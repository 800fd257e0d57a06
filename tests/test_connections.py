"""Client connections: slow heads are cut, idle sockets make room, and only busy ones can fill the cap.

The app runs behind :class:`GuardedSite` as ``lumen-proxy serve`` runs it, in-process (the guard, not
the process, is the point here; tests/test_process.py starts the real server).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lumen_proxy.app import create_app
from lumen_proxy.connections import GuardedSite, site_for
from lumen_proxy.runtime import RUNTIME
from tests.conftest import auth, build_config, config_dict, eventually, free_port, write_config
from tests.fake_upstream import UpstreamServer

Served = tuple[int, web.AppRunner, GuardedSite]


@pytest.fixture
async def serve(tmp_path: Path, upstream: UpstreamServer) -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def start(max_connections: int = 1000, **timeouts: float) -> Served:
        data = config_dict(tmp_path, [upstream.base_url], max_connections=max_connections, timeouts=timeouts)
        config = build_config(tmp_path, data)
        runner = web.AppRunner(create_app(config), keepalive_timeout=config.timeouts.keepalive,
                               handler_cancellation=True, access_log=None)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        site = site_for(runner, config, "127.0.0.1", port)
        await site.start()
        return port, runner, site

    yield start
    for runner in runners:
        await runner.cleanup()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> tuple[bytes, float]:
    """What the server still sent, and when it closed the connection."""
    started = time.monotonic()
    rest = await asyncio.wait_for(reader.read(), seconds)  # reads to EOF
    return rest, time.monotonic() - started


async def test_a_request_head_that_never_ends_is_cut(serve: Callable[..., Any]) -> None:
    port, _, _ = await serve(request_headers=0.3, keepalive=30)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk_")
    rest, after = await closed_within(reader, 3)
    assert rest == b"" and after < 2  # closed, quoting nothing back
    writer.close()


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout(serve: Callable[..., Any]) -> None:
    port, _, _ = await serve(keepalive=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await closed_within(reader, 3)
    writer.close()


async def test_idle_and_slow_sockets_make_room_for_a_real_client(serve: Callable[..., Any]) -> None:
    port, _, site = await serve(max_connections=4, request_headers=30, keepalive=30)
    hogs = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    for _, writer in hogs[:2]:
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")  # slowloris: half a head, then nothing
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
    assert site.guard is not None and site.guard.evicted >= 1 and len(site.guard.open) <= 4
    for _, writer in hogs:
        writer.close()


async def two_arrived(upstream: UpstreamServer) -> bool:
    return len(upstream.state.requests) >= 2


async def test_only_when_every_connection_is_busy_is_a_new_one_refused(
        serve: Callable[..., Any], upstream: UpstreamServer) -> None:
    port, runner, site = await serve(max_connections=2)
    rt = runner.app[RUNTIME]
    async with rt.usage.lock:
        await rt.store.add_account("alice", 10**9)
        key, _ = await rt.store.create_key("alice")
    await rt.view.reload()
    upstream.state.behavior.gate = asyncio.Event()
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        busy = [asyncio.ensure_future(session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                                                   headers=auth(key))) for _ in range(2)]
        assert await eventually(lambda: two_arrived(upstream))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await asyncio.wait_for(reader.read(), 3)
        assert answer.startswith(b"HTTP/1.1 503") and b"Too many open connections" in answer
        writer.close()
        assert site.guard is not None and site.guard.refused == 1
        upstream.state.behavior.gate.set()
        for pending in busy:
            async with await pending as response:
                assert response.status == 200


async def test_the_real_server_cuts_a_slow_head_and_keeps_serving(lumen_process: Any, tmp_path: Path) -> None:
    data = {"database": "lumen.db", "timeouts": {"request_headers": 0.5}, "max_connections": 8,
            "models": [{"name": "echo", "backends": [{"url": "builtin:echo"}]}]}
    server = lumen_process(write_config(tmp_path, data))
    slow = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(8)]
    for _, writer in slow:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and nothing more
    async with aiohttp.ClientSession() as session, session.get(server.origin + "/healthz") as response:
        assert response.status == 200  # the cap is full of slow heads: the longest idle made room
    for reader, writer in slow:
        rest, after = await closed_within(reader, 3)
        assert rest == b""
        writer.close()

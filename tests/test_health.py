"""``GET /healthz``: no key, per-model backend health, 200 only while every model has a backend up
(and usage rows can be written: see test_storage.py for ``usage_log`` while they cannot).

Passive health comes from real traffic (the circuit breaker), active health from a ``GET /models``
probe every ``health_check_interval`` seconds. Most tests run the app in-process; the last one flips
the real server process, since that is what a load balancer or systemd watchdog would poll.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import MakeProxy, Proxy, build_config, config_dict, eventually, write_config
from tests.fake_upstream import UpstreamServer

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]

# conftest's lumen_process never closes the parent's copies of the child's log files (see test_process.py).


async def healthz(origin: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(origin + "/healthz") as response:
        return response.status, await response.json()


def status_is(origin: str, wanted: int) -> Any:
    async def check() -> bool:
        return (await healthz(origin))[0] == wanted

    return check


class Clock:
    """A monotonic clock the test moves by hand (the breaker's cooldown without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_healthz_needs_no_key_and_reports_every_model(proxy: Proxy, upstream: UpstreamServer) -> None:
    status, body = await healthz(proxy.origin)

    assert status == 200
    assert body["status"] == "ok"
    assert body["usage_log"] == {"ok": True, "failing_for_s": 0.0, "rows_waiting": 0, "refusing": False}
    assert body["models"] == {
        "gpt-4o": {"up": True, "backends": {upstream.base_url: "up"}},
        "text-embedding-3-small": {"up": True, "backends": {upstream.base_url: "up"}},
        "echo": {"up": True, "backends": {"builtin:echo": "up"}},
    }


async def test_failing_requests_open_the_breaker_and_healthz_turns_503_then_recovers(
    make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path
) -> None:
    data = config_dict(tmp_path, [upstream.base_url], circuit_breaker={"failures": 3, "cooldown": 30})
    clock = Clock()
    proxy = await make_proxy(build_config(tmp_path, data), monotonic=clock)
    await proxy.account("alice")
    sdk = proxy.sdk(await proxy.key("alice"))
    upstream.state.behavior.fail_status = 503  # the backend itself says it is broken
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    status, body = await healthz(proxy.origin)
    assert status == 503
    assert body["status"] == "degraded"
    assert body["models"]["gpt-4o"] == {"up": False, "backends": {upstream.base_url: "down"}}
    assert body["models"]["echo"]["up"] and body["models"]["text-embedding-3-small"]["up"]

    upstream.state.behavior.fail_status = None
    clock.now += 31  # cooldown over: the next request probes the backend and closes the breaker
    await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert (await healthz(proxy.origin))[0] == 200


async def test_a_dead_backend_is_skipped_before_anyone_hits_it_and_comes_back(
    make_proxy: MakeProxy, upstream: UpstreamServer, upstream2: UpstreamServer, tmp_path: Path
) -> None:
    data = config_dict(tmp_path, [upstream.base_url, upstream2.base_url], health_check_interval=0.2)
    proxy = await make_proxy(build_config(tmp_path, data))
    await proxy.account("alice")
    sdk = proxy.sdk(await proxy.key("alice"))
    await upstream.stop()

    async def marked_down() -> bool:
        _, body = await healthz(proxy.origin)
        return body["models"]["gpt-4o"]["backends"][upstream.base_url] == "down"

    assert await eventually(marked_down, within=5)
    status, body = await healthz(proxy.origin)
    assert status == 200  # every model still has a backend up
    assert body["models"]["gpt-4o"] == {"up": True, "backends": {upstream.base_url: "down",
                                                                 upstream2.base_url: "up"}}
    replies = [await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES) for _ in range(4)]
    assert all(r.choices[0].message.content.startswith("Echo from up2") for r in replies)
    assert proxy.rt.pool.state(proxy.rt.config.models[0].backends[0]).failures == 3  # probes only, no user

    await upstream.start()

    async def back() -> bool:
        _, body = await healthz(proxy.origin)
        return body["models"]["gpt-4o"]["backends"][upstream.base_url] == "up"

    assert await eventually(back, within=5)
    replies = [await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES) for _ in range(2)]
    assert {r.choices[0].message.content.split(" [")[0] for r in replies} == {"Echo from up1", "Echo from up2"}


async def test_active_checks_flip_the_real_server_without_traffic(
    lumen_process: Any, upstream: UpstreamServer, tmp_path: Path
) -> None:
    path = write_config(tmp_path, config_dict(tmp_path, [upstream.base_url], health_check_interval=0.3))
    proc = lumen_process(path)
    status, body = await healthz(proc.origin)
    assert (status, body["models"]["gpt-4o"]["up"]) == (200, True)

    await upstream.stop()
    stopped = time.monotonic()
    assert await eventually(status_is(proc.origin, 503), within=5)
    assert time.monotonic() - stopped < 3
    status, body = await healthz(proc.origin)
    assert body["models"]["gpt-4o"] == {"up": False, "backends": {upstream.base_url: "down"}}
    assert body["models"]["echo"]["up"]

    await upstream.start()  # the same port
    assert await eventually(status_is(proc.origin, 200), within=5)
    assert [r.path for r in upstream.state.requests if r.method == "POST"] == []  # no user traffic at all

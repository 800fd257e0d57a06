"""Shared fixtures: a fake upstream on a real port, config builders, and the proxy in-process.

``proxy`` is the real app (``create_app``) on a real 127.0.0.1 port, so the real ``openai`` SDK can
talk to it; the database is a fresh file per test. Tests that are about processes (signals, the
CLI, startup) use ``lumen_process`` / ``run_cli`` instead.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from lumen_proxy.app import create_app
from lumen_proxy.config import Config, parse_config
from lumen_proxy.runtime import RUNTIME, Runtime
from lumen_proxy.store import AccountRow
from tests.fake_upstream import UpstreamServer, make_upstream

UPSTREAM_KEY = "upstream-secret-key"


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamServer]:
    server = UpstreamServer(make_upstream("up1"))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def upstream2() -> AsyncIterator[UpstreamServer]:
    server = UpstreamServer(make_upstream("up2"))
    await server.start()
    yield server
    await server.stop()


def config_dict(tmp_path: Path, backend_urls: list[str], **top: Any) -> dict[str, Any]:
    """The usual test config: gpt-4o on the given backends, echo built in, an embedding model."""
    backends = [{"url": url, "api_key": UPSTREAM_KEY, "model": "fake-model"} for url in backend_urls]
    data: dict[str, Any] = {
        "database": str(tmp_path / "lumen.db"),
        "models": [
            {"name": "gpt-4o", "backends": backends, "price": {"prompt": 2.5, "completion": 10},
             "max_output_tokens": 1000},
            {"name": "text-embedding-3-small", "backends": [{**b, "model": "fake-embed"} for b in backends],
             "price": {"prompt": 0.02}},
            {"name": "echo", "backends": [{"url": "builtin:echo"}], "price": {"prompt": 1, "completion": 1}},
        ],
        "circuit_breaker": {"failures": 3, "cooldown": 30},
    }
    data.update(top)
    return data


def build_config(tmp_path: Path, data: dict[str, Any]) -> Config:
    return parse_config(data, str(tmp_path / "lumen.yaml"), tmp_path)


@dataclass
class Proxy:
    server: TestServer
    app: web.Application
    clients: list[openai.AsyncOpenAI]

    @property
    def rt(self) -> Runtime:
        return self.app[RUNTIME]

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def base_url(self) -> str:
        return self.origin + "/v1"

    async def account(self, name: str, coins: float = 1000, models: list[str] | None = None) -> AccountRow:
        async with self.rt.usage.lock:  # the server's own connection: never inside a usage batch
            row = await self.rt.store.add_account(name, int(coins * 1_000_000), models)
        await self.rt.view.reload()
        return row

    async def key(self, account: str, expires_at: float | None = None) -> str:
        async with self.rt.usage.lock:
            key, _ = await self.rt.store.create_key(account, "test", expires_at)
        await self.rt.view.reload()
        return key

    def sdk(self, key: str, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        client = openai.AsyncOpenAI(api_key=key, base_url=self.base_url, **kwargs)
        self.clients.append(client)
        return client

    async def flush(self) -> None:
        await self.rt.usage.flush()


MakeProxy = Callable[..., Awaitable[Proxy]]  # (config, *, port=None, **create_app keywords)


@pytest.fixture
async def make_proxy() -> AsyncIterator[MakeProxy]:
    made: list[Proxy] = []

    async def make(config: Config, *, port: int | None = None, **app_kwargs: Any) -> Proxy:
        """``port``: a port chosen beforehand (a sign-in redirect URI must name it before the proxy starts)."""
        app = create_app(config, **app_kwargs)
        server = TestServer(app, host="127.0.0.1", port=port)
        await server.start_server()
        made.append(Proxy(server, app, []))
        return made[-1]

    yield make
    for proxy in reversed(made):
        for client in proxy.clients:
            await client.close()
        await proxy.server.close()


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> Proxy:
    return await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url])))


async def priced_proxy(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path,
                       price: dict[str, float]) -> Proxy:
    """The usual test proxy with gpt-4o at ``price`` (coins per million: prompt, completion, cached_prompt),
    and the account alice (1000 coins)."""
    data = config_dict(tmp_path, [upstream.base_url])
    data["models"][0]["price"] = price
    proxy = await make_proxy(build_config(tmp_path, data))
    await proxy.account("alice")
    return proxy


@pytest.fixture
async def alice(proxy: Proxy) -> str:
    """A key of the account 'alice' (1000 coins, all models)."""
    await proxy.account("alice")
    return await proxy.key("alice")


# -- the real process ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, data: dict[str, Any], name: str = "lumen.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(*args: str, config: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``lumen-proxy`` as a user would (``python -m lumen_proxy`` = the console script)."""
    argv = [sys.executable, "-m", "lumen_proxy"]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@dataclass
class LumenProcess:
    process: subprocess.Popen[str]
    port: int
    config: Path
    log_path: Path

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.origin + "/v1"

    def stderr_text(self) -> str:
        return self.log_path.read_text()


def wait_listening(port: int, process: subprocess.Popen[str], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"lumen-proxy exited early with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"lumen-proxy did not listen on {port}")


@pytest.fixture
def lumen_process(tmp_path: Path) -> Iterator[Callable[..., LumenProcess]]:
    """Start ``lumen-proxy serve`` on a config file; the process is killed at the end if still alive."""
    started: list[LumenProcess] = []

    def start(config: Path, *, env: dict[str, str] | None = None, wait: bool = True) -> LumenProcess:
        port = free_port()
        log_path = tmp_path / f"lumen-{len(started)}.log"
        out_path = tmp_path / f"lumen-{len(started)}.out"
        with out_path.open("w") as out, log_path.open("w") as err:  # the child keeps its own copies
            process = subprocess.Popen(
                [sys.executable, "-m", "lumen_proxy", "serve", "--config", str(config), "--port", str(port)],
                stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})},
            )
        proc = LumenProcess(process, port, config, log_path)
        started.append(proc)
        if wait:
            wait_listening(port, process)
        return proc

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait()


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(step)
    return False


@pytest.fixture
def serve_config(tmp_path: Path) -> Path:
    """A valid YAML config file with a temporary database and the built-in echo model."""
    data = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "database": "lumen.db",
        "shutdown_grace": 10,
        "models": [{"name": "echo", "backends": [{"url": "builtin:echo"}]}],
    }
    return write_config(tmp_path, data)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client, for tests where the bytes on the wire are the point."""
    async with aiohttp.ClientSession() as session:
        yield session


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def config_file(tmp_path: Path, upstream: UpstreamServer) -> Path:
    """The same config the ``proxy`` fixture runs, as the file the admin CLI reads."""
    return write_config(tmp_path, config_dict(tmp_path, [upstream.base_url]))


async def admin(config_file: Path, *args: str) -> str:
    """Run ``lumen-proxy`` beside the in-process server (in a thread, so the server keeps serving)."""
    done = await asyncio.to_thread(cli, *args, config=config_file)
    assert done.returncode == 0, done.stderr
    return done.stdout


def query(database: Path, sql: str, *params: Any) -> list[sqlite3.Row]:
    """Read through a connection of our own, as an admin's sqlite3 shell would."""
    conn = sqlite3.connect(database)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute(sql, params).fetchall())
    finally:
        conn.close()


# -- the browser (tests/browser.py) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One headless Chromium per test module (Debian's, through its chromedriver)."""
    from tests.browser import chrome

    with chrome() as driver:
        yield driver


@pytest.fixture
async def browser(chromium: Any) -> AsyncIterator[Any]:
    """The module's Chromium, reset (no cookies, light, wide) before and after each test: a blank page
    before the test's proxy closes, so no poll or fetch of a portal page outlives it."""
    from tests.browser import Browser

    b = Browser(chromium)
    await b.reset()
    yield b
    await b.reset()

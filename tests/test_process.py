"""The server as a process: graceful stop on SIGTERM/SIGINT, reload on SIGHUP, one server per
database, and the per-request JSON log on stdout.

Everything here runs the real ``python -m lumen_proxy serve`` and talks to it over TCP; accounts
and keys are made with the CLI, as an admin would. The fake upstream runs in the test's event loop,
so the test never blocks that loop while the server is streaming from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import signal
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from lumen_proxy import billing
from lumen_proxy.config import Price, load_config
from tests.conftest import LumenProcess, Proxy, cli, config_dict, eventually, free_port, write_config
from tests.fake_upstream import UpstreamServer, count_prompt_tokens, split_pieces

SLOW_REPLY = " ".join(f"word{i}" for i in range(16))  # 16 pieces: ~2 s at 0.1 s between events
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a long story"}]


# -- helpers -----------------------------------------------------------------------------------------
def make_key(config: Path, account: str = "alice", coins: str = "100") -> str:
    added = cli("accounts", "add", account, "--coins", coins, config=config)
    assert added.returncode == 0, added.stderr
    created = cli("keys", "create", account, config=config)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


async def open_stream(session: aiohttp.ClientSession, proc: LumenProcess, key: str) -> aiohttp.ClientResponse:
    """POST a streaming gpt-4o chat request; returns once the response headers are in."""
    response = await session.post(
        proc.base_url + "/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status == 200, await response.text()
    return response


async def read_rest(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """Everything the stream still sends, and whether it ended cleanly (False: cut off)."""
    data = bytearray()
    try:
        async for chunk in response.content.iter_any():
            data += chunk
    except aiohttp.ClientPayloadError:
        return bytes(data), False
    return bytes(data), True


def sse_events(raw: bytes) -> list[Any]:
    return [
        "[DONE]" if block[6:] == b"[DONE]" else orjson.loads(block[6:])
        for block in raw.split(b"\n\n") if block.startswith(b"data: ")
    ]


def content_of(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


async def exit_code(proc: LumenProcess) -> int:
    """The exit status, waited for without blocking the loop the fake upstream runs in."""
    return await asyncio.to_thread(proc.process.wait, 15)


def refuses_connections(port: int) -> Callable[[], Awaitable[bool]]:
    async def refused() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED

    return refused


async def idle_connection(proc: LumenProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection kept alive after one answered request, now idle."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: lumen\r\n\r\n")
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    await reader.readexactly(int(head.split(b"content-length:")[1].split(b"\r\n")[0]))
    return reader, writer


def usage_row(database: Path, request_id: str) -> sqlite3.Row:
    with sqlite3.connect(database) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM usage WHERE request_id = ?", (request_id,)).fetchall()
    assert len(rows) == 1, f"expected one usage row for {request_id}, found {len(rows)}"
    return rows[0]


async def log_line(proc: LumenProcess, text: str) -> bool:
    async def logged() -> bool:
        return text in proc.stderr_text()

    return await eventually(logged, within=5)


def stdout_text(proc: LumenProcess) -> str:
    return proc.log_path.with_suffix(".out").read_text()


def upstream_config(tmp_path: Path, upstream: UpstreamServer, **top: Any) -> Path:
    return write_config(tmp_path, config_dict(tmp_path, [upstream.base_url], **top))


def slow(upstream: UpstreamServer, delay: float = 0.1, reply: str = SLOW_REPLY) -> None:
    upstream.state.behavior.reply = reply
    upstream.state.behavior.chunk_delay = delay


# -- graceful stop -----------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_signal_drains_the_stream_bills_it_and_exits_0(
    signum: signal.Signals, lumen_process: Any, upstream: UpstreamServer, tmp_path: Path
) -> None:
    path = upstream_config(tmp_path, upstream, shutdown_grace=10)
    key = make_key(path)
    slow(upstream)
    proc = lumen_process(path)
    async with aiohttp.ClientSession() as session, await open_stream(session, proc, key) as response:
        first = await response.content.readuntil(b"\n\n")
        proc.process.send_signal(signum)

        assert await eventually(refuses_connections(proc.port), within=3)
        assert not upstream.state.last.finished, "the stream ended before the listener closed"
        rest, clean = await read_rest(response)

    events = sse_events(first + rest)
    assert clean
    assert (first + rest).endswith(b"data: [DONE]\n\n")
    assert content_of(events) == SLOW_REPLY
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert await exit_code(proc) == 0
    row = usage_row(load_config(path).database, response.headers["x-request-id"])
    price = load_config(path).by_name["gpt-4o"].price
    prompt, completion = count_prompt_tokens(MESSAGES), len(split_pieces(SLOW_REPLY))
    assert (row["status"], row["partial"], row["estimated"]) == (200, 0, 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    assert row["cost"] == billing.cost(price, prompt, completion) > 0
    assert "stopped; usage log flushed" in proc.stderr_text()


async def test_streams_longer_than_the_grace_are_cut_at_the_grace_and_each_is_billed(
    lumen_process: Any, upstream: UpstreamServer, tmp_path: Path
) -> None:
    """The whole stop is the grace, not aiohttp's two (grace 30: ~60 s, past systemd's SIGKILL)."""
    grace = 2
    path = upstream_config(tmp_path, upstream, shutdown_grace=grace)
    key = make_key(path)
    slow(upstream, delay=0.25, reply=" ".join(f"w{i}" for i in range(60)))  # ~15 s each
    proc = lumen_process(path)
    async with aiohttp.ClientSession() as session, contextlib.AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(await open_stream(session, proc, key)) for _ in range(3)]
        for response in streams:
            await response.content.readuntil(b"\n\n")
            await response.content.readuntil(b"\n\n")  # some content delivered before the signal
        idle, idle_writer = await idle_connection(proc)
        stack.push_async_callback(idle_writer.wait_closed)
        stack.callback(idle_writer.close)
        signalled = time.monotonic()
        proc.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(idle.read(), 1) == b"", "a kept-alive idle connection stayed open"
        endings = await asyncio.gather(*(read_rest(response) for response in streams))
        assert await exit_code(proc) == 0
        stopped = time.monotonic() - signalled

    assert grace - 0.1 < stopped < grace + 1, f"stopped {stopped:.1f}s after SIGTERM with shutdown_grace={grace}"
    assert [clean for _, clean in endings] == [False] * 3
    assert all(b"[DONE]" not in rest for rest, _ in endings)
    chats = upstream.state.requests_to("/v1/chat/completions")
    assert [r.disconnected for r in chats] == [True] * 3, "a backend was not told to stop generating"
    database = load_config(path).database
    rows = [usage_row(database, response.headers["x-request-id"]) for response in streams]
    assert [(row["status"], row["partial"]) for row in rows] == [(200, 1)] * 3
    assert all(row["completion_tokens"] > 0 and row["cost"] > 0 for row in rows)
    with sqlite3.connect(database) as db:
        (balance,) = db.execute("SELECT balance FROM accounts WHERE name = 'alice'").fetchone()
    assert balance == 100 * 1_000_000 - sum(row["cost"] for row in rows)
    assert f"cut 3 requests still running after the {grace}s grace" in proc.stderr_text()


async def test_a_stop_landing_during_a_usage_commit_bills_each_request_once(
    proxy: Proxy, alice: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process, to time the stop exactly: the writer task is cancelled while SQLite commits."""
    rt = proxy.rt
    commit = rt.store.conn.commit
    committed = asyncio.Event()

    async def commit_then_lag() -> None:  # committed in SQLite; the result is still on its way back
        await commit()
        committed.set()
        await asyncio.sleep(0.2)

    monkeypatch.setattr(rt.store.conn, "commit", commit_then_lag)
    reply = await proxy.sdk(alice).chat.completions.with_raw_response.create(model="echo", messages=MESSAGES)
    await committed.wait()
    await proxy.server.close()  # the graceful stop: cancel the background tasks, then flush the log

    with sqlite3.connect(rt.config.database) as db:
        costs = db.execute("SELECT cost FROM usage WHERE request_id = ?", (reply.headers["x-request-id"],)).fetchall()
        (balance,) = db.execute("SELECT balance FROM accounts WHERE name = 'alice'").fetchone()
    assert len(costs) == 1
    assert balance == 1000 * 1_000_000 - costs[0][0]


# -- reload ------------------------------------------------------------------------------------------
async def test_sighup_applies_a_new_model_and_price_while_a_stream_continues(
    lumen_process: Any, upstream: UpstreamServer, tmp_path: Path
) -> None:
    data = config_dict(tmp_path, [upstream.base_url], shutdown_grace=10)
    path = write_config(tmp_path, data)
    key = make_key(path)
    slow(upstream, delay=0.15)
    proc = lumen_process(path)
    sdk = openai.AsyncOpenAI(api_key=key, base_url=proc.base_url, max_retries=0)
    async with aiohttp.ClientSession() as session, sdk:
        response = await open_stream(session, proc, key)
        first = await response.content.readuntil(b"\n\n")
        gpt4o = data["models"][0]
        data["models"][0] = {**gpt4o, "price": {"prompt": 5, "completion": 20}}
        data["models"].append({**gpt4o, "name": "gpt-4o-mini"})
        write_config(tmp_path, data)
        proc.process.send_signal(signal.SIGHUP)

        async def listed() -> bool:
            return "gpt-4o-mini" in [m.id async for m in sdk.models.list()]

        assert await eventually(listed, within=5)
        assert not upstream.state.requests_to("/v1/chat/completions")[0].finished
        rest, clean = await read_rest(response)
        upstream.state.behavior.chunk_delay = 0
        after = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        mini = await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    proc.process.send_signal(signal.SIGTERM)
    assert await exit_code(proc) == 0

    assert clean and (first + rest).endswith(b"data: [DONE]\n\n")
    assert content_of(sse_events(first + rest)) == SLOW_REPLY
    assert mini.choices[0].message.content == SLOW_REPLY
    assert "reloaded" in proc.stderr_text()
    old_price, new_price = Price(2_500_000, 10_000_000), Price(5_000_000, 20_000_000)
    assert load_config(path).by_name["gpt-4o"].price == new_price
    database = load_config(path).database
    streamed = usage_row(database, response.headers["x-request-id"])
    assert streamed["cost"] == billing.cost(old_price, streamed["prompt_tokens"],
                                            streamed["completion_tokens"]) > 0  # priced when it started
    assert after.usage is not None
    with sqlite3.connect(database) as db:
        costs = db.execute("SELECT model, cost FROM usage WHERE request_id != ? ORDER BY id",
                           (response.headers["x-request-id"],)).fetchall()
    tokens = (after.usage.prompt_tokens, after.usage.completion_tokens)
    assert costs == [("gpt-4o", billing.cost(new_price, *tokens)), ("gpt-4o-mini", billing.cost(old_price, *tokens))]


@pytest.mark.parametrize(("broken", "problem"), [
    ("models: [\n  - name: gpt-4o\n", "line 2, column 3: expected the node content"),
    ("database: lumen.db\nmodels: []\n", "models: must be a non-empty list of models"),
], ids=["yaml-syntax", "invalid-value"])
async def test_sighup_with_an_invalid_file_logs_one_line_and_keeps_the_old_config(
    broken: str, problem: str, lumen_process: Any, upstream: UpstreamServer, tmp_path: Path
) -> None:
    path = upstream_config(tmp_path, upstream)
    good = path.read_text()
    key = make_key(path)
    proc = lumen_process(path)
    assert await log_line(proc, "listening on")
    before = proc.stderr_text()
    path.write_text(broken)
    proc.process.send_signal(signal.SIGHUP)
    assert await log_line(proc, "reload rejected")
    await asyncio.sleep(0.2)  # anything else the reload would log

    new_lines = proc.stderr_text()[len(before):].splitlines()
    assert len(new_lines) == 1, new_lines
    assert str(path) in new_lines[0] and problem in new_lines[0]
    assert "old config" in new_lines[0] or "previous config" in new_lines[0]
    assert proc.process.poll() is None
    async with openai.AsyncOpenAI(api_key=key, base_url=proc.base_url, max_retries=0) as sdk:
        models = [m.id async for m in sdk.models.list()]
        reply = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert models == ["gpt-4o", "text-embedding-3-small", "echo"]
        assert reply.choices[0].message.content
        path.write_text(good)  # a fixed file is taken by the next reload
        proc.process.send_signal(signal.SIGHUP)
        assert await log_line(proc, "reloaded")


async def test_rate_limit_windows_survive_a_reload(lumen_process: Any, tmp_path: Path) -> None:
    data: dict[str, Any] = {
        "database": "lumen.db",
        "limits": {"rpm": 5},
        "models": [{"name": "echo", "backends": [{"url": "builtin:echo"}]}],
    }
    path = write_config(tmp_path, data)
    key = make_key(path)
    proc = lumen_process(path)
    remaining = []
    async with openai.AsyncOpenAI(api_key=key, base_url=proc.base_url, max_retries=0) as sdk:
        async def call() -> None:
            raw = await sdk.chat.completions.with_raw_response.create(model="echo", messages=MESSAGES)
            remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))

        await call()
        await call()
        data["models"].append({"name": "echo-2", "backends": [{"url": "builtin:echo"}]})
        write_config(tmp_path, data)
        proc.process.send_signal(signal.SIGHUP)
        assert await log_line(proc, "reloaded")
        await call()
        await call()
        assert "echo-2" in [m.id async for m in sdk.models.list()]

    assert remaining == [4, 3, 2, 1]


async def test_a_reload_keeps_the_command_lines_port_and_needs_no_restart(lumen_process: Any, tmp_path: Path) -> None:
    file_port = free_port()
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": file_port},
        "database": "lumen.db",
        "models": [{"name": "echo", "backends": [{"url": "builtin:echo"}]}],
    }
    path = write_config(tmp_path, data)
    key = make_key(path)
    proc = lumen_process(path)  # serve --port: another free port
    assert proc.port != file_port
    data["models"].append({"name": "echo-2", "backends": [{"url": "builtin:echo"}]})
    write_config(tmp_path, data)
    proc.process.send_signal(signal.SIGHUP)
    assert await log_line(proc, "reloaded")

    assert "restart" not in proc.stderr_text()
    async with openai.AsyncOpenAI(api_key=key, base_url=proc.base_url, max_retries=0) as sdk:
        assert [m.id async for m in sdk.models.list()] == ["echo", "echo-2"]
    assert await refuses_connections(file_port)()
    proc.process.send_signal(signal.SIGTERM)
    assert await exit_code(proc) == 0


# -- one server per database -------------------------------------------------------------------------
async def test_a_second_server_on_the_same_database_refuses_to_start(
    lumen_process: Any, serve_config: Path
) -> None:
    first = lumen_process(serve_config)
    second = cli("serve", "--port", str(free_port()), config=serve_config)

    assert second.returncode != 0
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "another lumen-proxy server" in lines[0] and "lumen.db" in lines[0]
    assert first.process.poll() is None


async def test_cli_commands_work_while_the_server_runs(lumen_process: Any, serve_config: Path) -> None:
    proc = lumen_process(serve_config)
    key = make_key(serve_config, "bob", coins="5")  # written beside the running server
    topped_up = cli("coins", "add", "bob", "2.5", config=serve_config)
    assert topped_up.returncode == 0, topped_up.stderr

    async with openai.AsyncOpenAI(api_key=key, base_url=proc.base_url, max_retries=0) as sdk:
        async def accepted() -> bool:
            try:
                await sdk.models.list()
            except openai.AuthenticationError:
                return False
            return True

        assert await eventually(accepted, within=5), "the server never picked up the CLI's new key"
        await sdk.chat.completions.create(model="echo", messages=MESSAGES)

    async def reported() -> bool:
        report = cli("usage", "bob", "--json", config=serve_config)
        return report.returncode == 0 and sum(r["requests"] for r in json.loads(report.stdout)) == 1

    assert await eventually(reported, within=5)
    shown = cli("accounts", "show", "bob", "--json", config=serve_config)
    assert shown.returncode == 0 and json.loads(shown.stdout)["coins"] == 7.5  # echo is free here
    proc.process.send_signal(signal.SIGTERM)
    assert await exit_code(proc) == 0
    assert lumen_process(serve_config).process.poll() is None  # the lock went with the first server


# -- logs --------------------------------------------------------------------------------------------
async def test_one_json_line_per_request_without_key_or_text(
    lumen_process: Any, upstream: UpstreamServer, tmp_path: Path
) -> None:
    path = upstream_config(tmp_path, upstream)
    key = make_key(path, "carol")
    secret = "zebra-giraffe-4242 is my private question"
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": secret}]
    proc = lumen_process(path)
    async with openai.AsyncOpenAI(api_key=key, base_url=proc.base_url, max_retries=0) as sdk:
        whole = await sdk.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
        stream = await sdk.chat.completions.create(model="gpt-4o", messages=messages, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        with pytest.raises(openai.NotFoundError) as missing:
            await sdk.chat.completions.create(model="no-such-model", messages=messages)
    proc.process.send_signal(signal.SIGTERM)
    assert await exit_code(proc) == 0

    out, err = stdout_text(proc), proc.stderr_text()
    lines = [json.loads(line) for line in out.splitlines()]  # stdout holds nothing but JSON lines
    assert len(lines) == 3
    by_id = {line["request_id"]: line for line in lines}
    answer = whole.parse()
    line = by_id[whole.headers["x-request-id"]]
    assert answer.usage is not None
    price = load_config(path).by_name["gpt-4o"].price
    assert line["account"] == "carol"
    assert (line["model"], line["backend"], line["status"]) == ("gpt-4o", upstream.base_url, 200)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (answer.usage.prompt_tokens,
                                                                  answer.usage.completion_tokens)
    assert line["cost"] == billing.cost(price, answer.usage.prompt_tokens, answer.usage.completion_tokens) / 1e6
    assert line["duration_ms"] > 0
    assert abs(line["time"] - time.time()) < 60
    assert [(x["model"], x["status"]) for x in lines] == [("gpt-4o", 200), ("gpt-4o", 200), ("-", 404)]  # not a label
    assert by_id[missing.value.response.headers["x-request-id"]]["cost"] == 0
    for text in (out, err):
        assert key not in text and key[:12] not in text
        assert "zebra-giraffe" not in text and "private question" not in text
        assert answer.choices[0].message.content not in text and streamed not in text
        assert "upstream-secret-key" not in text

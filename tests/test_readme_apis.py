"""README's Responses API, Agents SDK and Anthropic examples, run as written against ``lumen-proxy serve``
(and the Node Responses example, tests/node/responses.mjs).

The code blocks are read from README.md (only the key and the host change), run in a thread with the
real SDKs, and every request the backend answered is then found in the usage log by its
``X-Request-ID`` and checked against the usage the backend itself sent: billed exactly, under the
right endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import re
import sqlite3
import warnings
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest

from lumen_proxy import billing
from lumen_proxy.config import load_config
from lumen_proxy.endpoints import ENDPOINTS, Usage
from tests.conftest import config_dict, eventually, write_config
from tests.fake_upstream import RecordedRequest, UpstreamServer
from tests.nodejs import arun_node_example, ensure_node_modules
from tests.test_process import make_key

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of README's ``### <section>``, up to the next heading."""
    start = README.index(f"### {section}")
    end = README.find("\n#", start + 4)
    return re.findall(r"```python\n(.*?)```", README[start:end], re.DOTALL)


def run_block(code: str, origin: str, key: str) -> str:
    """Run one README block as a user would (the key and host swapped in); returns what it printed."""
    code = code.replace("sk_your_api_key_here", key).replace("http://127.0.0.1:8080", origin)
    out = io.StringIO()
    namespace: dict[str, Any] = {"__name__": "readme"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - README's own code
    for value in namespace.values():  # a script's clients close when it exits; these are closed here
        if isinstance(value, openai.OpenAI | anthropic.Anthropic):
            value.close()
    namespace.clear()
    with warnings.catch_warnings():  # the Agents SDK's default AsyncOpenAI outlives run_sync's loop
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    return out.getvalue()


def reported(record: RecordedRequest) -> Usage | None:
    """The usage the backend sent for ``record``, read from its own bytes, as its API defines it."""
    endpoint = ENDPOINTS[record.path]
    sent = bytes(record.sent)
    if not record.body.get("stream"):
        return endpoint.usage(orjson.loads(sent).get("usage"))
    usage: Any = None
    for event in record.events():
        if not isinstance(event, dict):
            continue
        if event.get("type") in ("response.completed", "response.incomplete"):
            usage = event["response"]["usage"]
        elif event.get("type") == "message_start":
            usage = dict(event["message"]["usage"])
        elif event.get("type") == "message_delta":
            usage = {**usage, **event["usage"]}
    return endpoint.usage(usage)


def rows_by_request(database: Path) -> dict[str, sqlite3.Row]:
    with sqlite3.connect(database) as db:
        db.row_factory = sqlite3.Row
        return {r["request_id"]: r for r in db.execute("SELECT * FROM usage").fetchall()}


@pytest.mark.timeout(120)
async def test_readme_examples_through_lumen_proxy_serve(lumen_process: Any, upstream: UpstreamServer,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_node_modules()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")  # and the example disables it in code too
    data = config_dict(tmp_path, [upstream.base_url])
    data["models"][0]["price"] = {"prompt": 2.5, "completion": 10, "cached_prompt": 1.25}
    path = write_config(tmp_path, data)
    key = make_key(path)
    proc = lumen_process(path)
    upstream.state.behavior.cached_tokens = 3
    upstream.state.behavior.cache_read_tokens = 4

    blocks = {name: python_blocks(name) for name in ("The Responses API", "The Anthropic Messages API (Claude Code)")}
    assert [len(b) for b in blocks.values()] == [2, 1]
    printed = [await asyncio.to_thread(run_block, code, proc.origin, key)
               for section in blocks.values() for code in section]
    assert all(text.strip() for text in printed)
    node = await arun_node_example("responses", proc.base_url, key, model="gpt-4o")  # the openai npm package
    assert node.returncode == 0, node.stderr
    assert len(node.stdout.splitlines()) == 2 and node.stdout.splitlines()[0] == node.stdout.splitlines()[1]

    answered = [r for r in upstream.state.requests if r.method == "POST" and r.status == 200]
    paths = [r.path for r in answered]
    assert paths.count("/v1/responses") >= 6 and paths.count("/v1/messages") == 1  # 3 + the agent's + Node's 2
    assert answered[1].body["previous_response_id"] == orjson.loads(bytes(answered[0].sent))["id"]
    assert upstream.state.requests[-1].body.get("model") == "fake-model"
    database = load_config(path).database
    price = load_config(path).by_name["gpt-4o"].price

    async def all_logged() -> bool:
        rows = rows_by_request(database)
        return all(r.headers["X-Request-ID"] in rows for r in answered)

    assert await eventually(all_logged, within=5)
    rows = rows_by_request(database)
    for record in answered:
        row = rows[record.headers["X-Request-ID"]]
        usage = reported(record)
        assert usage is not None and usage.cached > 0
        assert (row["endpoint"], row["status"], row["estimated"], row["partial"]) == (record.path, 200, 0, 0)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.prompt, usage.completion)
        assert row["cost"] == billing.cost(price, usage.prompt, usage.completion, usage.cached)

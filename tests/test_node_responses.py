"""The Responses API from Node.js (tests/node/responses.mjs) with the real `openai` npm package, against
the proxy on its real port with a real key: the text arrives, whole and streamed, and both are billed."""

from __future__ import annotations

import orjson
import pytest

from lumen_proxy.billing import cost
from tests.conftest import Proxy, query
from tests.fake_upstream import UpstreamServer, chat_reply, response_conversation
from tests.nodejs import arun_node_example, ensure_node_modules, node_available

pytestmark = pytest.mark.skipif(not node_available(), reason="node is not installed")
INPUT = "Explain quantum entanglement in plain English"  # what responses.mjs asks


@pytest.fixture(autouse=True)
def node_modules() -> None:
    ensure_node_modules()


@pytest.mark.parametrize("model", ["gpt-4o", "echo"])
async def test_responses_example(proxy: Proxy, alice: str, upstream: UpstreamServer, model: str) -> None:
    result = await arun_node_example("responses", proxy.base_url, alice, model=model)
    assert result.returncode == 0, result.stderr
    if model == "echo":
        expected = f"Echo from Lumen's built-in model: {INPUT}"
    else:
        expected = chat_reply("up1", response_conversation({"input": INPUT}))
    assert result.stdout == f"{expected}\n{expected}\n"  # whole, then streamed
    await proxy.flush()
    rows = query(proxy.rt.config.database, "SELECT * FROM usage ORDER BY id")
    assert [(r["endpoint"], r["model"], r["status"], r["estimated"], r["partial"]) for r in rows] == [
        ("/v1/responses", model, 200, 0, 0)] * 2
    price = proxy.rt.config.by_name[model].price
    assert all(r["cost"] == cost(price, r["prompt_tokens"], r["completion_tokens"]) > 0 for r in rows)
    if model == "gpt-4o":
        whole, streamed = upstream.state.requests_to("/v1/responses")
        assert streamed.body["stream"] is True
        sent = [orjson.loads(bytes(whole.sent))["usage"], streamed.events()[-1]["response"]["usage"]]
        assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
            (u["input_tokens"], u["output_tokens"]) for u in sent]
    balance = query(proxy.rt.config.database, "SELECT balance FROM accounts WHERE name = 'alice'")[0][0]
    assert balance == 1000 * 1_000_000 - sum(r["cost"] for r in rows)

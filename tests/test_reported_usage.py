"""What a backend reports is validated before it is billed.

Garbage usage (negative, float, string, null, {}) is billed as if absent: the estimate, row marked
``estimated``, never 0. Usage above what the request could produce is capped at the request's bound
(twice the held prompt, exactly the held completion), flagged ``capped`` and logged. Before the fix a
lying backend got free passes, or one response debited 2,500,000 coins.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest

from lumen_proxy.billing import cost
from lumen_proxy.endpoints import MAX_BILLED_TOKENS
from tests.conftest import Proxy, auth, query
from tests.fake_upstream import UpstreamServer

USER = [{"role": "user", "content": "one two three four five six seven eight nine ten"}]
MICRO = 1_000_000


async def send(proxy: Proxy, key: str, body: dict[str, Any]) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as session, session.post(
            proxy.base_url + "/chat/completions", json=body, headers=auth(key)) as response:
        return response.status, await response.read(), response.headers["x-request-id"]


def row_of(proxy: Proxy, request_id: str) -> Any:
    [row] = query(proxy.rt.config.database, "SELECT * FROM usage WHERE request_id = ?", request_id)
    return row


GARBAGE = [-5, 1.5, "12", None, {}, [], {"prompt_tokens": -3, "completion_tokens": 4},
           {"prompt_tokens": 3.0, "completion_tokens": 4}, {"prompt_tokens": "3", "completion_tokens": 4},
           {"prompt_tokens": 3}, {"prompt_tokens": True, "completion_tokens": 4}, {"prompt_tokens": 3,
                                                                                    "completion_tokens": None}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("usage", GARBAGE, ids=repr)
async def test_garbage_usage_is_billed_the_estimate_never_zero(
        proxy: Proxy, alice: str, upstream: UpstreamServer, usage: Any, stream: bool) -> None:
    upstream.state.behavior.usage_override = usage
    status, received, request_id = await send(proxy, alice, {"model": "gpt-4o", "messages": USER, "stream": stream})
    assert status == 200
    await proxy.flush()
    row = row_of(proxy, request_id)
    assert row["estimated"] == 1 and row["capped"] == 0
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0 and row["cost"] > 0
    if stream and usage is not None:  # "usage": null is on every OpenAI chunk: never parsed, passed on
        assert b'"choices":[]' not in received  # the usage chunk we asked for is still not shown


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("reported", [10**12, 2**63 - 1, 2**63])
async def test_usage_above_the_requests_bound_is_capped_flagged_and_logged(
        proxy: Proxy, alice: str, upstream: UpstreamServer, caplog: pytest.LogCaptureFixture,
        reported: int, stream: bool) -> None:
    upstream.state.behavior.usage_override = {"prompt_tokens": reported, "completion_tokens": reported,
                                              "total_tokens": 2 * reported}
    body = {"model": "gpt-4o", "messages": USER, "max_tokens": 20, "stream": stream}
    with caplog.at_level(logging.WARNING, logger="lumen_proxy"):
        status, _, request_id = await send(proxy, alice, body)
    assert status == 200
    await proxy.flush()
    row = row_of(proxy, request_id)
    held_prompt = row["prompt_tokens"] // 2
    assert row["capped"] == 1 and row["estimated"] == 0
    assert row["completion_tokens"] == 20  # the cap Lumen held and the backend was told
    assert 0 < row["prompt_tokens"] < 2_000  # twice the held prompt of a ~150-byte body
    model = proxy.rt.config.model("gpt-4o")
    assert model is not None
    assert row["cost"] == cost(model.price, 2 * held_prompt, 20)
    assert any(request_id in r.getMessage() and "above what the request could produce" in r.getMessage()
               for r in caplog.records)
    [balance] = query(proxy.rt.config.database, "SELECT balance FROM accounts WHERE name = 'alice'")
    assert balance[0] == 1000 * MICRO - row["cost"]


async def test_a_lying_backend_does_not_stop_the_usage_log_for_anyone(
        proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    """Before: one 2**63-token row failed every later batch; nothing more was committed for any account."""
    await proxy.account("bob")
    bob = await proxy.key("bob")
    upstream.state.behavior.usage_override = {"prompt_tokens": 2**63, "completion_tokens": 2**63}
    await send(proxy, alice, {"model": "gpt-4o", "messages": USER})
    upstream.state.behavior.usage_override = {"prompt_tokens": 2**64 + 1, "completion_tokens": 1}  # not even int64
    await send(proxy, alice, {"model": "gpt-4o", "messages": USER})
    upstream.state.reset()
    ids = [(await send(proxy, bob, {"model": "gpt-4o", "messages": USER}))[2] for _ in range(3)]
    await proxy.flush()
    rows = query(proxy.rt.config.database, "SELECT request_id, status FROM usage ORDER BY id")
    assert len(rows) == 5 and [r["request_id"] for r in rows[2:]] == ids
    assert max(r[0] for r in query(proxy.rt.config.database, "SELECT max(prompt_tokens) FROM usage")) <= \
        MAX_BILLED_TOKENS

"""The API reference's Node.js examples (tests/node/*.mjs) with the real `openai` npm package,
against the proxy on its real port with a real key.
"""

from __future__ import annotations

import pytest

from tests.conftest import Proxy
from tests.fake_upstream import UpstreamServer, chat_reply
from tests.nodejs import arun_node_example, ensure_node_modules, node_available

pytestmark = pytest.mark.skipif(not node_available(), reason="node is not installed")


@pytest.fixture(scope="module", autouse=True)
def node_modules() -> None:
    ensure_node_modules()


async def test_chat_example(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    result = await arun_node_example("chat", proxy.base_url, alice)
    assert result.returncode == 0, result.stderr
    messages = [{"role": "user", "content": "Explain quantum entanglement in plain English"}]
    assert result.stdout == chat_reply("up1", messages) + "\n"
    assert upstream.state.last.body["model"] == "fake-model"
    assert upstream.state.last.authorization == "Bearer upstream-secret-key"


async def test_streaming_example(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    result = await arun_node_example("stream", proxy.base_url, alice)
    assert result.returncode == 0, result.stderr
    messages = [{"role": "user", "content": "Write a haiku about machine learning"}]
    assert result.stdout == chat_reply("up1", messages)
    assert upstream.state.last.body["stream"] is True


async def test_models_example(proxy: Proxy, alice: str) -> None:
    result = await arun_node_example("models", proxy.base_url, alice)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["gpt-4o", "text-embedding-3-small", "echo"]


async def test_examples_on_the_builtin_echo_model(proxy: Proxy, alice: str) -> None:
    chat = await arun_node_example("chat", proxy.base_url, alice, model="echo")
    stream = await arun_node_example("stream", proxy.base_url, alice, model="echo")
    assert chat.stdout == "Echo from Lumen's built-in model: Explain quantum entanglement in plain English\n"
    assert stream.stdout == "Echo from Lumen's built-in model: Write a haiku about machine learning"


async def test_a_wrong_key_fails_the_example_with_401(proxy: Proxy) -> None:
    result = await arun_node_example("chat", proxy.base_url, "sk_wrong")
    assert result.returncode != 0
    assert "401" in result.stderr

"""The API reference's Python examples, run as a user runs them: the synchronous ``openai.OpenAI``
client, ``print`` and all (in a thread, so the in-process proxy keeps serving).

The only changes: the key and base URL point at the test proxy, and each client is closed. The
reference's streaming example uses ``stream.text_stream``, which the openai Python SDK does not have
(a test below pins that down); the forms that do work are tested instead, and the README shows them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from lumen_proxy.config import load_config
from lumen_proxy.demo import bootstrap_demo, demo_key_path
from tests.conftest import MakeProxy, Proxy
from tests.fake_upstream import UpstreamServer, chat_reply, count_prompt_tokens, split_pieces


async def run(example: Callable[[OpenAI], Any], proxy_base_url: str, key: str) -> Any:
    """Run a synchronous example with a client built as the reference builds it."""

    def with_client() -> Any:
        with OpenAI(api_key=key, base_url=proxy_base_url, max_retries=0) as client:
            return example(client)

    return await asyncio.to_thread(with_client)


# ---- the examples, as in the reference ----


def basic_request(client: OpenAI) -> None:
    response = client.chat.completions.create(
        model="gpt-4o",
        messages=[
            {"role": "user", "content": "Explain quantum entanglement in plain English"}
        ]
    )
    print(response.choices[0].message.content)


def multi_turn(client: OpenAI) -> None:
    history: list[ChatCompletionMessageParam] = []

    def chat(user_message: str) -> str | None:
        history.append({"role": "user", "content": user_message})
        response = client.chat.completions.create(
            model="gpt-4o",
            messages=history
        )
        reply = response.choices[0].message.content
        history.append({"role": "assistant", "content": reply})
        return reply

    print(chat("What is a transformer model?"))
    print(chat("How does the attention mechanism work?"))


def system_prompt(client: OpenAI) -> None:
    response = client.chat.completions.create(
        model="gpt-4o",
        messages=[
            {"role": "system", "content": "You are a helpful research assistant who always cites sources."},
            {"role": "user", "content": "Summarize recent advances in protein folding"}
        ]
    )
    print(response.choices[0].message.content)


def streaming_as_written_in_the_reference(client: OpenAI) -> None:
    with client.chat.completions.stream(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Write a short poem about data science"}]
    ) as stream:
        for text in stream.text_stream:  # type: ignore[attr-defined]
            print(text, end="", flush=True)
    print()


def streaming_with_create(client: OpenAI) -> None:
    """Working form 1 (README): create(stream=True) and the chunks' delta.content."""
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Write a short poem about data science"}],
        stream=True,
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


def streaming_with_the_helper(client: OpenAI) -> None:
    """Working form 2 (README): the SDK's .stream() helper and its content.delta events."""
    with client.chat.completions.stream(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Write a short poem about data science"}]
    ) as stream:
        for event in stream:
            if event.type == "content.delta":
                print(event.delta, end="", flush=True)
    print()


POEM: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write a short poem about data science"}]


# ---- against the proxy and a fake backend ----


async def test_basic_request(
    proxy: Proxy, alice: str, upstream: UpstreamServer, capsys: pytest.CaptureFixture[str]
) -> None:
    await run(basic_request, proxy.base_url, alice)
    messages = [{"role": "user", "content": "Explain quantum entanglement in plain English"}]
    assert capsys.readouterr().out == chat_reply("up1", messages) + "\n"


async def test_multi_turn_sends_the_whole_history(
    proxy: Proxy, alice: str, upstream: UpstreamServer, capsys: pytest.CaptureFixture[str]
) -> None:
    await run(multi_turn, proxy.base_url, alice)
    first, second = capsys.readouterr().out.splitlines()
    assert first == "Echo from up1 [messages=1 system=no]: What is a transformer model?"
    assert second == "Echo from up1 [messages=3 system=no]: How does the attention mechanism work?"
    assert upstream.state.last.body["messages"] == [
        {"role": "user", "content": "What is a transformer model?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "How does the attention mechanism work?"},
    ]


async def test_system_prompt_reaches_the_backend(
    proxy: Proxy, alice: str, upstream: UpstreamServer, capsys: pytest.CaptureFixture[str]
) -> None:
    await run(system_prompt, proxy.base_url, alice)
    assert capsys.readouterr().out == (
        "Echo from up1 [messages=2 system=yes]: Summarize recent advances in protein folding\n"
    )
    assert upstream.state.last.body["messages"][0] == {
        "role": "system", "content": "You are a helpful research assistant who always cites sources."
    }


async def test_the_references_streaming_example_fails_in_the_sdk(proxy: Proxy, alice: str) -> None:
    """``text_stream`` is not an attribute of the Python SDK's ChatCompletionStream (it never was)."""
    with pytest.raises(AttributeError, match="text_stream"):
        await run(streaming_as_written_in_the_reference, proxy.base_url, alice)


@pytest.mark.parametrize("example", [streaming_with_create, streaming_with_the_helper])
async def test_working_streaming_forms(
    proxy: Proxy, alice: str, upstream: UpstreamServer, capsys: pytest.CaptureFixture[str],
    example: Callable[[OpenAI], None],
) -> None:
    await run(example, proxy.base_url, alice)
    assert capsys.readouterr().out == chat_reply("up1", POEM) + "\n"
    assert upstream.state.last.body["stream"] is True


# ---- the same forms with the async client (what aiohttp/FastAPI code uses) ----


async def test_async_create_stream(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    stream = await proxy.sdk(alice).chat.completions.create(model="gpt-4o", messages=POEM, stream=True)
    pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert [p for p in pieces if p] == split_pieces(chat_reply("up1", POEM))


async def test_async_stream_helper_events_and_final_completion(
    proxy: Proxy, alice: str, upstream: UpstreamServer
) -> None:
    async with proxy.sdk(alice).chat.completions.stream(model="gpt-4o", messages=POEM) as stream:
        deltas = [event.delta async for event in stream if event.type == "content.delta"]
        final = await stream.get_final_completion()
    assert "".join(deltas) == chat_reply("up1", POEM)
    assert final.choices[0].message.content == chat_reply("up1", POEM)
    assert final.choices[0].finish_reason == "stop"
    assert final.usage is None  # the helper does not ask for usage, so the proxy hands none out


async def test_async_stream_helper_with_usage(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    async with proxy.sdk(alice).chat.completions.stream(
        model="gpt-4o", messages=POEM, stream_options={"include_usage": True}
    ) as stream:
        final = await stream.get_final_completion()
    assert final.usage is not None
    assert final.usage.prompt_tokens == count_prompt_tokens(POEM)
    assert final.usage.completion_tokens == len(split_pieces(chat_reply("up1", POEM)))


# ---- against the embedded default (the first README command: no backend at all) ----


async def test_the_examples_work_on_the_embedded_demo(
    make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    config = load_config(None)
    demo: Proxy = await make_proxy(config, on_ready=bootstrap_demo)  # type: ignore[call-arg]
    key = demo_key_path(config.database).read_text().strip()
    for example in (basic_request, multi_turn, system_prompt, streaming_with_create, streaming_with_the_helper):
        await run(example, demo.base_url, key)
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "Echo from Lumen's built-in model: Explain quantum entanglement in plain English",
        "Echo from Lumen's built-in model: What is a transformer model?",
        "Echo from Lumen's built-in model: How does the attention mechanism work?",
        "Echo from Lumen's built-in model: Summarize recent advances in protein folding",
        "Echo from Lumen's built-in model: Write a short poem about data science",
        "Echo from Lumen's built-in model: Write a short poem about data science",
    ]


async def test_the_demo_account_has_a_daily_allowance(make_proxy: MakeProxy, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Every feature works in the demo: its account is in the `demo` group, with 10 coins a day spent first."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    config = load_config(None)
    demo: Proxy = await make_proxy(config, on_ready=bootstrap_demo)  # type: ignore[call-arg]
    key = demo_key_path(config.database).read_text().strip()
    await run(basic_request, demo.base_url, key)  # the account is out of allowance: refilled on the spot
    await demo.flush()
    async with aiohttp.ClientSession() as http, http.get(
            demo.origin + "/lumen/v1/me", headers={"Authorization": f"Bearer {key}"}) as response:
        me = await response.json()
    assert me["group"] == "demo" and me["coins"] == 100  # the persistent balance is untouched
    assert me["allowance"]["coins"] == 10 and 0 < me["allowance"]["left"] < 10
    assert me["allowance"]["resets_at"].endswith("T00:00:00+00:00")

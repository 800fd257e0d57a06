"""The endpoint table's pure parts: usage validators per API, stream readers, prices with cached
input, the response-id memory, and the config keys that come with them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from lumen_proxy.billing import cost, worst_cost
from lumen_proxy.config import Backend, ConfigError, Price
from lumen_proxy.endpoints import (
    ENDPOINTS,
    MESSAGES_STREAM,
    RESPONSES_STREAM,
    Usage,
    completion_usage,
    count_parts,
    messages_usage,
    responses_usage,
)
from lumen_proxy.owners import ResponseOwners
from lumen_proxy.sse import SseScanner
from tests.conftest import build_config, config_dict

GARBAGE: list[Any] = [None, -1, 1.0, "5", True, [], {}, 2**63 * -1]


def test_every_endpoint_has_one_record() -> None:
    assert set(ENDPOINTS) == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                              "/v1/messages", "/v1/messages/count_tokens"}
    assert ENDPOINTS["/v1/messages"].errors.name == "anthropic"
    assert ENDPOINTS["/v1/responses"].errors.name == "responses"
    assert not ENDPOINTS["/v1/messages/count_tokens"].billed


def test_responses_usage_counts_cached_inside_input() -> None:
    usage = {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 60}, "output_tokens": 7,
             "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 107}
    assert responses_usage(usage) == Usage(100, 7, 60)
    assert responses_usage({"input_tokens": 5, "output_tokens": 1}) == Usage(5, 1, 0)
    assert responses_usage({**usage, "input_tokens_details": {"cached_tokens": 10**9}}) == Usage(100, 7, 100)
    for bad in GARBAGE:
        assert responses_usage({"input_tokens": bad, "output_tokens": 1}) is None
        assert responses_usage({"input_tokens": 1, "output_tokens": bad}) is None
        assert responses_usage({**usage, "input_tokens_details": {"cached_tokens": bad}}) == Usage(100, 7, 0)
    assert responses_usage({"prompt_tokens": 5, "completion_tokens": 1}) is None  # chat's names are not these


def test_messages_usage_adds_cache_reads_and_writes_to_the_prompt() -> None:
    """Anthropic's input_tokens excludes cached input: the prompt is all three."""
    usage = {"input_tokens": 10, "cache_creation_input_tokens": 200, "cache_read_input_tokens": 3000,
             "output_tokens": 42}
    assert messages_usage(usage) == Usage(3210, 42, 3000)
    assert messages_usage({"input_tokens": 10, "output_tokens": 2, "cache_creation_input_tokens": None,
                           "cache_read_input_tokens": None}) == Usage(10, 2, 0)
    for bad in GARBAGE:
        assert messages_usage({"input_tokens": bad, "output_tokens": 1}) is None
        assert messages_usage({"input_tokens": 1, "output_tokens": bad}) is None
        assert messages_usage({"input_tokens": 1, "output_tokens": 1, "cache_read_input_tokens": bad}) == Usage(1, 1, 0)


def test_chat_usage_keeps_cached_tokens() -> None:
    assert completion_usage({"prompt_tokens": 9, "completion_tokens": 2,
                             "prompt_tokens_details": {"cached_tokens": 4}}) == Usage(9, 2, 4)


def test_cost_prices_cached_input_apart() -> None:
    price = Price(prompt=3_000_000, completion=15_000_000, cached_prompt=300_000)  # 3, 15 and 0.3 per million
    assert cost(price, 1_000_000, 0, 1_000_000) == 300_000
    assert cost(price, 1_000_000, 1_000_000, 400_000) == 600_000 * 3 + 400_000 * 3 // 10 + 15_000_000
    assert cost(Price(prompt=3_000_000), 10, 0, 10) == cost(Price(prompt=3_000_000), 10, 0)  # default: prompt price
    assert worst_cost(price, 100, 10) == cost(price, 100, 10)  # the hold never counts the discount
    dearer = Price(prompt=1_000_000, cached_prompt=2_000_000)  # a cache write premium set as "cached"
    assert worst_cost(dearer, 1_000_000, 0) == 2_000_000


def test_count_parts_finds_anthropic_and_responses_media() -> None:
    anthropic_messages = [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://e.org/a.png"}},
        {"type": "document", "source": {"type": "url", "url": "https://e.org/a.pdf"}},
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}] * 5},
    ]}]
    assert count_parts(anthropic_messages) == {"image": 6, "file": 1}
    responses_input = [{"role": "user", "content": [{"type": "input_text", "text": "hi"},
                                                    {"type": "input_image", "image_url": "https://e.org/b"}]},
                       {"type": "input_file", "file_id": "f"}]
    assert count_parts(responses_input) == {"image": 1, "file": 1}
    deep: Any = [{"type": "text"}]
    for _ in range(50):
        deep = [{"type": "tool_result", "content": deep + [{"type": "image"}]}]
    assert sum(count_parts(deep).values()) <= 3  # bounded depth: no recursion blow-up


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n" for name, data in events)


def feed_in_pieces(scanner: SseScanner, stream: bytes, size: int) -> bytes:
    out = b"".join(scanner.feed(stream[i:i + size]) for i in range(0, len(stream), size))
    return out + scanner.finish()


RESPONSE = {"id": "resp_1", "object": "response", "status": "in_progress", "usage": None}
RESPONSES_EVENTS = sse(
    ("response.created", {"type": "response.created", "sequence_number": 0, "response": RESPONSE}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 1,
                                    "delta": '{"type":"response.completed","usage":{"input_tokens":1}}'}),
    ("response.completed", {"type": "response.completed", "sequence_number": 2, "response": {
        **RESPONSE, "status": "completed", "usage": {"input_tokens": 12, "output_tokens": 5, "total_tokens": 17}}}),
)
MESSAGES_EVENTS = sse(
    ("message_start", {"type": "message_start", "message": {"id": "msg_1", "usage": {
        "input_tokens": 7, "cache_read_input_tokens": 100, "output_tokens": 1}}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
        "type": "text_delta", "text": '"type": "message_delta", "usage": {"output_tokens": 99999}'}}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}),
    ("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 9}}),
    ("message_stop", {"type": "message_stop"}),
)


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_responses_reader_takes_usage_and_id_whatever_the_chunking(size: int) -> None:
    scanner = SseScanner(drop_usage_chunk=False, reader=RESPONSES_STREAM)
    assert feed_in_pieces(scanner, RESPONSES_EVENTS, size) == RESPONSES_EVENTS  # byte for byte
    assert scanner.response_id == "resp_1"
    assert responses_usage(scanner.usage) == Usage(12, 5, 0)  # not the text that looks like an event
    assert scanner.done


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_messages_reader_merges_start_and_cumulative_deltas(size: int) -> None:
    scanner = SseScanner(drop_usage_chunk=False, reader=MESSAGES_STREAM)
    assert feed_in_pieces(scanner, MESSAGES_EVENTS, size) == MESSAGES_EVENTS
    assert messages_usage(scanner.usage) == Usage(107, 9, 100)
    assert scanner.done


def test_a_messages_stream_cut_before_message_stop_is_not_done() -> None:
    scanner = SseScanner(drop_usage_chunk=False, reader=MESSAGES_STREAM)
    cut = MESSAGES_EVENTS[:MESSAGES_EVENTS.index(b"event: message_stop")]
    assert scanner.feed(cut) == cut
    assert not scanner.done


def test_owners_answer_only_the_account_that_made_the_response() -> None:
    now = [0.0]
    owners = ResponseOwners(keep=3, ttl=60, clock=lambda: now[0])
    backend = Backend(url="http://127.0.0.1:1/v1", model="m")
    owners.remember("resp_a", 1, "gpt-4o", backend)
    assert owners.owner("resp_a", 1) is not None
    assert owners.owner("resp_a", 2) is None
    assert owners.owner("resp_unknown", 1) is None
    for name in ("resp_b", "resp_c", "resp_d"):
        owners.remember(name, 1, "gpt-4o", backend)
    assert len(owners) == 3 and owners.owner("resp_a", 1) is None  # bounded: the oldest is forgotten
    now[0] = 61
    assert owners.owner("resp_d", 1) is None  # expired
    owners.remember("resp_e", 1, "gpt-4o", backend)
    assert len(owners) == 1  # the expired ones left on the next write


def test_config_takes_apis_cached_price_and_response_ids(tmp_path: Path) -> None:
    data = config_dict(tmp_path, ["http://127.0.0.1:1/v1"], response_ids={"keep": 10, "hours": 2})
    data["models"][0]["backends"][0]["apis"] = ["chat", "messages"]
    data["models"][0]["price"]["cached_prompt"] = 0.25
    config = build_config(tmp_path, data)
    model = config.models[0]
    assert model.price.cached_prompt == 250_000
    assert model.backends_for("messages") == model.backends and model.backends_for("responses") == ()
    assert config.response_ids.keep == 10 and config.response_ids.hours == 2
    for bad in (["chat", "audio"], [], "chat", [1]):
        data["models"][0]["backends"][0]["apis"] = bad
        with pytest.raises(ConfigError, match="apis"):
            build_config(tmp_path, data)


def test_one_account_cannot_push_the_others_ids_out() -> None:
    owners = ResponseOwners(keep=100, ttl=60, per_account=10, clock=lambda: 0.0)
    backend = Backend(url="http://127.0.0.1:1/v1", model="m")
    for i in range(5):
        owners.remember(f"resp_victim{i}", 1, "gpt-4o", backend)
    for i in range(10_000):  # a flood from another account
        owners.remember(f"resp_flood{i}", 2, "gpt-4o", backend)
    assert all(owners.owner(f"resp_victim{i}", 1) is not None for i in range(5))
    assert len(owners) == 15 and owners.owner("resp_flood9999", 2) is not None
    assert owners.owner("resp_flood0", 2) is None  # the flooder's own oldest went
    owners.remember("resp_victim0", 2, "gpt-4o", backend)  # a backend that reuses an id: the last maker owns it
    assert owners.owner("resp_victim0", 1) is None and owners.owner("resp_victim0", 2) is not None
    owners.forget("resp_victim0")
    assert owners.owner("resp_victim0", 2) is None and len(owners) == 13  # 4 + 9 of the flooder's

"""What observing a stream costs per event, for each API's stream reader.

Run from the repository root: ``python -m bench.bench_sse`` (a few seconds on one core).

Each stream is 200 text deltas in its API's wire format (as tests/fake_upstream.py writes them),
fed to :class:`lumen_proxy.sse.SseScanner` in the chunks a backend typically sends (one event per
read) and in 1,500-byte pieces (events split across reads). The figure is the best of ``--repeat``
passes, in microseconds per event: what Lumen adds to each token it relays, on top of the socket work.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import orjson

from lumen_proxy.endpoints import CHAT_STREAM, MESSAGES_STREAM, RESPONSES_STREAM, StreamReader
from lumen_proxy.sse import SseScanner

DELTAS = 200


def _event(data: dict[str, object], name: str | None = None) -> bytes:
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def chat() -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [_event({**base, "choices": [{"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}],
                      "usage": None}) for i in range(DELTAS)]
    events.append(_event({**base, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": DELTAS}}))
    return [*events, b"data: [DONE]\n\n"]


def responses() -> list[bytes]:
    response = {"id": "resp_1", "object": "response", "status": "in_progress", "usage": None, "output": []}
    events = [_event({"type": "response.created", "sequence_number": 0, "response": response}, "response.created")]
    events += [_event({"type": "response.output_text.delta", "sequence_number": i + 1, "item_id": "msg_1",
                       "output_index": 0, "content_index": 0, "delta": f" w{i}"}, "response.output_text.delta")
               for i in range(DELTAS)]
    done = {**response, "status": "completed", "usage": {"input_tokens": 9, "output_tokens": DELTAS}}
    return [*events, _event({"type": "response.completed", "sequence_number": DELTAS + 1, "response": done},
                            "response.completed")]


def messages() -> list[bytes]:
    start = {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 9, "output_tokens": 1}}}
    events = [_event(start, "message_start")]
    events += [_event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f" w{i}"}},
                      "content_block_delta") for i in range(DELTAS)]
    events.append(_event({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                          "usage": {"output_tokens": DELTAS}}, "message_delta"))
    return [*events, _event({"type": "message_stop"}, "message_stop")]


def per_event(chunks: list[bytes], reader: StreamReader, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(20):
            scanner = SseScanner(drop_usage_chunk=False, reader=reader)
            for chunk in chunks:
                scanner.feed(chunk)
            scanner.finish()
        best = min(best, (time.perf_counter() - started) / 20 / len(chunks))
    return best * 1e6


def pieces(chunks: list[bytes], size: int = 1500) -> list[bytes]:
    whole = b"".join(chunks)
    return [whole[i:i + size] for i in range(0, len(whole), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    streams: dict[str, tuple[Callable[[], list[bytes]], StreamReader]] = {
        "chat/completions": (chat, CHAT_STREAM), "responses": (responses, RESPONSES_STREAM),
        "messages": (messages, MESSAGES_STREAM)}
    print(f"{'stream':18} {'us/event (whole events)':>24} {'us/event (1500 B pieces)':>26}")
    for name, (make, reader) in streams.items():
        chunks = make()
        whole = per_event(chunks, reader, args.repeat)
        split = per_event(pieces(chunks), reader, args.repeat) * len(pieces(chunks)) / len(chunks)
        print(f"{name:18} {whole:24.2f} {split:26.2f}")


if __name__ == "__main__":
    main()

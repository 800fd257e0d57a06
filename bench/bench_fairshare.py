"""Fair share of a saturated backend: one heavy account against five light ones, queue off and on.

    python bench/bench_fairshare.py [--seconds 15]

A fake backend serves 4 requests at once, each in 300 ms, and queues the rest first come, first
served, as vLLM and llama.cpp do. One heavy account keeps 40 requests in flight; five light accounts
each send one request at a time (non-streaming chat completions, so the time to the first byte is
the time to the answer). The real ``lumen-proxy serve`` process runs three times, in one run:

- ``idle``: the light traffic alone (the reference);
- ``queue off``: no ``max_concurrency``: Lumen passes everything on and the backend's own queue is
  in arrival order, so a light request waits behind the heavy account's backlog;
- ``queue on``: ``max_concurrency: 4``: the rest wait in Lumen's fair queue.

Reported per mode: the light accounts' p50 and p99 time to first byte and requests served (each),
the heavy account's throughput, and the backend's utilisation (slot-seconds busy / 4 x duration).
Goal: with the queue on, light p50 within 2x of idle, utilisation as with the queue off (no
throughput lost), every light account served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

SLOTS, SERVICE, HEAVY, LIGHT = 4, 0.300, 40, 5


class Backend:
    """A model server with SLOTS slots and a first-come queue; counts busy slot-seconds."""

    def __init__(self) -> None:
        self.sem = asyncio.Semaphore(SLOTS)  # asyncio wakes its waiters in arrival order
        self.busy_seconds = 0.0
        self.served = 0

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        async with self.sem:
            start = time.perf_counter()
            await asyncio.sleep(SERVICE)
            self.busy_seconds += time.perf_counter() - start
            self.served += 1
        text = "ok"
        return web.json_response({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}})


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(config: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "lumen_proxy", "--config", str(config), *args],
                          capture_output=True, text=True, check=True)
    return done.stdout


def prepare(mode: str, backend_url: str, tmp: Path) -> tuple[int, dict[str, str], subprocess.Popen[bytes]]:
    """The mode's config, accounts and keys (through the CLI), and the started server."""
    backend_conf: dict[str, object] = {"url": backend_url, "model": "m", "stream_usage": False}
    if mode == "queue on":
        backend_conf["max_concurrency"] = SLOTS
    port = free_port()
    config = tmp / f"{mode.replace(' ', '-')}.yaml"
    config.write_text(json.dumps({
        "database": str(tmp / f"{mode.replace(' ', '-')}.db"), "listen": {"host": "127.0.0.1", "port": port},
        "queue_timeout": 120,
        "models": [{"name": "m", "backends": [backend_conf], "price": {"prompt": 0, "completion": 0},
                    "max_output_tokens": 16}]}))
    keys: dict[str, str] = {}
    for name in ["heavy", *[f"light{i}" for i in range(LIGHT)]]:
        cli(config, "accounts", "add", name, "--coins", "1000")
        keys[name] = json.loads(cli(config, "keys", "create", name, "--json"))["key"]
    server = subprocess.Popen([sys.executable, "-m", "lumen_proxy", "serve", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return port, keys, server


async def run_mode(mode: str, backend_url: str, seconds: float, tmp: Path) -> dict[str, object]:
    port, keys, server = await asyncio.to_thread(prepare, mode, backend_url, tmp)
    try:
        base = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz"):
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            ttfb: dict[str, list[float]] = {name: [] for name in keys}
            stop = time.perf_counter() + seconds
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}

            async def loop(name: str) -> None:
                headers = {"Authorization": f"Bearer {keys[name]}"}
                while time.perf_counter() < stop:
                    start = time.perf_counter()
                    async with http.post(base, json=body, headers=headers) as response:
                        await response.content.readany()
                        took = time.perf_counter() - start
                        await response.read()
                        if response.status == 200:
                            ttfb[name].append(took)

            tasks = [loop(f"light{i}") for i in range(LIGHT)]
            if mode != "idle":
                tasks += [loop("heavy") for _ in range(HEAVY)]
            began = time.perf_counter()
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - began
    finally:
        server.terminate()
        await asyncio.to_thread(server.wait, 30)
    light = sorted(t for i in range(LIGHT) for t in ttfb[f"light{i}"])
    return {"mode": mode, "light_p50": statistics.median(light), "light_p99": light[int(len(light) * 0.99) - 1],
            "light_each": [len(ttfb[f"light{i}"]) for i in range(LIGHT)],
            "heavy_rps": len(ttfb["heavy"]) / elapsed, "elapsed": elapsed}


async def main(seconds: float) -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("idle", "queue off", "queue on"):
            backend = Backend()
            app = web.Application()
            app.router.add_post("/v1/chat/completions", backend.chat)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            began = time.perf_counter()
            try:
                result = await run_mode(mode, f"http://127.0.0.1:{port}/v1", seconds, Path(tmp))
            finally:
                wall = time.perf_counter() - began
                await runner.cleanup()
            result["utilisation"] = backend.busy_seconds / (SLOTS * float(result["elapsed"]))  # type: ignore[arg-type]
            del wall
            results.append(result)
    idle = float(results[0]["light_p50"])  # type: ignore[arg-type]
    print(f"backend: {SLOTS} slots, {SERVICE * 1000:.0f} ms a request, first come first served; "
          f"heavy: {HEAVY} in flight; light: {LIGHT} accounts, one at a time; {seconds:.0f} s per mode")
    print(f"{'mode':10} {'light p50':>10} {'light p99':>10} {'p50/idle':>9} {'light served (each)':>24} "
          f"{'heavy req/s':>12} {'utilisation':>12}")
    for r in results:
        p50, p99 = float(r["light_p50"]), float(r["light_p99"])  # type: ignore[arg-type]
        print(f"{r['mode']:10} {p50 * 1000:8.0f}ms {p99 * 1000:8.0f}ms {p50 / idle:8.2f}x "
              f"{str(r['light_each']):>24} {float(r['heavy_rps']):12.1f} "  # type: ignore[arg-type]
              f"{float(r['utilisation']):11.0%}")  # type: ignore[arg-type]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(parser.parse_args().seconds))

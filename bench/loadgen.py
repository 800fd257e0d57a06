"""Drive load at a target: wrk for non-stream requests, bench/stream_client.py for streams.

Both run as their own processes under the load-generator pinning prefix, so the Python orchestrator
never competes with what it measures. Every function returns plain numbers (milliseconds, requests
per second) and the count of 2xx answers, which the usage-log check adds up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
POST_SCRIPT = BENCH / "post.lua"
LIMIT_MARKER = "BENCH_LIMIT_REACHED"


class LoadError(Exception):
    """The load generator itself failed (not the target: target errors are counted, not raised)."""


@dataclass(frozen=True)
class WrkResult:
    connections: int
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> int:
        """Responses with a 2xx status (wrk counts >= 400 as status errors; we send no redirects)."""
        return self.requests - self.non_2xx


def _parse_wrk(output: str, connections: int) -> WrkResult:
    for line in output.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line[len("BENCH_JSON "):])
            return WrkResult(
                connections=connections,
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                non_2xx=data["status"],
                socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
                p50_ms=data["p50_us"] / 1000,
                p90_ms=data["p90_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                max_ms=data["max_us"] / 1000,
            )
    raise LoadError(f"wrk printed no summary:\n{output[-2000:]}")


def wrk(url: str, *, connections: int, seconds: float, key: str = "", prefix: tuple[str, ...] = (),
        max_requests: int = 0) -> WrkResult:
    """Run wrk (one thread) for ``seconds``, or until ``max_requests`` responses when that is set."""
    env = {**os.environ, "BENCH_KEY": key, "BENCH_MAX_REQUESTS": str(max_requests)}
    # wrk takes whole seconds only
    argv = [*prefix, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
            "-s", str(POST_SCRIPT), url]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True) as proc:
        lines = []
        for line in proc.stdout or ():
            lines.append(line)
            if line.startswith(LIMIT_MARKER):
                # wrk's main thread sleeps for the whole -d even after the Lua cap stopped the worker
                # thread; SIGINT makes it stop now and print its summary
                proc.send_signal(signal.SIGINT)
        proc.wait()
    output = "".join(lines)
    if proc.returncode != 0:
        raise LoadError(f"wrk exited with {proc.returncode}:\n{output[-2000:]}")
    return _parse_wrk(output, connections)


@dataclass(frozen=True)
class StreamResult:
    concurrency: int
    ok: int
    warmup_ok: int
    errors: int
    error_kinds: dict[str, int]
    seconds: float
    ttfb_p50_ms: float
    ttfb_p99_ms: float
    total_p50_ms: float
    total_p99_ms: float
    digests: dict[str, int]


def streams(port: int, *, concurrency: int, per_connection: int, key: str = "", include_usage: bool = True,
            prefix: tuple[str, ...] = (), dump_dir: Path | None = None, warmup: int = 1,
            stagger: float = 0.25) -> StreamResult:
    """Run ``concurrency`` connections doing ``warmup + per_connection`` streams each."""
    argv = [*prefix, sys.executable, str(BENCH / "stream_client.py"), "--port", str(port),
            "--concurrency", str(concurrency), "--streams", str(per_connection), "--warmup", str(warmup),
            "--stagger", str(stagger), "--key", key]
    if include_usage:
        argv.append("--include-usage")
    if dump_dir is not None:
        argv += ["--dump-dir", str(dump_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise LoadError(f"stream client exited with {done.returncode}:\n{done.stderr[-2000:]}")
    data = json.loads(done.stdout)
    return StreamResult(
        concurrency=concurrency,
        ok=data["ok"],
        warmup_ok=data["warmup_ok"],
        errors=data["errors"],
        error_kinds=data["error_kinds"],
        seconds=data["elapsed_s"],
        ttfb_p50_ms=data["ttfb_ms"]["p50"],
        ttfb_p99_ms=data["ttfb_ms"]["p99"],
        total_p50_ms=data["total_ms"]["p50"],
        total_p99_ms=data["total_ms"]["p99"],
        digests=data["digests"],
    )

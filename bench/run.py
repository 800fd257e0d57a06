"""Benchmark lumen against a direct connection, nginx and a bare aiohttp relay, in one run.

    bash bench/setup.sh
    python bench/run.py [--quick] [--no-pin] [--keep] [--only lumen,bare-aiohttp]

One fake upstream (bench/upstream.py) serves every target, and each target goes through the same
scenarios in turn: (a) latency at concurrency 1, (b) throughput at 32 and 128 connections, (c) streams
at 16 and 256 connections with byte-for-byte comparison against direct, (d) the proxy's CPU time and
peak memory; then lumen alone gets a 100,000-request memory soak, a graceful stop and the usage-log
and coins checks. Prints one markdown table; bench/README.md says how to read it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import loadgen
import procstat
import report
import targets
import usage_check
from targets import Pinning, Target

BENCH = Path(__file__).resolve().parent
README = BENCH / "README.md"
RESULTS_DIR = BENCH / "results"
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
JSON_BODY = b'{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello"}]}'


@dataclass(frozen=True)
class Plan:
    name: str
    warmup_s: int
    latency_s: int
    throughput_s: int
    streams_c16: int  # measured streams per connection
    streams_c256: int
    soak_half: int  # requests between the two RSS samples


FULL = Plan("full", warmup_s=1, latency_s=5, throughput_s=5, streams_c16=12, streams_c256=4, soak_half=50_000)
QUICK = Plan("quick", warmup_s=1, latency_s=1, throughput_s=1, streams_c16=2, streams_c256=1, soak_half=3_000)


@dataclass
class ClientTally:
    """2xx answers the clients saw, and how many more the target may have served (in flight at a stop)."""

    ok: int = 0
    in_flight: int = 0

    def add_wrk(self, result: loadgen.WrkResult) -> None:
        self.ok += result.ok
        self.in_flight += result.connections + result.socket_errors

    def add_streams(self, result: loadgen.StreamResult) -> None:
        self.ok += result.ok + result.warmup_ok
        self.in_flight += result.errors


class Runner:
    """Runs the scenarios against one target and keeps what it measured as plain dicts."""

    def __init__(self, plan: Plan, pin: Pinning, workdir: Path, target: Target) -> None:
        self.plan, self.pin, self.workdir, self.target = plan, pin, workdir, target
        self.tally = ClientTally()

    def cpu(self) -> float:
        return procstat.cpu_seconds(self.target.pid)

    def wrk(self, connections: int, seconds: float, max_requests: int = 0) -> loadgen.WrkResult:
        result = loadgen.wrk(self.target.url, connections=connections, seconds=seconds, key=self.target.key,
                             prefix=self.pin.load, max_requests=max_requests)
        self.tally.add_wrk(result)
        return result

    def streams(self, concurrency: int, per_connection: int, **kwargs: Any) -> loadgen.StreamResult:
        result = loadgen.streams(self.target.port, concurrency=concurrency, per_connection=per_connection,
                                 key=self.target.key, prefix=self.pin.load, **kwargs)
        self.tally.add_streams(result)
        return result

    def latency(self) -> dict[str, Any]:
        self.wrk(1, self.plan.warmup_s)
        result = self.wrk(1, self.plan.latency_s)
        return {"p50": result.p50_ms, "p99": result.p99_ms, "requests": result.requests}

    def throughput(self, connections: int) -> dict[str, Any]:
        self.wrk(connections, self.plan.warmup_s)
        before = self.cpu()
        result = self.wrk(connections, self.plan.throughput_s)
        spent = self.cpu() - before
        measured = {"rps": result.rps, "p50": result.p50_ms, "p99": result.p99_ms,
                    "errors": result.non_2xx + result.socket_errors, "requests": result.requests}
        if self.target.measured and result.requests:
            measured["cpu_us"] = spent / result.requests * 1e6
        return measured

    def stream_load(self, concurrency: int, per_connection: int) -> dict[str, Any]:
        before = self.cpu()
        result = self.streams(concurrency, per_connection,
                              dump_dir=self.workdir / "payloads" / f"{self.target.name}-usage")
        spent = self.cpu() - before
        measured = {"ttfb_p50": result.ttfb_p50_ms, "ttfb_p99": result.ttfb_p99_ms,
                    "total_p50": result.total_p50_ms, "total_p99": result.total_p99_ms, "ok": result.ok,
                    "errors": result.errors, "error_kinds": result.error_kinds, "digests": result.digests}
        done = result.ok + result.warmup_ok
        if self.target.measured and done:
            measured["cpu_ms"] = spent / done * 1e3
        return measured

    def plain_streams(self) -> dict[str, int]:
        """A few streams without include_usage: a gateway that injects it must strip it again."""
        result = self.streams(2, 2, include_usage=False, warmup=0, stagger=0.0,
                              dump_dir=self.workdir / "payloads" / f"{self.target.name}-plain")
        return result.digests

    def json_digest(self) -> str:
        """SHA-256 of one non-stream response body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.target.port, timeout=10)
        headers = {"Content-Type": "application/json"}
        if self.target.key:
            headers["Authorization"] = f"Bearer {self.target.key}"
        try:
            conn.request("POST", "/v1/chat/completions", body=JSON_BODY, headers=headers)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status == 200:
            self.tally.ok += 1
        return hashlib.sha256(body).hexdigest() if response.status == 200 else f"status {response.status}"

    def scenarios(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lat": self.latency()}
        log(f"  (a) c=1 p50 {out['lat']['p50']:.3f} ms")
        for connections in (32, 128):
            out[f"c{connections}"] = self.throughput(connections)
            log(f"  (b) c={connections} {out[f'c{connections}']['rps']:,.0f} req/s")
        for concurrency, per_connection in ((16, self.plan.streams_c16), (256, self.plan.streams_c256)):
            out[f"s{concurrency}"] = self.stream_load(concurrency, per_connection)
            log(f"  (c) streams c={concurrency} TTFB p50 {out[f's{concurrency}']['ttfb_p50']:.2f} ms, "
                f"errors {out[f's{concurrency}']['errors']}")
        out["plain_digests"] = self.plain_streams()
        out["stripped_digests"] = stripped_digests(self.workdir / "payloads" / f"{self.target.name}-usage")
        out["json_digest"] = self.json_digest()
        if self.target.measured:
            out["peak_rss_mib"] = procstat.memory_mib(self.target.pid, "VmHWM")
        return out

    def soak(self) -> dict[str, Any]:
        """Two capped wrk runs at c=32, RSS sampled after each."""
        samples, served, at = [], 0, []
        for _ in range(2):
            result = self.wrk(32, 3600, max_requests=self.plan.soak_half)
            served += result.requests
            time.sleep(0.5)  # let the last handlers and the usage writer finish
            samples.append(procstat.memory_mib(self.target.pid, "VmRSS"))
            at.append(served)
            log(f"  soak: {served:,} requests, RSS {samples[-1]:.1f} MiB")
        return {"rss_mib": samples, "at_requests": at}


def stripped_digests(folder: Path) -> list[str]:
    """Digests of these include_usage payloads with the usage-only event (``"choices": []``) removed.

    What a gateway that injects ``include_usage`` to bill a stream owes a client that did not ask for
    it (issue 7, part 3): every other event byte for byte as the backend sent it, ``"usage": null``
    included, and no usage-only chunk.
    """
    digests = set()
    for payload in folder.glob("*.sse"):
        events = payload.read_bytes().split(b"\n\n")
        kept = b"\n\n".join(e for e in events if b'"choices":[]' not in e)
        digests.add(hashlib.sha256(kept).hexdigest())
    return sorted(digests)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compare_to_direct(results: report.Results) -> None:
    """Fill each target's ``identical``: its payload digests against direct's."""
    direct = results.get("direct", {})
    if "error" in direct or "s16" not in direct:
        return
    for result in results.values():
        if "error" in result or "s16" not in result:
            continue
        result["identical"] = {
            "stream_usage": set(result["s16"]["digests"]) | set(result["s256"]["digests"])
            == set(direct["s16"]["digests"]),
            # as direct sent them without include_usage, or as direct sent them with it, minus the usage chunk
            "stream_plain": set(result["plain_digests"])
            <= set(direct["plain_digests"]) | set(direct.get("stripped_digests", ())),
            "json": result["json_digest"] == direct["json_digest"],
        }


def finish_lumen(runner: Runner, result: dict[str, Any]) -> None:
    """Soak, stop gracefully, then check the books against what the clients saw."""
    target = runner.target
    result["soak"] = runner.soak()
    result["exit_code"] = target.stop()
    result["exit_seconds"] = target.exit_seconds
    if target.config is None:
        raise targets.TargetError("lumen target has no config file")
    db = target.config.parent / "lumen.db"
    checks = {
        "usage_check": usage_check.check_usage_log(db, runner.tally.ok, runner.tally.in_flight),
        "coins_check": usage_check.check_coins(
            db, targets.lumen_admin(target.config, "accounts", "show", targets.LUMEN_ACCOUNT, "--json"),
            targets.LUMEN_ACCOUNT, targets.LUMEN_COINS),
    }
    for name, check in checks.items():
        result[name] = asdict(check)
        log(f"  {name}: {'ok' if check.ok else 'FAILED'}: {check.summary}; {check.detail}")


def start(name: str, workdir: Path, pin: Pinning, upstream: Target, keep_logs: bool) -> Target:
    if name == "direct":
        return upstream
    if name == "nginx":
        return targets.start_nginx(workdir, pin, upstream)
    if name == "bare-aiohttp":
        return targets.start_bare(workdir, pin, upstream)
    return targets.start_lumen(workdir, pin, upstream, workdir / "lumen-access.log" if keep_logs else None)


def bench(plan: Plan, pin: Pinning, workdir: Path, only: list[str], keep_logs: bool) -> report.Results:
    results: report.Results = {}
    with contextlib.ExitStack() as stack:
        upstream = targets.start_upstream(workdir, pin)
        stack.callback(upstream.stop)
        for name in report.TARGETS:
            if name not in only:
                results[name] = {"error": "not selected (--only)"}
                continue
            log(f"{name}:")
            try:
                target = start(name, workdir, pin, upstream, keep_logs)
                if target is not upstream:
                    stack.callback(target.stop)
                runner = Runner(plan, pin, workdir, target)
                results[name] = runner.scenarios()
                if name == "lumen":
                    finish_lumen(runner, results[name])
                elif target is not upstream:
                    target.stop()
            except (targets.TargetError, loadgen.LoadError, OSError, subprocess.SubprocessError) as exc:
                log(f"  failed: {exc}")
                results[name] = {"error": str(exc).splitlines()[0][:200]}
    compare_to_direct(results)
    return results


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


def environment(plan: Plan, pin: Pinning, load_before: str) -> list[str]:
    import aiohttp

    load_after = Path("/proc/loadavg").read_text().split()[0]
    busy = max(float(load_before), float(load_after)) > 1.0
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return [
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; mode: {plan.name} "
        f"(warm-up {plan.warmup_s}s; latency {plan.latency_s}s; throughput {plan.throughput_s}s per level; "
        f"streams {plan.streams_c16}/conn at c=16, {plan.streams_c256}/conn at c=256; "
        f"soak 2 × {plan.soak_half:,})",
        f"- machine: {os.cpu_count()} CPUs ({cpu}); load average before/after: {load_before} / {load_after}",
        *(["- **the machine was busy** (load average above 1: other processes shared both CPUs): "
           "throughput, p99 and CPU-per-request figures are pessimistic; rerun on a quiet machine"] if busy else []),
        f"- pinning: {pin.description}",
        f"- Python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
        f"{_version([targets.nginx_binary() or 'nginx', '-v'])}, {_version(['wrk', '-v'])}",
    ]


def write_readme(markdown: str) -> None:
    text = README.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < 0:
        log(f"{README} has no {README_START} ... {README_END} section: not updated")
        return
    README.write_text(text[:start + len(README_START)] + "\n" + markdown + "\n" + text[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs, payloads)")
    parser.add_argument("--keep-logs", action="store_true", help="write lumen's access log to the work dir")
    parser.add_argument("--only", default=",".join(report.TARGETS), help="comma-separated targets to run")
    parser.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    args = parser.parse_args()
    only = [name.strip() for name in args.only.split(",")]
    if "direct" not in only:
        only.insert(0, "direct")  # every comparison is against direct
    if shutil.which("wrk") is None:
        log("wrk is not installed: run  bash bench/setup.sh")
        return 2
    plan = QUICK if args.quick else FULL
    pin = targets.choose_pinning(not args.no_pin)
    if pin.load:
        os.sched_setaffinity(0, {int(pin.load[-1])})  # this script stays off the proxy's CPU
    load_before = Path("/proc/loadavg").read_text().split()[0]
    workdir = Path(tempfile.mkdtemp(prefix="lumen-bench-"))
    try:
        results = bench(plan, pin, workdir, only, args.keep_logs)
    finally:
        if args.keep:
            log(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    met, judged = report.verdicts(results)
    markdown = "\n".join([
        *environment(plan, pin, load_before),
        f"- targets met: {met} of {judged} judged",
        *report.errors(results),
        "",
        report.table(results),
    ])
    print(markdown)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"latest-{plan.name}.json").write_text(json.dumps(results, indent=1, default=str))
    (RESULTS_DIR / f"latest-{plan.name}.md").write_text(markdown + "\n")
    if plan is FULL and not args.no_readme and set(only) == set(report.TARGETS):
        write_readme(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Runs the README's Node.js examples (tests/node/*.mjs) with the real `openai` npm package.

The examples read LUMEN_API_KEY, LUMEN_BASE_URL and LUMEN_MODEL; everything else is the code a user
copies. `npm ci` installs the locked package the first time, as CI does on a fresh clone.

Use `arun_node_example` from async tests: a fake upstream or an in-process proxy served by the test's
own event loop can only answer while the loop runs, which a blocking `subprocess.run` would stop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

NODE_DIR = Path(__file__).parent / "node"
EXAMPLES = ("chat", "stream", "models", "responses")
NODE_TIMEOUT = 60.0  # seconds; an example talks to 127.0.0.1 only, so this is a hang, never slowness


def node_available() -> bool:
    return shutil.which("node") is not None


def ensure_node_modules(timeout: float = 300.0) -> None:
    """Install the locked npm packages unless they are there already."""
    if (NODE_DIR / "node_modules" / "openai" / "package.json").is_file():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH: cannot install tests/node's packages")
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=NODE_DIR,
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def node_command(name: str, base_url: str, api_key: str, model: str | None) -> tuple[list[str], dict[str, str]]:
    """argv and environment for one example; OPENAI_* is dropped so nothing reaches past the proxy."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown Node example {name!r}; known: {', '.join(EXAMPLES)}")
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUMEN_", "OPENAI_"))}
    env.update(LUMEN_BASE_URL=base_url, LUMEN_API_KEY=api_key)
    if model is not None:
        env["LUMEN_MODEL"] = model
    return [node, str(NODE_DIR / f"{name}.mjs")], env


def run_node_example(
    name: str, base_url: str, api_key: str, model: str | None = None, timeout: float = NODE_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run one example to completion (blocking); model None leaves the example's default, gpt-4o."""
    argv, env = node_command(name, base_url, api_key, model)
    return subprocess.run(argv, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=timeout)


async def arun_node_example(
    name: str, base_url: str, api_key: str, model: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Like run_node_example, but the event loop keeps serving while Node runs; killed on cancel."""
    argv, env = node_command(name, base_url, api_key, model)
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=NODE_DIR, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), NODE_TIMEOUT)
    except (TimeoutError, asyncio.CancelledError):
        process.kill()
        await process.wait()
        raise
    returncode = await process.wait()  # already exited: this only reads the status
    return subprocess.CompletedProcess(argv, returncode, stdout.decode(), stderr.decode())

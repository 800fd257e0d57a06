"""The systemd side: sd_notify over a real socket, the unit file as systemd itself reads it, and
the unit's promises about the package (console script, options, memory W^X, notify lifecycle)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

from lumen_proxy import sdnotify
from lumen_proxy.config import Config
from lumen_proxy.server import STOP_AFTER_GRACE

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "lumen-proxy.service"
DOCS = ROOT / "README.md"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze missing: apt-get install --no-install-recommends systemd"
)


# --- sd_notify -----------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd's; the path stays under the 108-byte limit."""
    path = str(tmp_path_factory.mktemp("sd") / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        yield sock, path


def _receive(sock: socket.socket, timeout: float = 5.0) -> str:
    assert select.select([sock], [], [], timeout)[0], f"no datagram within {timeout}s"
    return sock.recv(4096).decode()


def test_notify_sends_one_datagram(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)

    assert sdnotify.notify("READY=1") is True
    assert _receive(sock) == "READY=1"


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"lumen-proxy-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)

        assert sdnotify.notify("STOPPING=1") is True
        assert _receive(sock) == "STOPPING=1"


@pytest.mark.parametrize("value", [None, "", "relative/notify", "vsock:2:1234"])
def test_notify_outside_systemd_is_a_no_op(value: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)

    assert sdnotify.notify("READY=1") is False


def test_notify_to_a_dead_socket_logs_and_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))

    assert sdnotify.notify("READY=1") is False
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "sd_notify" in caplog.text


def test_reloading_carries_the_monotonic_timestamp(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    assert sdnotify.reloading() is True

    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, stamp = _receive(sock).split("\n")
    assert reloading == "RELOADING=1"
    assert stamp.startswith("MONOTONIC_USEC=")
    assert before <= int(stamp.removeprefix("MONOTONIC_USEC=")) <= after


def test_ready_and_stopping_carry_a_status(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)

    sdnotify.ready()
    sdnotify.ready("listening on 127.0.0.1:8080")
    sdnotify.stopping("draining 3 streams")

    assert _receive(sock) == "READY=1"
    assert _receive(sock) == "READY=1\nSTATUS=listening on 127.0.0.1:8080"
    assert _receive(sock) == "STOPPING=1\nSTATUS=draining 3 streams"


def test_status_text_cannot_inject_an_assignment(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)

    sdnotify.status("bad config\nREADY=1")

    assert _receive(sock) == "STATUS=bad config READY=1"


# --- the unit file -------------------------------------------------------------------------------


def _unit_settings() -> dict[str, list[str]]:
    """`Section.Key` -> values in file order (systemd keys may repeat, so no configparser)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def _exec_start() -> list[str]:
    [command] = _unit_settings()["Service.ExecStart"]
    return command.split()


def _installed_command() -> Path | None:
    """The `lumen-proxy` script of this interpreter's environment, else the one on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "lumen-proxy"
    if beside.is_file():
        return beside
    found = shutil.which("lumen-proxy")
    return None if found is None else Path(found)


def _verify(unit_text: str, directory: Path) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify` on a copy: its exit status and the output lines about the copy.

    verify only checks that ExecStart's binary exists, so the copy points at the installed
    `lumen-proxy` (or a stub when the package is not installed: the command's identity is
    test_exec_start_runs_the_console_script's job). Lines about other units on the host are noise.
    """
    binary = _installed_command()
    if binary is None:
        binary = directory / "lumen-proxy"
        binary.write_text("#!/bin/sh\nexit 0\n")
        binary.chmod(0o755)
    copy = directory / "lumen-proxy.service"
    copy.write_text(unit_text.replace("/opt/lumen-proxy/venv/bin/lumen-proxy", str(binary)))
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    output = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in output if "lumen-proxy.service" in line]


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert _verify(UNIT.read_text(), tmp_path) == (0, [])


@needs_systemd_analyze
def test_verify_reports_a_mistake_in_our_unit(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("[Service]\n", "[Service]\nTimeoutStopSecs=45\n", 1)

    _, complaints = _verify(broken, tmp_path)

    assert any("TimeoutStopSecs" in line for line in complaints)


def test_exec_start_runs_the_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    binary, *arguments = _exec_start()

    assert binary == "/opt/lumen-proxy/venv/bin/lumen-proxy"
    assert Path(binary).name in scripts
    assert arguments == ["serve", "--config", "/etc/lumen-proxy/lumen.yaml"]


def test_unit_directories_hold_the_config_and_database() -> None:
    settings = _unit_settings()
    config = Path(_exec_start()[-1])

    assert settings["Service.Type"] == ["notify"]
    assert settings["Service.ConfigurationDirectory"] == [config.parent.name]
    assert settings["Service.StateDirectory"] == ["lumen-proxy"]
    assert settings["Service.User"] == ["lumen"]


def _default_grace() -> float:
    return float(next(f.default for f in dataclasses.fields(Config) if f.name == "shutdown_grace"))


def test_stop_timeout_fits_the_whole_stop_of_the_default_grace() -> None:
    """A stop takes at most shutdown_grace + STOP_AFTER_GRACE (cut, close, flush); then systemd kills."""
    [timeout] = _unit_settings()["Service.TimeoutStopSec"]
    assert int(timeout) >= _default_grace() + STOP_AFTER_GRACE + 5  # 5 s for the interpreter's exit


def test_docs_give_the_stop_bound_and_a_timeout_that_fits_it() -> None:
    docs = " ".join(DOCS.read_text().split())
    [timeout] = _unit_settings()["Service.TimeoutStopSec"]
    margin = int(timeout) - _default_grace()

    assert f"at most `shutdown_grace` + {STOP_AFTER_GRACE:g} s" in docs
    assert f"`TimeoutStopSec={timeout}` (`shutdown_grace` + {margin:g})" in docs
    example = re.search(r"`shutdown_grace: (\d+)` in `lumen.yaml`, .*?`TimeoutStopSec=(\d+)`", docs)
    assert example is not None
    assert int(example[2]) - int(example[1]) == margin


def test_docs_name_what_the_unit_names() -> None:
    docs = DOCS.read_text()
    [user] = _unit_settings()["Service.User"]
    for expected in [
        *_exec_start(),
        "/var/lib/lumen-proxy/lumen.db",
        "/etc/lumen-proxy/env",
        f"sudo -u {user}",
    ]:
        assert expected in docs


@pytest.mark.parametrize("arguments", [["serve", "--help"], ["--help"]], ids=["serve", "admin"])
def test_installed_command_takes_the_unit_options(arguments: list[str]) -> None:
    command = _installed_command()
    if command is None or find_spec("lumen_proxy.cli") is None:
        pytest.skip("lumen-proxy is not installed yet (pip install -e '.[test]')")

    result = subprocess.run([command, *arguments], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


# --- MemoryDenyWriteExecute ----------------------------------------------------------------------

# PR_SET_MDWE (Linux >= 6.3) is the kernel's own form of systemd's MemoryDenyWriteExecute= (which
# newer systemd uses when available): no mapping may be writable and executable, and none may
# become executable later. It survives execve, so it also covers the console script.
_DENY_WRITE_EXECUTE = """
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77 if ctypes.get_errno() == 22 else 1)
try:
    mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    sys.exit("a writable+executable mapping was allowed: W^X is not in force")
"""

# Loads what the server loads, then lists the compiled extension modules it brought in.
_LOAD_STACK = """
import importlib, importlib.machinery, json, pkgutil, sys
import aiohttp.web, aiosqlite, orjson, sqlite3, uvloop, yaml
import lumen_proxy
for module in pkgutil.walk_packages(lumen_proxy.__path__, "lumen_proxy."):
    if module.name != "lumen_proxy.__main__":
        importlib.import_module(module.name)
suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
extensions = sorted(
    name for name, m in list(sys.modules.items()) if (getattr(m, "__file__", None) or "").endswith(suffixes)
)
"""

# A request through aiohttp on uvloop, a JSON body by orjson, a row through aiosqlite in WAL mode.
_SMOKE = """
import asyncio, pathlib, tempfile
from aiohttp import ClientSession, web

async def smoke():
    async def hello(request):
        return web.Response(body=orjson.dumps({"ok": True}), content_type="application/json")
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    async with ClientSession() as session, session.get(f"http://{host}:{port}/") as response:
        assert await response.json() == {"ok": True}
    await runner.cleanup()
    with tempfile.TemporaryDirectory() as tmp:
        async with aiosqlite.connect(pathlib.Path(tmp) / "t.db") as db:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("CREATE TABLE t (x INTEGER)")
            await db.execute("INSERT INTO t VALUES (1)")
            await db.commit()
            async with db.execute("SELECT x FROM t") as cursor:
                assert await cursor.fetchall() == [(1,)]

uvloop.run(smoke())
"""


def test_server_stack_runs_without_writable_executable_memory() -> None:
    listing = subprocess.run(
        [sys.executable, "-c", _LOAD_STACK + "print(json.dumps(extensions))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    extensions = json.loads(listing.stdout)
    assert "uvloop.loop" in extensions

    imports = "".join(f"importlib.import_module({name!r})\n" for name in extensions)
    restricted = subprocess.run(
        [sys.executable, "-c", _DENY_WRITE_EXECUTE + _LOAD_STACK + imports + _SMOKE],
        capture_output=True,
        text=True,
        timeout=60,
    )

    if restricted.returncode == 77:
        pytest.skip("kernel < 6.3 has no PR_SET_MDWE to emulate MemoryDenyWriteExecute=")
    assert restricted.returncode == 0, restricted.stderr


# --- the real server under a stand-in systemd ----------------------------------------------------

# Exec the server with W^X in force when the kernel offers it, as the unit will run it.
_LAUNCH = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(65, 1, 0, 0, 0)
os.execv(sys.argv[1], sys.argv[1:])
"""


class _Manager:
    """The service-manager end of $NOTIFY_SOCKET: remembers every assignment it is sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seen: list[str] = []

    def wait_for(self, assignment: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
            message = self.sock.recv(4096).decode()
            self.seen.append(message)
            if assignment in message.split("\n"):
                return message
        pytest.fail(f"no {assignment} within {timeout}s; received {self.seen}")


@pytest.fixture
def start_server(
    notify_socket: tuple[socket.socket, str], tmp_path: Path
) -> Iterator[Callable[[Path], tuple[subprocess.Popen[bytes], _Manager]]]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(config: Path) -> tuple[subprocess.Popen[bytes], _Manager]:
        command = _installed_command()
        assert command is not None
        env = {**os.environ, "NOTIFY_SOCKET": notify_socket[1]}
        with (tmp_path / "server.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, str(command), "serve", "--config", str(config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        processes.append(process)
        return process, _Manager(notify_socket[0])

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def _serve_config(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A copy of the conftest's `serve_config` (a valid lumen.yaml: free port, tmp database),
    so the test can break it without touching a file other tests share."""
    if _installed_command() is None or find_spec("lumen_proxy.cli") is None:
        pytest.skip("lumen-proxy is not installed yet (pip install -e '.[test]')")
    try:
        config: Path = request.getfixturevalue("serve_config")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py has no `serve_config` fixture (path to a valid lumen.yaml) yet")
    if config.parent == tmp_path:  # the fixture already wrote a private file for this test
        return config
    copy = tmp_path / "lumen.yaml"
    shutil.copyfile(config, copy)
    return copy


def test_serve_speaks_sd_notify_through_reload_and_stop(
    request: pytest.FixtureRequest,
    start_server: Callable[[Path], tuple[subprocess.Popen[bytes], _Manager]],
    tmp_path: Path,
) -> None:
    config = _serve_config(request, tmp_path)
    process, manager = start_server(config)
    manager.wait_for("READY=1")

    process.send_signal(signal.SIGHUP)
    reload = manager.wait_for("RELOADING=1")
    manager.wait_for("READY=1")

    config.write_text("this: [is not valid yaml\n")
    process.send_signal(signal.SIGHUP)
    manager.wait_for("RELOADING=1")
    manager.wait_for("READY=1")  # a rejected file must still end the reload, or systemd waits
    assert process.poll() is None

    process.send_signal(signal.SIGTERM)
    manager.wait_for("STOPPING=1")
    assert process.wait(timeout=45) == 0
    assert re.search(r"^MONOTONIC_USEC=\d+$", reload, re.MULTILINE)

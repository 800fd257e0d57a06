"""Demo mode (the embedded default config): one demo account and key, created once.

The key is kept in ``demo.key`` (mode 600) beside the demo database, because only its hash is in
the database. It is printed on start when stderr is a terminal; otherwise only the file's path is
(keys never go to logs). So is a one-time sign-in link to the portal.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import cast

from .portal.records import PortalRecords
from .runtime import Runtime
from .sqlite_store import SqliteStore
from .store import NoSuchRecord

log = logging.getLogger("lumen_proxy")
DEMO_ACCOUNT = "demo"
DEMO_COINS = 100 * 1_000_000


def demo_key_path(database: Path) -> Path:
    return database.parent / "demo.key"


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")


async def bootstrap_demo(rt: Runtime) -> None:
    key_file = demo_key_path(rt.config.database)
    try:
        await rt.store.account(DEMO_ACCOUNT)
    except NoSuchRecord:
        await rt.store.add_account(DEMO_ACCOUNT, DEMO_COINS, group=rt.config.default_group)
        key, _row = await rt.store.create_key(DEMO_ACCOUNT, label="demo")
        _write_secret(key_file, key)
        await rt.view.reload()
    shown = key_file.read_text().strip() if key_file.exists() else None
    host, port = rt.config.host, rt.config.port
    lines = ["Lumen proxy is running in demo mode (no config file): the models gpt-4o and echo are "
             "served by the built-in echo backend."]
    if shown and sys.stderr.isatty():
        lines.append(f"Demo API key: {shown}")
    lines.append(f"The demo API key is in {key_file}. Try:")
    lines.append(f'  curl http://{host}:{port}/v1/chat/completions -H "Authorization: Bearer $(cat {key_file})" '
                 '-H "Content-Type: application/json" '
                 '-d \'{"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}\'')
    portal = rt.config.portal_url
    if sys.stderr.isatty():  # a sign-in link is a credential: a terminal's, never a journal's
        token, _ = await PortalRecords(cast(SqliteStore, rt.store)).create_link(DEMO_ACCOUNT)
        lines.append(f"Portal (API keys, usage): sign in once within 15 minutes at {portal}/login/link/{token}")
    else:
        lines.append(f"Portal (API keys, usage): {portal}/ ; a sign-in link: lumen-proxy accounts login-link "
                     f"{DEMO_ACCOUNT}")
    for line in lines:
        log.warning(line)

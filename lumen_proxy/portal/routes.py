"""The portal's routes, templates and state, added to the app by :func:`setup_portal`.

The portal's state (its records, the OIDC client and its pending flows, the sign-in attempt
windows) is built in a cleanup context after the runtime's, and closed before it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import aiohttp
import aiohttp_jinja2
import jinja2
from aiohttp import web

from .. import __version__
from ..billing import to_coins
from ..ratelimit import RateLimiter
from ..runtime import RUNTIME
from ..sqlite_store import SqliteStore
from . import chat_page, keys_page, signin, usage_page
from .guard import PORTAL, PortalState, Viewer, signed_in
from .keys_page import when
from .oidc import Flows, OidcClient
from .records import PortalRecords

HERE = Path(__file__).parent
OIDC_TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5)


@signed_in
async def home(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    raise web.HTTPSeeOther("/usage")


async def _portal_state(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    async with aiohttp.ClientSession(timeout=OIDC_TIMEOUT) as http:
        app[PORTAL] = PortalState(records=PortalRecords(cast(SqliteStore, rt.store)), oidc=OidcClient(http),
                                  flows=Flows(), attempts=RateLimiter())
        yield


def setup_portal(app: web.Application) -> None:
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    env.filters["when"] = when
    env.filters["coins"] = lambda micro: usage_page.coins_text(to_coins(micro))
    app.cleanup_ctx.append(_portal_state)
    add = app.router
    add.add_get("/", home)
    add.add_get("/login", signin.login_page)
    add.add_get("/login/oidc", signin.oidc_start)
    add.add_get("/login/oidc/callback", signin.oidc_callback)
    add.add_get("/login/link/{token}", signin.link_page)
    add.add_post("/login/link/{token}", signin.link_use)
    add.add_post("/logout", signin.logout)
    add.add_get("/keys", keys_page.keys_page)
    add.add_post("/keys", keys_page.create_key)
    add.add_get("/keys/{key_id}/revoke", keys_page.revoke_confirm)
    add.add_post("/keys/{key_id}/revoke", keys_page.revoke_key)
    add.add_get("/usage", usage_page.usage_page)
    add.add_get("/usage/live.json", usage_page.live)
    add.add_get("/usage.csv", usage_page.export)
    add.add_get("/chat", chat_page.chat_page)
    add.add_post("/chat/completions", chat_page.chat_completions)
    add.add_get("/usage/request/{request_id}.json", chat_page.request_cost)
    add.add_static("/static/", HERE / "static")
    env.globals["version"] = __version__

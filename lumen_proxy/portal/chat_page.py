"""The portal's Chat page: a signed-in person talks to the models their account may use.

The page's script posts OpenAI chat requests to ``/chat/completions``, which goes through the same
relay as the API (:func:`~..relay.relay_as`): the same admission, hold, limits, byte-for-byte
stream and usage row, as the signed-in account, with key id 0 (shown as "Chat" on the Usage page)
and a rate-limit window of its own. It is authenticated by the session cookie and its CSRF token
(sent in a header by the script), never by a key the page could read. Stop aborts the request: the
relay sees the client leave, cancels the backend's request and bills the partial answer.

Lumen keeps no prompt and no answer: conversations live in the browser's local storage only.
After each answer the script reads what it cost from ``/usage/request/<id>.json``, the usage row
the relay wrote (the account's own rows only).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..auth import Principal, visible_models
from ..billing import to_coins
from ..endpoints import ENDPOINTS
from ..relay import relay_as
from ..runtime import RUNTIME
from .guard import HEADERS, PORTAL, Viewer, render, signed_in

CHAT = ENDPOINTS["/v1/chat/completions"]
PORTAL_KEY_ID = 0  # usage rows of the portal's chat carry no key


@signed_in
async def chat_page(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    models = [m.name for m in visible_models(rt.config, viewer.account) if m.backends_for(CHAT.api)]
    return render(request, "chat.html", {"viewer": viewer, "models": models})


@signed_in
async def chat_completions(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """The chat page's requests: the API's chat completions, as the signed-in account."""
    return await relay_as(request, Principal(PORTAL_KEY_ID, viewer.account), CHAT)


@signed_in
async def request_cost(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """What one request of the account cost (its usage row), or 404 while it is not written yet."""
    row = await request.app[PORTAL].records.request_row(viewer.account.id, request.match_info["request_id"])
    body: dict[str, Any]
    if row is None:
        body, status = {"error": "not recorded yet"}, 404
    else:
        model, status_code, prompt, completion, cost, partial = row
        body, status = {"model": model, "status": status_code, "prompt_tokens": prompt,
                        "completion_tokens": completion, "cost": to_coins(cost), "partial": bool(partial)}, 200
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=HEADERS)

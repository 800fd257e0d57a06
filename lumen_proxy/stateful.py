"""The Responses API's stateful calls, relayed to the backend that holds the response.

``GET``/``DELETE /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel`` and
``GET /v1/responses/{id}/input_items`` go to the backend :class:`.owners.ResponseOwners` names, and only
for the account that made the response (a create with ``previous_response_id`` is pinned the same
way, in the relay).
"""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web

from .auth import require_model
from .backends import Upstream, connect, upstream_headers
from .builtin import EchoUpstream
from .config import Backend
from .delegation import principal_of
from .errors import REQUEST_ID, RateLimited
from .owners import holder, not_found
from .ratelimit import Refusal
from .relay import answer_response, key_subjects, read_answer
from .runtime import RUNTIME


async def follow_up(request: web.Request) -> web.StreamResponse:
    """Relay a stateful call on a response to the backend that made it, for the account that made it.

    Not billed (nothing is generated); counted by the key's and account's rate limits like any request,
    before the id is looked at.
    """
    rt = request.app[RUNTIME]
    principal = await principal_of(request)
    admission = await rt.limiter.admit(key_subjects(rt, principal), 0, request[REQUEST_ID])
    if isinstance(admission, Refusal):  # first: probing ids counts against the key's limits like any request
        raise RateLimited(admission.message, headers=admission.headers())
    try:
        response_id = request.match_info["response_id"]
        owner = rt.responses.owner(response_id, principal.account.id)
        if owner is None:
            raise not_found(response_id)
        model, held = holder(rt.config, owner, response_id)
        require_model(rt.config, principal.account, model.name)  # access may have been taken away since
        action = request.match_info.get("action")
        path = "/responses/" + quote(response_id, safe="") + ("/" + action if action else "")
        query = "?" + request.query_string if request.query_string else ""

        async def dial(backend: Backend) -> Upstream:
            if backend.is_builtin:
                return EchoUpstream(path + query, None, rt.echo, request.method)
            headers = upstream_headers(request.headers, backend, request[REQUEST_ID])
            return await rt.client.send(request.method, backend, path + query, None, headers)

        _, upstream = await connect(rt.pool, model, dial, account=principal.account.id, backends=(held,))
        try:
            if request.method == "DELETE" and upstream.status == 200 and not action:
                rt.responses.forget(response_id)
            data = await read_answer(upstream, rt.config.max_response_bytes, request[REQUEST_ID])
            return answer_response(upstream, {"x-request-id": request[REQUEST_ID], **admission.headers()}, data)
        finally:
            upstream.close()
    finally:
        admission.finish(0)

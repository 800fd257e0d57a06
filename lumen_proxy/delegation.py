"""Delegating keys: one key of a shared front end (Open WebUI) acting for each of its users.

Open WebUI with ``ENABLE_FORWARD_USER_INFO_HEADERS=true`` sends ``X-OpenWebUI-User-Email`` (and
``-User-Name``, URL-quoted, ``-User-Id``, ``-User-Role``) with every request. When the key is a
delegating key (``keys create --delegate``) and the configured header (``delegation.header``) names
someone, the request is authenticated, limited, held, billed and logged as that person's account
(matched by name, else email); the usage row keeps the delegating key's id. From any other key the
header means nothing, and a delegating key without it is its own account. Someone the front end names
who has no account follows ``portal.new_accounts`` (created, or 403).
"""

from __future__ import annotations

from urllib.parse import unquote

from aiohttp import web

from .auth import Principal, credentials
from .errors import ModelNotAllowed
from .newcomers import NotAdmitted, admit_newcomer
from .runtime import RUNTIME, Runtime

MAX_NAME = 320  # an email address at most


async def principal_of(request: web.Request) -> Principal:
    """The key's principal, or the person its delegating key's request names."""
    rt = request.app[RUNTIME]
    principal = await rt.view.identify(credentials(request.headers))
    if not principal.delegate:
        return principal
    named = request.headers.get(rt.config.delegation_header)
    who = unquote(named).strip()[:MAX_NAME] if named is not None else ""
    if not who:  # absent, or nothing once decoded: the key's own account
        return principal
    return await _acting_for(rt, principal, who)


async def _acting_for(rt: Runtime, principal: Principal, who: str) -> Principal:
    person = rt.view.person(who)
    if person is None:
        try:
            person = await admit_newcomer(rt, who, how="request through a delegating key")
        except NotAdmitted as refused:
            raise ModelNotAllowed(str(refused), code="account_not_found") from None
    if not person.enabled:
        raise ModelNotAllowed(f"The account {person.name!r} is disabled. Contact your administrator.",
                              code="account_disabled")
    return Principal(principal.key_id, person, delegate=True, acting=True)

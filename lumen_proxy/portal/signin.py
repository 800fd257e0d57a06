"""The sign-in and sign-out routes: the sign-in page, OpenID Connect, one-time links.

A link's GET only shows a button; the POST spends it. Mail scanners and chat previews fetch links
to look at them, and would otherwise burn a one-time link before its owner clicks it. Every attempt
(starting OIDC, its callback, spending a link) counts against ``portal.signin_per_minute`` per client
address before anything is looked up.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from ..runtime import RUNTIME
from .guard import (
    COOKIE,
    PORTAL,
    Problem,
    Viewer,
    admit_attempt,
    base_url,
    next_path,
    page,
    read_form,
    render,
    same_origin,
    secure_url,
    set_session_cookie,
    signed_in,
    viewer_of,
)
from .oidc import SignInFailed
from .people import account_for
from .settings import Oidc

log = logging.getLogger("lumen_proxy")
FLOW_COOKIE = "lumen_signin"


@page
async def login_page(request: web.Request) -> web.StreamResponse:
    if await viewer_of(request) is not None:
        raise web.HTTPSeeOther(next_path(request.query.get("next")))
    portal = request.app[RUNTIME].config.portal
    return render(request, "login.html", {"viewer": None, "portal": portal,
                                          "next": next_path(request.query.get("next"))})


@page
async def oidc_start(request: web.Request) -> web.StreamResponse:
    rt, state = request.app[RUNTIME], request.app[PORTAL]
    settings = _oidc_attempt(request)
    flow, cookie = state.flows.start(next_path(request.query.get("next")))
    target = await state.oidc.authorize_url(settings, base_url(request) + settings.callback_path, flow)
    response = web.Response(status=303, headers={"Location": target})
    response.set_cookie(FLOW_COOKIE, cookie, max_age=600, path="/login/oidc", httponly=True, samesite="Lax",
                        secure=secure_url(rt))
    return response


@page
async def oidc_callback(request: web.Request) -> web.StreamResponse:
    rt, state = request.app[RUNTIME], request.app[PORTAL]
    settings = _oidc_attempt(request)
    query = request.query
    if "error" in query:
        raise SignInFailed(f"The identity provider did not sign you in ({query['error'][:60]}).")
    if not query.get("code") or not query.get("state"):
        raise SignInFailed("The identity provider's answer has no code or state.")
    flow = state.flows.finish(query["state"], request.cookies.get(FLOW_COOKIE))
    claims = await state.oidc.finish(settings, base_url(request) + settings.callback_path, flow, query["code"])
    who = claims.get(settings.account_claim)
    if not isinstance(who, str):
        raise Problem(403, "No account", f"Your identity provider did not send the {settings.account_claim!r} claim "
                                         "that names your account. Contact your administrator.")
    verified = claims.get("email_verified") in (True, "true")
    if settings.account_claim == "email" and claims.get("email_verified") in (False, "false"):
        raise Problem(403, "Email not verified", "Your identity provider says your email address is not verified.")
    # Only a verified address is kept (it names the account at later sign-ins): an unverified one could
    # be anyone's.
    email = claims["email"] if verified and isinstance(claims.get("email"), str) else None
    account = await account_for(rt, state.records, who.strip(), email=email, group=_mapped_group(settings, claims))
    response = await _signed_in_response(request, account.id, "oidc", flow.next)
    response.del_cookie(FLOW_COOKIE, path="/login/oidc")
    return response


def _oidc_attempt(request: web.Request) -> Oidc:
    """The OIDC settings (404 page when there are none), after counting the attempt (429 page)."""
    settings = request.app[RUNTIME].config.portal.oidc
    if settings is None:
        raise Problem(404, "Not configured", "Single sign-on is not configured on this server.")
    admit_attempt(request)
    return settings


def _mapped_group(settings: Oidc, claims: dict[str, Any]) -> str | None:
    if settings.groups_claim is None:
        return None
    theirs = claims.get(settings.groups_claim)
    names = {theirs} if isinstance(theirs, str) else {g for g in theirs if isinstance(g, str)} \
        if isinstance(theirs, list) else set()
    return next((lumen for outside, lumen in settings.groups if outside in names), None)


@page
async def link_page(request: web.Request) -> web.StreamResponse:
    # The page loads nothing from elsewhere, so its URL (the token) goes to no one else. Not
    # "no-referrer": with it, browsers send "Origin: null" on the Sign in POST, which the Origin check refuses.
    return render(request, "link.html", {"viewer": None})


@page
async def link_use(request: web.Request) -> web.StreamResponse:
    rt, state = request.app[RUNTIME], request.app[PORTAL]
    if not rt.config.portal.login_links:
        raise Problem(404, "Not configured", "Sign-in links are turned off on this server.")
    admit_attempt(request)
    if not same_origin(request):
        raise Problem(403, "Refused", "Open the sign-in link itself, then press Sign in.")
    await read_form(request)
    used = await state.records.use_link(request.match_info["token"])
    if used.account_id is None:
        raise Problem(400, "Sign-in link not valid", used.problem or "")
    account = rt.view.accounts.get(used.account_id)
    if account is None or not account.enabled:
        raise Problem(403, "Account disabled", "This account is disabled. Contact your administrator.")
    return await _signed_in_response(request, account.id, "link", next_path(request.query.get("next")))


async def _signed_in_response(request: web.Request, account_id: int, method: str, target: str,
                              ) -> web.StreamResponse:
    rt, state = request.app[RUNTIME], request.app[PORTAL]
    old = request.cookies.get(COOKIE)
    if old:
        await state.records.close_session(old)  # a new sign-in never reuses a session id (fixation)
    sid, session = await state.records.open_session(account_id, method, rt.config.portal.session_hours)
    log.info("portal: account %s signed in (%s)", account_id, method)
    response = web.Response(status=303, headers={"Location": target})
    set_session_cookie(request, response, sid, session)
    return response


@signed_in
async def logout(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    rt, state = request.app[RUNTIME], request.app[PORTAL]
    await state.records.close_session(viewer.sid)
    header = rt.config.portal.trusted_header
    target = header.logout_url if header is not None and header.logout_url and viewer.session.method == "header" \
        else "/login"
    response = web.Response(status=303, headers={"Location": target or "/login"})
    response.del_cookie(COOKIE, path="/")
    return response

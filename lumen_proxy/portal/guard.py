"""Who is looking at a portal page, and what every portal response carries.

A request is signed in by its session cookie, or, from a configured reverse proxy only, by the
trusted header (which then opens a session of its own, so forms get a CSRF token). Every
state-changing request must carry the session's CSRF token *and* come from the portal's own origin
(``Origin``, else ``Referer``; neither is refused): both, because a token alone does not stop a
page on a sibling subdomain that can set cookies, and Origin alone trusts old browsers.

The ``/v1`` API never reads these cookies (keys travel in headers only), so the API's CORS stays
as it was. Portal responses are never cached, never framed, and load nothing but this origin's
own files (a Content-Security-Policy with no inline script).
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from yarl import URL

from ..ratelimit import LimitSpec, RateLimiter, Refusal
from ..runtime import RUNTIME, Runtime
from ..store import AccountRow, StoreError
from .oidc import Flows, OidcClient, SignInFailed
from .records import PortalRecords, Session

log = logging.getLogger("lumen_proxy")
COOKIE = "lumen_session"
MAX_FORM = 64 * 1024
HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class PortalState:
    records: PortalRecords
    oidc: OidcClient
    flows: Flows
    attempts: RateLimiter  # sign-in attempts per client address


PORTAL = web.AppKey("portal", PortalState)


@dataclass(frozen=True, slots=True)
class Viewer:
    account: AccountRow
    session: Session
    sid: str
    opened: bool = False  # a session this request opened: its cookie must be set


class Problem(Exception):
    """A portal failure shown as a page (never as the API's JSON)."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ViewerHandler = Callable[[web.Request, Viewer], Awaitable[web.StreamResponse]]


def secure_url(rt: Runtime) -> bool:
    return (rt.config.public_url or "").startswith("https://")


def base_url(request: web.Request) -> str:
    """The portal's address as browsers see it: ``public_url``, else this request's own origin."""
    configured = request.app[RUNTIME].config.public_url
    return configured if configured else str(request.url.origin())


def render(request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    response.headers.update(HEADERS)
    return response


def page(handler: Handler) -> Handler:
    """A portal route: its problems become pages, and every response gets the portal's headers."""
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except Problem as problem:
            return render(request, "message.html", {"title": problem.title, "message": problem.message,
                                                    "viewer": None}, problem.status)
        except SignInFailed as failed:
            return render(request, "message.html", {"title": "Sign-in failed", "message": str(failed),
                                                    "viewer": None, "retry": "/login"}, 400)
        except StoreError as exc:
            log.error("portal %s %s: storage: %s", request.method, request.path, exc)
            return render(request, "message.html", {"title": "Try again shortly", "viewer": None,
                                                    "message": "The database is busy or unavailable."}, 503)
        if not response.prepared:
            for name, value in HEADERS.items():
                response.headers.setdefault(name, value)
        return response
    return wrapped


def set_session_cookie(request: web.Request, response: web.StreamResponse, sid: str, session: Session) -> None:
    rt = request.app[RUNTIME]
    response.set_cookie(COOKIE, sid, max_age=int(rt.config.portal.session_hours * 3600), path="/",
                        httponly=True, samesite="Lax", secure=secure_url(rt))


def client_address(request: web.Request) -> str:
    return request.remote or "-"


def admit_attempt(request: web.Request) -> None:
    """Sign-in attempts per client address; over the limit, a 429 page (no account is looked up)."""
    rt, state = request.app[RUNTIME], request.app[PORTAL]
    spec = LimitSpec(rpm=rt.config.portal.signin_per_minute)
    outcome = state.attempts.admit([(f"signin:{client_address(request)}", spec)], 0)
    if isinstance(outcome, Refusal):
        wait = int(outcome.retry_after or 60) + 1
        raise Problem(429, "Too many sign-in attempts",
                      f"Too many sign-in attempts from your address. Try again in {wait} s.")
    outcome.finish(0)


def same_origin(request: web.Request) -> bool:
    """The request comes from a page of the portal itself (``Origin``, else ``Referer``)."""
    claimed = request.headers.get("Origin")
    if claimed is None and request.headers.get("Referer"):
        try:
            claimed = str(URL(request.headers["Referer"]).origin())
        except ValueError:  # a relative or malformed Referer names no origin
            return False
    if not claimed or claimed == "null":
        return False
    configured = request.app[RUNTIME].config.public_url
    if configured:
        return claimed == str(URL(configured).origin())
    return URL(claimed).raw_authority == request.host  # no public_url: the Host this browser asked for


async def read_form(request: web.Request) -> dict[str, str]:
    if request.content_length is None or request.content_length > MAX_FORM:
        raise Problem(413, "Form too large", "This form is larger than any the portal sends.")
    form = await request.post()
    return {name: value for name, value in form.items() if isinstance(value, str)}


async def viewer_of(request: web.Request) -> Viewer | None:
    """The signed-in person, from the trusted header (trusted proxies only) or the session cookie."""
    rt, state = request.app[RUNTIME], request.app[PORTAL]
    sid = request.cookies.get(COOKIE)
    current = await state.records.session(sid) if sid else None
    header = rt.config.portal.trusted_header
    if header is not None and header.header in request.headers:
        if header.trusts(request.remote):
            from .people import account_for  # people imports this module's PortalState

            account = await account_for(rt, state.records, request.headers[header.header].strip(), email=None,
                                        group=None)
            if current is not None and sid is not None:
                if current.account_id == account.id:
                    return Viewer(account, current, sid)
                await state.records.close_session(sid)  # the proxy now names someone else: end the old session
            new_sid, session = await state.records.open_session(account.id, "header", rt.config.portal.session_hours)
            return Viewer(account, session, new_sid, opened=True)
        log.warning("portal: ignored the %s header from %s (not a trusted proxy)", header.header,
                    client_address(request))
    if current is None or sid is None:
        return None
    known = rt.view.accounts.get(current.account_id)
    if known is None or not known.enabled:  # disabled (or deleted) since: the session ends here
        await state.records.close_session(sid)
        return None
    return Viewer(known, current, sid)


def signed_in(handler: ViewerHandler) -> Handler:
    """A page for signed-in people; others are sent to the sign-in page."""
    @page
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        viewer = await viewer_of(request)
        if viewer is None:
            if request.method != "GET" or request.path.endswith(".json"):
                raise Problem(401, "Signed out", "Your session has ended. Sign in again.")
            raise web.HTTPSeeOther(str(URL("/login").with_query({"next": request.path_qs})))
        if request.method == "POST":
            await _check_post(request, viewer)
        response = await handler(request, viewer)
        if viewer.opened and not response.prepared:
            set_session_cookie(request, response, viewer.sid, viewer.session)
        return response
    return wrapped


async def _check_post(request: web.Request, viewer: Viewer) -> None:
    if not same_origin(request):
        raise Problem(403, "Refused", "This request did not come from a portal page (its Origin is missing or "
                                      "another site's). Reload the page and try again.")
    token = request.headers.get("X-CSRF-Token")
    if token is None:
        token = (await read_form(request)).get("csrf")
    if token is None or not hmac.compare_digest(token.encode(), viewer.session.csrf.encode()):
        raise Problem(403, "Refused", "This form has expired or did not come from a portal page. "
                                      "Reload the page and try again.")


def next_path(value: str | None) -> str:
    """A local path to go to after sign-in; anything else (another site, ``//host``, a control character
    or backslash a browser would drop or turn into ``//``) is the keys page."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/keys"
    if any(ord(c) < 0x21 or c == "\x7f" for c in value):
        return "/keys"
    try:
        url = URL(value)
    except ValueError:
        return "/keys"
    return value if not url.scheme and not url.host else "/keys"

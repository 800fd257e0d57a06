"""CORS, so browser-based chat tools can call the API directly, as they can call OpenAI's.

Keys travel in the ``Authorization`` header, never in cookies, so allowing other origins exposes
nothing a page does not already hold. Only requests that carry an ``Origin`` (browsers) are touched:
SDKs and curl pay nothing. Headers go on in ``on_response_prepare``, so streams get them too.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from .runtime import RUNTIME

API_PATHS = ("/v1/", "/lumen/v1/")
EXPOSED = ", ".join((
    "x-request-id", "request-id", "Server-Timing", "Retry-After", "retry-after-ms",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
))


def allowed_origin(request: web.Request) -> str | None:
    """The Access-Control-Allow-Origin value for this request, or None (not a browser, or not allowed).

    Read from the running config on each browser request, so a reload changes it.
    """
    origin = request.headers.get("Origin")
    if origin is None or not request.path.startswith(API_PATHS):
        return None  # the portal's pages and forms are same-origin only
    origins = request.app[RUNTIME].config.cors_origins
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


@web.middleware
async def cors_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer a browser's preflight before routing can call it a 405."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return await handler(request)
    allow = allowed_origin(request)
    if allow is None:
        return await handler(request)
    return web.Response(status=204, headers={
        "Access-Control-Allow-Origin": allow,
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers",
                                                            "Authorization, Content-Type"),
        "Access-Control-Max-Age": "86400",
        "Vary": "Origin",
    })


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response to an allowed browser, streams and errors included."""
    allow = allowed_origin(request)
    if allow is not None:
        response.headers["Access-Control-Allow-Origin"] = allow
        response.headers["Access-Control-Expose-Headers"] = EXPOSED
        if allow != "*":
            response.headers["Vary"] = "Origin"

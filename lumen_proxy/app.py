"""The application factory: routes, middlewares and the runtime's cleanup context.

Nothing happens at import; ``create_app(config)`` builds an independent app, so tests can run two
side by side.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from . import __version__
from .auth import require_model, visible_models
from .billing import to_coins
from .config import Config, Model
from .cors import add_cors_headers, cors_preflight
from .delegation import principal_of
from .endpoints import ENDPOINTS, SERVED, error_shape
from .errors import BadRequest, NotFound, StorageUnavailable, make_error_middleware
from .portal.routes import setup_portal
from .relay import relay
from .runtime import RUNTIME, Runtime, make_context
from .stateful import follow_up
from .store import StorageFailure, parse_utc, utc_day
from .summary import account_summary

log = logging.getLogger("lumen_proxy")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers=headers)


def _model_object(model: Model, created: int, anthropic: bool) -> dict[str, Any]:
    if anthropic:
        return {"type": "model", "id": model.name, "display_name": model.name, "lifecycle": "active",
                "created_at": datetime.fromtimestamp(created, UTC).isoformat().replace("+00:00", "Z")}
    return {"id": model.name, "object": "model", "created": created, "owned_by": model.owned_by}


def _anthropic(request: web.Request) -> bool:
    """The Anthropic SDKs (and Claude Code) send ``anthropic-version``: they get their API's model shape."""
    return "anthropic-version" in request.headers


async def list_models(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    principal = await principal_of(request)
    created, anthropic = int(rt.started), _anthropic(request)
    data = [_model_object(m, created, anthropic) for m in visible_models(rt.config, principal.account)]
    if anthropic:
        return _json({"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                      "last_id": data[-1]["id"] if data else None})
    return _json({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    principal = await principal_of(request)
    model = require_model(rt.config, principal.account, request.match_info["model"])
    return _json(_model_object(model, int(rt.started), _anthropic(request)))


async def healthz(request: web.Request) -> web.Response:
    """200 when every model has at least one backend up, the database can be read and usage rows
    written; the per-model and usage log detail either way."""
    rt = request.app[RUNTIME]
    models = {m.name: {"up": rt.pool.is_model_up(m), "backends": rt.pool.model_health(m)}
              for m in rt.config.models}
    usage_log = rt.usage.health()
    ok = all(m["up"] for m in models.values()) and not rt.view.is_stale() and usage_log["ok"]
    depth, slots = rt.share.depth(), rt.share.slots()
    for m in rt.config.models:
        if m.gated:
            models[m.name]["waiting"] = depth.get(m.name, 0)
            models[m.name]["slots"] = {
                b.label: slots.get((b.label, b.model), {"busy": 0, "capacity": b.max_concurrency})
                for b in m.backends if b.max_concurrency is not None}
    body = {"status": "ok" if ok else "degraded", "version": __version__, "database": not rt.view.is_stale(),
            "usage_log": usage_log, "models": models}
    return _json(body, status=200 if ok else 503)


def _is_loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


async def metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    token = rt.config.admin_token
    offered = request.headers.get("Authorization", "").encode()
    authorized = token is not None and hmac.compare_digest(offered, f"Bearer {token}".encode())  # no timing oracle
    if not authorized and not _is_loopback(request):
        raise NotFound("Unknown path /metrics.")  # do not advertise it to the outside
    rt.metrics.queue(rt.share.depth(), rt.share.slots())
    body = rt.metrics.render(rt.backend_states)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def me(request: web.Request) -> web.Response:
    """A key holder's own account: balance, allowance, limits, models (the seed's "Usage page", for scripts)."""
    rt = request.app[RUNTIME]
    principal = await principal_of(request)
    return _json({**account_summary(rt, principal.account), "key_id": principal.key_id,
                  "waiting": rt.share.waiting_of(principal.account.id)})


async def usage(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    principal = await principal_of(request)
    by = request.query.get("by", "day")
    if by not in ("day", "model", "key"):
        raise BadRequest("Parameter 'by' must be day, model or key.", param="by")
    since, until = (_day_param(request, name) for name in ("since", "until"))
    try:
        rows = await rt.store.usage_report(principal.account.id, since=since, until=until, by=by)
    except StorageFailure as exc:
        log.error("cannot read the usage report: %s", exc)
        raise StorageUnavailable("Usage cannot be read right now. Retry shortly.",
                                 headers={"Retry-After": "5"}) from None
    for row in rows:
        row["cost"] = to_coins(row["cost"])
    return _json({"object": "list", "account": principal.account.name, "by": by, "since": since, "until": until,
                  "data": rows})


def _day_param(request: web.Request, name: str) -> str | None:
    """``YYYY-MM-DD`` (or an ISO time: its UTC day); absent means unbounded, as in the CLI."""
    text = request.query.get(name)
    if not text:
        return None
    try:
        return utc_day(parse_utc(text))
    except ValueError:
        raise BadRequest(f"Parameter '{name}' must be a date like 2026-11-01.", param=name) from None


def create_app(config: Config, *, clock: Callable[[], float] = time.time,
               monotonic: Callable[[], float] = time.monotonic, usage_interval: float = 0.1,
               access_log: Any = None,
               on_ready: Callable[[Runtime], Coroutine[Any, Any, None]] | None = None) -> web.Application:
    app = web.Application(middlewares=[make_error_middleware(error_shape, SERVED), cors_preflight],
                          client_max_size=config.max_body_bytes)
    app.on_response_prepare.append(add_cors_headers)
    app.cleanup_ctx.append(make_context(config, clock=clock, monotonic=monotonic, usage_interval=usage_interval,
                                        access_log=access_log, on_ready=on_ready))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    for path in ENDPOINTS:
        app.router.add_post(path, relay)
    app.router.add_get("/v1/responses/{response_id}", follow_up)
    app.router.add_delete("/v1/responses/{response_id}", follow_up)
    app.router.add_post("/v1/responses/{response_id}/{action:cancel}", follow_up)
    app.router.add_get("/v1/responses/{response_id}/{action:input_items}", follow_up)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/lumen/v1/me", me)
    app.router.add_get("/lumen/v1/usage", usage)
    setup_portal(app)
    return app


"""Profile → API Keys: a person's own keys, creating one, revoking one.

A new key is shown once, in the response to the form that created it (never stored, never
redirected through a URL or a cookie). Creation goes through the store's ``create_key`` with the
group's ``max_keys``, checked and inserted in one transaction, as the CLI does. After a create or a
revoke the server reloads its view of keys at once, so a revoked key is refused by the API before
the page that confirms it has loaded.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from ..runtime import RUNTIME
from ..store import NoSuchRecord, TooManyKeys
from .guard import Problem, Viewer, base_url, read_form, render, signed_in

EXPIRY_DAYS = (0, 7, 30, 90, 365)  # the choices of the form; 0 = never
MAX_LABEL = 80


def _keys_context(request: web.Request, viewer: Viewer, rows: list[Any], **extra: Any) -> dict[str, Any]:
    rt = request.app[RUNTIME]
    group = rt.config.group(viewer.account.group)
    now = time.time()
    active = [k for k in rows if k.revoked_at is None and (k.expires_at is None or k.expires_at > now)]
    return {"viewer": viewer, "keys": rows, "active_count": len(active), "max_keys": group.max_keys if group else None,
            "base_url": base_url(request) + "/v1", "expiry_days": EXPIRY_DAYS, "now": now,
            "models": [m.name for m in rt.config.models], **extra}


async def _own_keys(request: web.Request, viewer: Viewer) -> list[Any]:
    rows = await request.app[RUNTIME].store.keys(viewer.account.name)
    return sorted((key for key, _name in rows), key=lambda k: (k.revoked_at is not None, -k.created_at))


@signed_in
async def keys_page(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    return render(request, "keys.html", _keys_context(request, viewer, await _own_keys(request, viewer)))


@signed_in
async def create_key(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    form = await read_form(request)
    label = " ".join(form.get("label", "").split())[:MAX_LABEL] or None
    days = form.get("expires_days", "0")
    if not days.isdigit() or int(days) not in EXPIRY_DAYS:
        raise Problem(400, "Not a choice", "Choose an expiry from the list.")
    expires = time.time() + int(days) * 86400 if int(days) else None
    group = rt.config.group(viewer.account.group)
    limit = group.max_keys if group is not None else None
    try:
        key, row = await rt.store.create_key(viewer.account.name, label, expires, max_active=limit)
    except TooManyKeys:
        rows = await _own_keys(request, viewer)
        message = (f"You already have {limit} active keys, the most your group allows. "
                   "Revoke one you no longer use, then create a new one.")
        return render(request, "keys.html", _keys_context(request, viewer, rows, error=message), status=409)
    await rt.view.reload()
    rows = await _own_keys(request, viewer)
    return render(request, "keys.html", _keys_context(request, viewer, rows, new_key=key, new_row=row), status=201)


async def _own_key(request: web.Request, viewer: Viewer) -> Any:
    key_id = request.match_info["key_id"]
    try:
        is_id = key_id.isascii() and key_id.isdigit() and len(key_id) <= 18  # no ², nothing past 64 bits
        key = await request.app[RUNTIME].store.find_key(key_id) if is_id else None
    except NoSuchRecord:
        key = None
    if key is None or key.account_id != viewer.account.id:  # someone else's key: as if it did not exist
        raise Problem(404, "No such key", "You have no key with this id.")
    return key


@signed_in
async def revoke_confirm(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    return render(request, "revoke.html", {"viewer": viewer, "key": await _own_key(request, viewer)})


@signed_in
async def revoke_key(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    key = await _own_key(request, viewer)
    await rt.store.revoke_key(str(key.id))
    await rt.view.reload()
    rows = await _own_keys(request, viewer)
    return render(request, "keys.html", _keys_context(request, viewer, rows, notice=f"Key {key.prefix}… is revoked."))


def when(ts: float | None) -> str:
    """A time for a table cell (UTC, to the minute)."""
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")

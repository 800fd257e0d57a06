"""The portal from a browser's side: sign-in, sessions, keys, usage, and what an attacker tries.

Each test runs the real app on a real port (``make_proxy``) and talks to it with an aiohttp client
that keeps cookies as a browser does (``CookieJar(unsafe=True)``: the server is an IP address),
sending the ``Origin`` a browser would. Keys made on the pages are used with the real ``openai``
SDK. What people see is read from the pages; what happened is read from the database with a
connection of the test's own (``query``). The admin's CLI runs only where it is the point.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from http.cookies import Morsel, SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from yarl import URL

from lumen_proxy.keys import hash_key
from lumen_proxy.portal.guard import COOKIE, PORTAL
from lumen_proxy.portal.usage_page import CSV_HEADER
from lumen_proxy.store import AccountRow
from tests.conftest import MakeProxy, Proxy, admin, build_config, eventually, query, write_config

USER = [{"role": "user", "content": "hello"}]
CSRF = re.compile(r'<input type="hidden" name="csrf" value="([^"]+)">')
NEW_KEY = re.compile(r'<input id="new-key"[^>]*value="(sk_[^"]+)"')
EVIL = "http://evil.example"

Browser = Callable[..., aiohttp.ClientSession]


# -- helpers -------------------------------------------------------------------------------------------
def portal_config(tmp_path: Path, **top: Any) -> dict[str, Any]:
    """A config with the built-in echo model only (no upstream needed), a fresh database in ``tmp_path``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "database": str(tmp_path / "lumen.db"),
        "models": [{"name": "echo", "backends": [{"url": "builtin:echo"}], "price": {"prompt": 1, "completion": 1}}],
    }
    data.update(top)
    return data


async def start(make_proxy: MakeProxy, tmp_path: Path, **top: Any) -> Proxy:
    return await make_proxy(build_config(tmp_path, portal_config(tmp_path, **top)))


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Browsers: ``browser()`` is a fresh one with its own cookies (more than one per test is fine)."""
    opened: list[aiohttp.ClientSession] = []

    def make(**jar: Any) -> aiohttp.ClientSession:
        opened.append(aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True, **jar)))
        return opened[-1]

    yield make
    for session in opened:
        await session.close()


async def add_account(proxy: Proxy, name: str, group: str | None = None) -> AccountRow:
    async with proxy.rt.usage.lock:
        row = await proxy.rt.store.add_account(name, 1000 * 1_000_000, group=group)
    await proxy.rt.view.reload()
    return row


def db(proxy: Proxy) -> Path:
    return Path(proxy.rt.config.database)


def count(proxy: Proxy, table: str) -> int:
    return int(query(db(proxy), f"SELECT count(*) FROM {table}")[0][0])


async def link(proxy: Proxy, name: str, **kwargs: Any) -> str:
    token, _ = await proxy.app[PORTAL].records.create_link(name, **kwargs)
    return token


async def sign_in(proxy: Proxy, session: aiohttp.ClientSession, name: str) -> str:
    """Sign ``name`` in on ``session`` with a one-time link, as the button does; the session id."""
    token = await link(proxy, name)
    async with session.post(f"{proxy.origin}/login/link/{token}", headers={"Origin": proxy.origin},
                            allow_redirects=False) as r:
        assert r.status == 303, await r.text()
        return r.cookies[COOKIE].value


async def get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str, Any]:
    async with session.get(url, allow_redirects=False, **kwargs) as r:
        return r.status, await r.text(), r.headers


async def post(session: aiohttp.ClientSession, url: str, origin: str | None, data: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    sent = dict(headers or {})
    if origin is not None:
        sent["Origin"] = origin
    async with session.post(url, data=data, headers=sent, allow_redirects=False) as r:
        return r.status, await r.text(), r.headers


async def csrf_of(proxy: Proxy, session: aiohttp.ClientSession) -> str:
    status, html, _ = await get(session, proxy.origin + "/keys")
    assert status == 200, html
    found = CSRF.search(html)
    assert found is not None, html
    return found.group(1)


async def create_key(proxy: Proxy, session: aiohttp.ClientSession, label: str = "",
                     expires_days: str = "0") -> tuple[int, str]:
    form = {"csrf": await csrf_of(proxy, session), "label": label, "expires_days": expires_days}
    status, html, _ = await post(session, proxy.origin + "/keys", proxy.origin, form)
    return status, html


def cookie_of(headers: Any) -> Morsel[str]:
    jar: SimpleCookie = SimpleCookie()
    for value in headers.getall("Set-Cookie", []):
        jar.load(value)
    assert COOKIE in jar, headers
    return jar[COOKIE]


def signed_in_as(html: str) -> str | None:
    found = re.search(r'title="Signed in as ([^"]+)"', html)
    return found.group(1) if found else None


def is_page(status: int, html: str, headers: Any, expected: int) -> bool:
    """A portal problem: an HTML page with its status, never the API's JSON."""
    return status == expected and headers["Content-Type"].startswith("text/html") and "<!doctype html>" in html


async def refused(client: openai.AsyncOpenAI) -> bool:
    try:
        await client.chat.completions.create(model="echo", messages=USER)
    except openai.AuthenticationError:
        return True
    return False


# -- happy paths ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("public_url", "secure"), [("http://lumen.test", False), ("https://lumen.example", True)])
async def test_a_cli_login_link_signs_in_once_its_button_is_pressed(make_proxy: MakeProxy, tmp_path: Path,
                                                                    browser: Browser, public_url: str,
                                                                    secure: bool) -> None:
    data = portal_config(tmp_path, public_url=public_url)
    config_file = write_config(tmp_path, data)
    proxy = await make_proxy(build_config(tmp_path, data))
    await add_account(proxy, "alice")

    printed = json.loads(await admin(config_file, "accounts", "login-link", "alice", "--json"))
    assert printed["account"] == "alice" and printed["expires_at"]
    assert printed["url"].startswith(public_url + "/login/link/")
    page_url = proxy.origin + URL(printed["url"]).path  # the reverse proxy at public_url forwards to us
    assert query(db(proxy), "SELECT used_at FROM login_links")[0]["used_at"] is None

    # a browser that treats the TLS-terminated address as https, as it would behind the real proxy
    session = browser(treat_as_secure_origin=[proxy.origin]) if secure else browser()
    for _ in range(2):  # mail scanners and chat previews open links: looking never spends one
        status, html, headers = await get(session, page_url)
        assert status == 200 and 'id="sign-in"' in html and '<form method="post">' in html
        assert headers["Referrer-Policy"] == "same-origin"  # the token goes to no other site; Origin stays set
    assert query(db(proxy), "SELECT used_at FROM login_links")[0]["used_at"] is None
    assert count(proxy, "sessions") == 0

    async with session.post(page_url, headers={"Origin": public_url}, allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/keys"
        cookie = cookie_of(r.headers)
    assert cookie["httponly"] is True and cookie["samesite"] == "Lax" and cookie["path"] == "/"
    assert cookie["max-age"] == str(12 * 3600)
    assert bool(cookie["secure"]) is secure
    assert query(db(proxy), "SELECT used_at FROM login_links")[0]["used_at"] is not None
    assert [tuple(r) for r in query(db(proxy), "SELECT account_id, method FROM sessions")] == [(1, "link")]
    assert cookie.value not in {r[0] for r in query(db(proxy), "SELECT hash FROM sessions")}  # only its hash

    status, html, _ = await get(session, proxy.origin + "/keys")
    assert status == 200 and signed_in_as(html) == "alice"
    assert '<form method="post" action="/logout">' in html and "Sign out" in html
    assert "You have no keys yet." in html


async def test_a_key_made_on_the_page_works_shows_in_usage_and_stops_when_revoked(
        make_proxy: MakeProxy, tmp_path: Path, browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path)
    await add_account(proxy, "alice")
    session = browser()
    await sign_in(proxy, session, "alice")

    status, html = await create_key(proxy, session, label="laptop", expires_days="30")
    assert status == 201, html
    found = NEW_KEY.search(html)
    assert found is not None and "Your new key: laptop" in html and "Copy it now." in html
    key = found.group(1)
    assert f'api_key="{key}"' in html and f"{proxy.origin}/v1" in html  # the snippets
    (row,) = query(db(proxy), "SELECT id, prefix, label, expires_at, revoked_at FROM keys")
    assert row["label"] == "laptop" and row["revoked_at"] is None
    assert abs(row["expires_at"] - (time.time() + 30 * 86400)) < 60
    assert key not in json.dumps([list(r) for r in query(db(proxy), "SELECT * FROM keys")])  # a hash only
    status, html, _ = await get(session, proxy.origin + "/keys")
    assert status == 200 and key not in html and f'id="key-{row["id"]}"' in html  # shown once only

    raw = await proxy.sdk(key).chat.completions.with_raw_response.create(model="echo", messages=USER)
    request_id = raw.headers["x-request-id"]
    assert raw.parse().choices
    await proxy.flush()

    status, html, _ = await get(session, proxy.origin + "/usage")
    assert status == 200
    recent = html[html.index('<table id="recent">'):]
    assert "<td>echo</td>" in recent and f"<code>{row['prefix']}…</code>" in recent
    assert "<code>/v1/chat/completions</code>" in recent
    by_model = html[html.index("<caption>By model</caption>"):]
    assert '<tr><td>echo</td><td class="num">1</td>' in by_model
    assert "laptop" in html[html.index("<caption>By key</caption>"):]

    async with session.get(proxy.origin + "/usage.csv") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
        assert r.headers["Content-Disposition"] == 'attachment; filename="lumen-usage-30d.csv"'
        rows = list(csv.reader(io.StringIO(await r.text())))
    assert rows[0] == list(CSV_HEADER) and len(rows) == 2
    line = dict(zip(rows[0], rows[1], strict=True))
    assert line["request_id"] == request_id and line["model"] == "echo" and line["key"] == row["prefix"]
    assert line["status"] == "200" and line["endpoint"] == "/v1/chat/completions"
    assert (request_id,) == tuple(query(db(proxy), "SELECT request_id FROM usage")[0])
    async with session.get(proxy.origin + "/usage.csv?days=7") as r:
        assert 'filename="lumen-usage-7d.csv"' in r.headers["Content-Disposition"]
        assert request_id in await r.text()

    async with session.get(proxy.origin + "/usage/live.json") as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        live = await r.json()
    assert set(live) == {"requests", "tokens", "in_flight", "waiting", "window_seconds", "coins", "allowance",
                         "coins_held"}
    for part in ("requests", "tokens", "in_flight"):
        assert set(live[part]) == {"used", "limit"} and all(isinstance(v, int) for v in live[part].values())
    assert live["window_seconds"] == 60 and live["allowance"] is None and live["coins_held"] == 0
    assert 999 < live["coins"] < 1000  # one echo answer spent

    status, html, _ = await get(session, f"{proxy.origin}/keys/{row['id']}/revoke")
    assert status == 200 and 'id="confirm-revoke"' in html and "laptop" in html
    assert query(db(proxy), "SELECT revoked_at FROM keys")[0][0] is None  # the confirm page changes nothing
    assert not await refused(proxy.sdk(key))
    form = {"csrf": CSRF.findall(html)[-1]}
    status, html, _ = await post(session, f"{proxy.origin}/keys/{row['id']}/revoke", proxy.origin, form)
    assert status == 200 and f"Key {row['prefix']}… is revoked." in html
    assert query(db(proxy), "SELECT revoked_at FROM keys")[0][0] is not None
    assert await eventually(lambda: refused(proxy.sdk(key)), within=1.0)


async def test_a_session_survives_a_restart_of_the_server(make_proxy: MakeProxy, tmp_path: Path,
                                                          browser: Browser) -> None:
    config = build_config(tmp_path, portal_config(tmp_path))
    proxy = await make_proxy(config)
    await add_account(proxy, "alice")
    session = browser()
    sid = await sign_in(proxy, session, "alice")
    await proxy.server.close()

    again = await make_proxy(config)  # a new app (and runtime) on the same config and database
    session.cookie_jar.update_cookies({COOKIE: sid}, URL(again.origin))
    status, html, _ = await get(session, again.origin + "/keys")
    assert status == 200 and signed_in_as(html) == "alice"
    status, html, _ = await get(session, again.origin + "/usage")
    assert status == 200 and signed_in_as(html) == "alice"


async def test_signing_out_ends_the_session_even_for_a_replayed_cookie(make_proxy: MakeProxy, tmp_path: Path,
                                                                       browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path)
    await add_account(proxy, "alice")
    session = browser()
    sid = await sign_in(proxy, session, "alice")
    status, _, headers = await post(session, proxy.origin + "/logout", proxy.origin,
                                    {"csrf": await csrf_of(proxy, session)})
    assert status == 303 and headers["Location"] == "/login"
    assert cookie_of(headers).value == "" and cookie_of(headers)["max-age"] == "0"
    assert count(proxy, "sessions") == 0

    replay = browser()
    replay.cookie_jar.update_cookies({COOKIE: sid}, URL(proxy.origin))
    status, _, headers = await get(replay, proxy.origin + "/keys")
    assert status == 303 and headers["Location"] == "/login?next=/keys"
    status, _, _ = await get(replay, proxy.origin + "/usage/live.json")
    assert status == 401


async def test_disabling_the_account_ends_its_sessions(make_proxy: MakeProxy, tmp_path: Path,
                                                       browser: Browser) -> None:
    data = portal_config(tmp_path)
    config_file = write_config(tmp_path, data)
    proxy = await make_proxy(build_config(tmp_path, data))
    await add_account(proxy, "alice")
    session = browser()
    await sign_in(proxy, session, "alice")
    assert (await get(session, proxy.origin + "/keys"))[0] == 200

    await admin(config_file, "accounts", "disable", "alice")

    async def sent_to_login() -> bool:
        status, _, headers = await get(session, proxy.origin + "/keys")
        return status == 303 and headers["Location"].startswith("/login")

    assert await eventually(sent_to_login, within=5.0)  # the server follows the database's changes
    assert count(proxy, "sessions") == 0
    await admin(config_file, "accounts", "enable", "alice")
    await proxy.rt.view.reload()
    assert (await get(session, proxy.origin + "/keys"))[0] == 303  # enabling again does not revive it


async def test_an_expired_session_is_sent_to_sign_in(make_proxy: MakeProxy, tmp_path: Path,
                                                     browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path)
    alice = await add_account(proxy, "alice")
    sid, _ = await proxy.app[PORTAL].records.open_session(alice.id, "link", 1, now=time.time() - 7200)
    session = browser()
    session.cookie_jar.update_cookies({COOKIE: sid}, URL(proxy.origin))
    status, _, headers = await get(session, proxy.origin + "/usage?days=7")
    assert status == 303 and URL(headers["Location"]).path == "/login"
    assert URL(headers["Location"]).query["next"] == "/usage?days=7"
    status, html, _ = await get(session, proxy.origin + "/login")
    assert status == 200 and signed_in_as(html) is None and "Sign in to Lumen" in html


async def test_the_groups_max_keys_refuses_a_third_key(make_proxy: MakeProxy, tmp_path: Path,
                                                       browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path, groups=[{"name": "g", "max_keys": 2}], default_group="g")
    await add_account(proxy, "alice", group="g")
    session = browser()
    await sign_in(proxy, session, "alice")
    for label in ("one", "two"):
        assert (await create_key(proxy, session, label=label))[0] == 201
    status, html = await create_key(proxy, session, label="three")
    assert status == 409
    assert "You already have 2 active keys, the most your group allows." in html and NEW_KEY.search(html) is None
    assert [r[0] for r in query(db(proxy), "SELECT label FROM keys ORDER BY id")] == ["one", "two"]



async def test_the_keys_page_counts_the_active_keys_against_max_keys(make_proxy: MakeProxy, tmp_path: Path,
                                                                     browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path, groups=[{"name": "g", "max_keys": 2}], default_group="g")
    await add_account(proxy, "alice", group="g")
    session = browser()
    await sign_in(proxy, session, "alice")
    status, html = await create_key(proxy, session, label="one")
    assert status == 201 and "You have 1 of 2 active keys." in html


TRUSTED = {"header": "X-Forwarded-Email", "proxies": ["127.0.0.1"]}


async def test_a_trusted_proxy_header_signs_in_and_creates_the_account(make_proxy: MakeProxy, tmp_path: Path,
                                                                      browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path, groups=[{"name": "staff"}], default_group="staff",
                        portal={"trusted_header": TRUSTED, "new_accounts": {"create": True}})
    session = browser()
    who = {"X-Forwarded-Email": "carol@uni.example"}
    status, html, headers = await get(session, proxy.origin + "/keys", headers=who)
    assert status == 200 and signed_in_as(html) == "carol@uni.example"
    assert cookie_of(headers)["httponly"] is True
    (account,) = query(db(proxy), "SELECT name, group_name, enabled FROM accounts")
    assert tuple(account) == ("carol@uni.example", "staff", 1)
    assert [r[0] for r in query(db(proxy), "SELECT method FROM sessions")] == ["header"]

    status, html, headers = await get(session, proxy.origin + "/usage", headers=who)  # with its cookie now
    assert status == 200 and signed_in_as(html) == "carol@uni.example" and "Set-Cookie" not in headers
    assert count(proxy, "sessions") == 1 and count(proxy, "accounts") == 1
    status, _, _ = await post(session, proxy.origin + "/keys", proxy.origin,
                              {"csrf": await csrf_of(proxy, session), "label": "via proxy", "expires_days": "0"},
                              headers=who)
    assert status == 201


async def test_the_header_from_an_untrusted_address_is_ignored(make_proxy: MakeProxy, tmp_path: Path,
                                                               browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path, groups=[{"name": "staff"}], default_group="staff",
                        portal={"trusted_header": {**TRUSTED, "proxies": ["10.0.0.0/8"]},
                                "new_accounts": {"create": True}})
    session = browser()
    status, _, headers = await get(session, proxy.origin + "/keys", headers={"X-Forwarded-Email": "mallory"})
    assert status == 303 and URL(headers["Location"]).path == "/login" and "Set-Cookie" not in headers
    assert count(proxy, "accounts") == 0 and count(proxy, "sessions") == 0


async def test_the_trusted_header_wins_over_another_accounts_session(make_proxy: MakeProxy, tmp_path: Path,
                                                                     browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path, portal={"trusted_header": TRUSTED})
    await add_account(proxy, "alice")
    await add_account(proxy, "bob")
    session = browser()
    await sign_in(proxy, session, "alice")
    status, html, _ = await get(session, proxy.origin + "/keys")
    assert signed_in_as(html) == "alice"
    status, html, headers = await get(session, proxy.origin + "/keys", headers={"X-Forwarded-Email": "bob"})
    assert status == 200 and signed_in_as(html) == "bob"
    assert "Set-Cookie" in headers  # bob's own session, not alice's


async def test_the_sign_in_page_lists_only_what_is_configured(make_proxy: MakeProxy, tmp_path: Path,
                                                              browser: Browser) -> None:
    session = browser()
    plain = await start(make_proxy, tmp_path / "plain")
    status, html, _ = await get(session, plain.origin + "/login")
    assert status == 200 and "one-time" in html and "sign-in link" in html
    assert "/login/oidc" not in html and "institution" not in html and "No way to sign in" not in html
    status, html, headers = await get(session, plain.origin + "/login/oidc")
    assert is_page(status, html, headers, 404) and "Single sign-on is not configured" in html
    status, html, headers = await get(session, plain.origin + "/login/oidc/callback?code=x&state=y")
    assert is_page(status, html, headers, 404)

    oidc = {"issuer": "https://idp.example", "client_id": "lumen", "client_secret": "s3cret",
            "label": "Sign in with Uni SSO"}
    every = await start(make_proxy, tmp_path / "every", portal={"oidc": oidc, "trusted_header": TRUSTED})
    status, html, _ = await get(session, every.origin + "/login")
    assert status == 200 and '<a class="button primary wide" href="/login/oidc">Sign in with Uni SSO</a>' in html
    assert "institution" in html and "No single sign-on account?" in html and "s3cret" not in html

    none = await start(make_proxy, tmp_path / "none", portal={"login_links": False})
    status, html, _ = await get(session, none.origin + "/login")
    assert status == 200 and "No way to sign in is configured" in html and "one-time" not in html
    status, html, headers = await post(session, f"{none.origin}/login/link/anything", none.origin)
    assert is_page(status, html, headers, 404) and "turned off" in html


# -- hostile cases -------------------------------------------------------------------------------------
async def test_post_keys_needs_the_csrf_token_and_the_portal_origin(make_proxy: MakeProxy, tmp_path: Path,
                                                                    browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path)
    await add_account(proxy, "alice")
    session = browser()
    await sign_in(proxy, session, "alice")
    token = await csrf_of(proxy, session)
    url = proxy.origin + "/keys"
    form = {"label": "x", "expires_days": "0"}
    for origin, data, headers in (
        (proxy.origin, form, None),  # no token
        (proxy.origin, {**form, "csrf": "wrong"}, None),
        (proxy.origin, {**form, "csrf": token + "x"}, None),
        (proxy.origin, form, {"X-CSRF-Token": "wrong"}),
        (None, {**form, "csrf": token}, None),  # no Origin, no Referer
        (EVIL, {**form, "csrf": token}, None),
        ("null", {**form, "csrf": token}, None),
        (None, {**form, "csrf": token}, {"Referer": EVIL + "/keys"}),
        (proxy.origin.replace("127.0.0.1", "localhost"), {**form, "csrf": token}, None),
    ):
        status, html, sent = await post(session, url, origin, data, headers)
        assert is_page(status, html, sent, 403) and "Refused" in html, (origin, data, headers)
        assert count(proxy, "keys") == 0

    status, html, _ = await post(session, url, proxy.origin, form, {"X-CSRF-Token": token})
    assert status == 201 and NEW_KEY.search(html)
    status, html, _ = await post(session, url, None, {**form, "csrf": token}, {"Referer": proxy.origin + "/keys"})
    assert status == 201  # a browser that sends a Referer but no Origin
    assert count(proxy, "keys") == 2


async def test_a_session_cookie_never_authenticates_the_api(make_proxy: MakeProxy, tmp_path: Path,
                                                            browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path)
    await add_account(proxy, "alice")
    session = browser()
    await sign_in(proxy, session, "alice")
    token = await csrf_of(proxy, session)
    same = {"Origin": proxy.origin, "X-CSRF-Token": token}
    calls = (
        session.post(proxy.origin + "/v1/chat/completions", json={"model": "echo", "messages": USER}, headers=same),
        session.get(proxy.origin + "/v1/models", headers=same),
        session.get(proxy.origin + "/lumen/v1/me", headers=same),
        session.get(proxy.origin + "/lumen/v1/usage", headers=same),
    )
    for call in calls:
        async with call as r:
            assert r.status == 401 and r.headers["Content-Type"].startswith("application/json")
            assert r.request_info.headers.get("Cookie", "").startswith(COOKIE + "=")  # the cookie was sent
            error = (await r.json())["error"]
            assert error["type"] == "invalid_request_error" and "API key" in error["message"]
            assert {"message", "type", "param", "code"} <= set(error)
    await proxy.flush()
    assert count(proxy, "usage") == 0


async def test_a_link_is_refused_when_replayed_expired_unknown_or_posted_from_elsewhere(
        make_proxy: MakeProxy, tmp_path: Path, browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path)
    await add_account(proxy, "alice")
    session = browser()

    token = await link(proxy, "alice")
    url = f"{proxy.origin}/login/link/{token}"
    assert (await post(session, url, proxy.origin))[0] == 303
    status, html, headers = await post(browser(), url, proxy.origin)
    assert is_page(status, html, headers, 400) and "already used" in html and "Set-Cookie" not in headers

    stale = await link(proxy, "alice", now=time.time() - 16 * 60)
    status, html, headers = await post(browser(), f"{proxy.origin}/login/link/{stale}", proxy.origin)
    assert is_page(status, html, headers, 400) and "expired" in html

    status, html, headers = await post(browser(), f"{proxy.origin}/login/link/not-a-token", proxy.origin)
    assert is_page(status, html, headers, 400) and "not valid" in html

    fresh = await link(proxy, "alice")
    for origin in (EVIL, None):
        status, html, headers = await post(browser(), f"{proxy.origin}/login/link/{fresh}", origin)
        assert is_page(status, html, headers, 403) and "Set-Cookie" not in headers
    assert query(db(proxy), "SELECT used_at FROM login_links WHERE hash = ?", hash_key(fresh))[0][0] is None
    assert query(db(proxy), "SELECT used_at FROM login_links WHERE hash = ?", hash_key(stale))[0][0] is None
    assert count(proxy, "sessions") == 1
    assert (await post(browser(), f"{proxy.origin}/login/link/{fresh}", proxy.origin))[0] == 303  # still good


async def test_sign_in_attempts_are_rate_limited_per_client(make_proxy: MakeProxy, tmp_path: Path,
                                                            browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path, portal={"signin_per_minute": 3})
    await add_account(proxy, "alice")
    session = browser()
    for _ in range(3):
        status, html, _ = await post(session, proxy.origin + "/login/link/x", proxy.origin)
        assert status == 400 and "not valid" in html
    good = await link(proxy, "alice")  # even a valid link: the limit comes before any look-up
    status, html, headers = await post(session, f"{proxy.origin}/login/link/{good}", proxy.origin)
    assert is_page(status, html, headers, 429) and "Too many sign-in attempts" in html
    assert query(db(proxy), "SELECT used_at FROM login_links")[0][0] is None and count(proxy, "sessions") == 0


async def test_revoking_someone_elses_key_is_a_404(make_proxy: MakeProxy, tmp_path: Path, browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path)
    await add_account(proxy, "alice")
    await add_account(proxy, "bob")
    bobs_key = await proxy.key("bob")
    (bobs_id,) = (r[0] for r in query(db(proxy), "SELECT id FROM keys"))
    session = browser()
    await sign_in(proxy, session, "alice")
    token = await csrf_of(proxy, session)
    status, html, headers = await get(session, f"{proxy.origin}/keys/{bobs_id}/revoke")
    assert is_page(status, html, headers, 404) and "No such key" in html
    for key_id in (str(bobs_id), "abc", "0", "99999"):
        status, html, headers = await post(session, f"{proxy.origin}/keys/{key_id}/revoke", proxy.origin,
                                           {"csrf": token})
        assert is_page(status, html, headers, 404), key_id
    assert query(db(proxy), "SELECT revoked_at FROM keys")[0][0] is None
    assert (await proxy.sdk(bobs_key).chat.completions.create(model="echo", messages=USER)).choices


async def test_a_key_label_is_escaped_in_the_pages(make_proxy: MakeProxy, tmp_path: Path, browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path)
    await add_account(proxy, "alice")
    session = browser()
    await sign_in(proxy, session, "alice")
    label = "<script>alert(1)</script>"
    status, html = await create_key(proxy, session, label=label)
    assert status == 201 and "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    (key_id,) = (r[0] for r in query(db(proxy), "SELECT id FROM keys WHERE label = ?", label))
    found = NEW_KEY.search(html)
    assert found is not None
    key = found.group(1)
    await proxy.sdk(key).chat.completions.create(model="echo", messages=USER)
    await proxy.flush()
    for path in ("/keys", f"/keys/{key_id}/revoke", "/usage"):
        status, html, _ = await get(session, proxy.origin + path)
        assert status == 200 and "<script>alert" not in html and "&lt;script&gt;" in html, path


async def test_a_model_name_that_looks_like_a_formula_is_inert_in_the_csv(make_proxy: MakeProxy, tmp_path: Path,
                                                                         browser: Browser) -> None:
    echo = {"backends": [{"url": "builtin:echo"}], "price": {"prompt": 1, "completion": 1}}
    names = ["=cmd", "+1", "-1", "@SUM(A1)"]
    proxy = await start(make_proxy, tmp_path, models=[{"name": name, **echo} for name in names])
    await add_account(proxy, "alice")
    key = await proxy.key("alice")
    for name in names:
        await proxy.sdk(key).chat.completions.create(model=name, messages=USER)
    await proxy.flush()
    session = browser()
    await sign_in(proxy, session, "alice")
    async with session.get(proxy.origin + "/usage.csv") as r:
        rows = list(csv.DictReader(io.StringIO(await r.text())))
    assert sorted(row["model"] for row in rows) == sorted("'" + name for name in names)
    for row in rows:
        assert all(not cell.startswith(("=", "+", "-", "@")) for cell in row.values()), row


async def test_a_huge_form_is_refused_before_it_is_read(make_proxy: MakeProxy, tmp_path: Path,
                                                        browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path)
    await add_account(proxy, "alice")
    session = browser()
    await sign_in(proxy, session, "alice")
    token = await csrf_of(proxy, session)
    huge = {"csrf": token, "label": "x" * (70 * 1024), "expires_days": "0"}
    status, html, headers = await post(session, proxy.origin + "/keys", proxy.origin, huge)
    assert is_page(status, html, headers, 413) and "Form too large" in html
    status, html, headers = await post(session, proxy.origin + "/keys", proxy.origin, huge, {"X-CSRF-Token": token})
    assert is_page(status, html, headers, 413)
    assert count(proxy, "keys") == 0


@pytest.mark.parametrize("target", ["//evil.example", "https://evil.example/keys", "/\\evil.example",
                                    "evil.example"])
async def test_next_never_leaves_the_portal(make_proxy: MakeProxy, tmp_path: Path, browser: Browser,
                                            target: str) -> None:
    proxy = await start(make_proxy, tmp_path)
    await add_account(proxy, "alice")
    session = browser()
    token = await link(proxy, "alice")
    url = URL(f"{proxy.origin}/login/link/{token}").with_query({"next": target})
    async with session.post(url, headers={"Origin": proxy.origin}, allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/keys"
    status, _, headers = await get(session, URL(proxy.origin + "/login").with_query({"next": target}))
    assert status == 303 and headers["Location"] == "/keys"  # signed in: the sign-in page sends on
    token = await link(proxy, "alice")
    url = URL(f"{proxy.origin}/login/link/{token}").with_query({"next": "/usage?days=7"})
    async with session.post(url, headers={"Origin": proxy.origin}, allow_redirects=False) as r:
        assert r.headers["Location"] == "/usage?days=7"  # a local path is kept


@pytest.mark.parametrize("target", ["/\t/evil.example", "/\r/evil.example", "/\x0b/evil.example"],
                         ids=["tab", "cr", "vtab"])
async def test_next_with_a_control_character_never_leaves_the_portal(make_proxy: MakeProxy, tmp_path: Path,
                                                                     browser: Browser, target: str) -> None:
    proxy = await start(make_proxy, tmp_path)
    await add_account(proxy, "alice")
    token = await link(proxy, "alice")
    url = URL(f"{proxy.origin}/login/link/{token}").with_query({"next": target})
    async with browser().post(url, headers={"Origin": proxy.origin}, allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/keys"


@pytest.mark.parametrize("referer", ["/keys", "garbage", "http://[::1"])
async def test_a_malformed_referer_is_refused_with_a_page(make_proxy: MakeProxy, tmp_path: Path, browser: Browser,
                                                          referer: str) -> None:
    proxy = await start(make_proxy, tmp_path)
    await add_account(proxy, "alice")
    session = browser()
    await sign_in(proxy, session, "alice")
    form = {"csrf": await csrf_of(proxy, session), "label": "", "expires_days": "0"}
    status, html, headers = await post(session, proxy.origin + "/keys", None, form, {"Referer": referer})
    assert is_page(status, html, headers, 403)
    assert count(proxy, "keys") == 0


@pytest.mark.parametrize("key_id", ["99999999999999999999999", "²"], ids=["too-big", "superscript"])
async def test_a_key_id_that_is_no_number_is_a_404_page(make_proxy: MakeProxy, tmp_path: Path, browser: Browser,
                                                        key_id: str) -> None:
    proxy = await start(make_proxy, tmp_path)
    await add_account(proxy, "alice")
    session = browser()
    await sign_in(proxy, session, "alice")
    status, html, headers = await get(session, f"{proxy.origin}/keys/{key_id}/revoke")
    assert is_page(status, html, headers, 404) and "No such key" in html


async def test_portal_pages_forbid_inline_script_framing_and_caching(make_proxy: MakeProxy, tmp_path: Path,
                                                                     browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path)
    await add_account(proxy, "alice")
    session = browser()
    token = await link(proxy, "alice")
    pages = [("/login", 200), (f"/login/link/{token}", 200), ("/login/oidc", 404)]
    for path, expected in pages:
        status, _, headers = await get(session, proxy.origin + path)
        assert status == expected, path
        check_headers(headers, path)
    await sign_in(proxy, session, "alice")
    for path, expected in (("/keys", 200), ("/usage", 200), ("/usage.csv", 200), ("/usage/live.json", 200),
                           ("/keys/1/revoke", 404)):
        status, _, headers = await get(session, proxy.origin + path)
        assert status == expected, path
        check_headers(headers, path)


def check_headers(headers: Any, path: str) -> None:
    policy = headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy, path
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy, path
    assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store", path
    assert headers["X-Content-Type-Options"] == "nosniff", path


async def test_cors_is_for_the_api_only(make_proxy: MakeProxy, tmp_path: Path, browser: Browser) -> None:
    proxy = await start(make_proxy, tmp_path)
    await add_account(proxy, "alice")
    key = await proxy.key("alice")
    session = browser()
    await sign_in(proxy, session, "alice")
    other = {"Origin": "https://other.example"}
    for path in ("/usage", "/usage/live.json", "/usage.csv", "/keys"):
        status, _, headers = await get(session, proxy.origin + path, headers=other)
        assert status == 200 and "Access-Control-Allow-Origin" not in headers, path
    async with session.options(proxy.origin + "/keys", headers={**other, "Access-Control-Request-Method": "POST"}) \
            as r:
        assert "Access-Control-Allow-Origin" not in r.headers
    status, _, headers = await get(session, proxy.origin + "/v1/models",
                                   headers={**other, "Authorization": f"Bearer {key}"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"

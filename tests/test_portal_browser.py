"""The portal in a real browser: headless Chromium (Debian's, through its ChromeDriver) against the proxy.

What a person does, the way a browser does it: sign in at a real OpenID provider (tests/oidc_provider.py) or
with a one-time link, create a key and use it with the real `openai` SDK, watch it on the Usage page (the live
panel's script included), revoke it; the keyboard path through the header and the key form; that pages load
nothing from elsewhere; light and dark, wide and phone, with screenshots.

Screenshots go to docs/screenshots/<page>-<light|dark>-<wide|phone>.png when LUMEN_SCREENSHOTS=1, else to
the test's tmp_path:  LUMEN_SCREENSHOTS=1 python -m pytest tests/test_portal_browser.py -k screenshots

One Chromium serves the module; each test gets its own proxy (a TestServer on a port chosen first, so the
provider and `public_url` know the address) and a browser with no cookies, in light mode, 1280 px wide.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import struct
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from lumen_proxy.portal.guard import COOKIE, PORTAL
from lumen_proxy.store import AccountRow
from tests.browser import Browser, missing
from tests.conftest import MakeProxy, Proxy, build_config, config_dict, free_port
from tests.nodejs import node_available
from tests.oidc_provider import NODE_DIR, start_oidc_provider

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "docs" / "screenshots"
CLIENT_ID = "lumen-portal"
CLIENT_SECRET = "portal-secret"
SSO_LABEL = "Sign in with Example University"
ACCOUNTS = {"alice": {"email": "alice@example.edu", "email_verified": True, "groups": ["staff"], "name": "Alice A"}}
DEAD_ISSUER = "http://127.0.0.1:9"  # pages that only show the SSO button never ask the provider anything
STAFF = {"name": "staff", "allowance": {"coins": 50, "every": "month"},
         "limits": {"rpm": 30, "tpm": 100000, "concurrency": 3}, "max_keys": 5}
MODELS = [
    {"name": "echo", "backends": [{"url": "builtin:echo"}], "price": {"prompt": 1, "completion": 1}},
    {"name": "echo-mini", "backends": [{"url": "builtin:echo"}], "price": {"prompt": 1, "completion": 2}},
]

# Rows of a table named by its <caption> (the Usage page's "By model" and "By key"), cells as text.
TABLE_BY_CAPTION = """
const table = [...document.querySelectorAll('table')].find(t => t.caption && t.caption.textContent.trim() ===
                                                             arguments[0]);
return table ? [...table.tBodies[0].rows].map(r => [...r.cells].map(c => c.textContent.trim())) : null;
"""
LIVE_STAMP = "Updated every 3 s."  # the live panel's line until its script's first poll rewrites it
ROWS = "return [...document.querySelectorAll(arguments[0])].map(r => [...r.cells].map(c => c.textContent.trim()))"


# -- the browser and the proxy -------------------------------------------------------------------------------
class Portal(Proxy):
    """The usual test proxy, with the portal test's own helpers."""

    @property
    def database(self) -> Path:
        return Path(self.rt.config.database)

    async def account(self, name: str) -> AccountRow:
        async with self.rt.usage.lock:  # the server's own connection: never inside a usage batch
            row = await self.rt.store.add_account(name, 0, group="staff")
        await self.rt.view.reload()
        return row

    async def key(self, account: str, label: str) -> str:
        async with self.rt.usage.lock:
            key, _ = await self.rt.store.create_key(account, label)
        await self.rt.view.reload()
        return key

    async def link(self, account: str) -> str:
        async with self.rt.usage.lock:
            token, _ = await self.app[PORTAL].records.create_link(account)
        await self.rt.view.reload()
        return token

    def chat(self, key: str, model: str = "echo", text: str = "Hello from the browser test") -> str:
        """One chat completion with the real (sync) SDK: call it in a thread, the loop serves the proxy."""
        with openai.OpenAI(base_url=self.origin + "/v1", api_key=key, max_retries=0) as client:
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
        return reply.choices[0].message.content or ""


def portal_config(tmp_path: Path, port: int, issuer: str) -> dict[str, Any]:
    data = config_dict(tmp_path, [], public_url=f"http://127.0.0.1:{port}", groups=[STAFF], default_group="staff")
    data["models"] = MODELS
    data["portal"] = {
        "oidc": {"issuer": issuer, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "label": SSO_LABEL,
                 "account_claim": "email", "groups_claim": "groups", "groups": {"staff": "staff"},
                 "scopes": ["openid", "email", "profile", "groups"]},
        "new_accounts": {"create": True},
    }
    return data


StartPortal = Callable[..., Awaitable[Portal]]


@pytest.fixture
def make_portal(tmp_path: Path, make_proxy: MakeProxy) -> StartPortal:
    async def start(port: int | None = None, issuer: str = DEAD_ISSUER) -> Portal:
        port = port or free_port()
        proxy = await make_proxy(build_config(tmp_path, portal_config(tmp_path, port, issuer)), port=port)
        return Portal(proxy.server, proxy.app, proxy.clients)  # closed by make_proxy

    return start


async def sign_in(browser: Browser, portal: Portal, account: str) -> None:
    """A signed-in browser without a sign-in flow (tests 1 and 2 are about those): a session and its cookie."""
    row = await portal.rt.store.account(account)
    sid, _session = await portal.app[PORTAL].records.open_session(row.id, "link", 1)
    cookie = {"name": COOKIE, "value": sid, "url": portal.origin, "path": "/", "httpOnly": True, "sameSite": "Lax"}
    assert (await browser.run(browser.driver.execute_cdp_cmd, "Network.setCookie", cookie))["success"]
    await browser.open("/keys")
    assert await browser.current() == "/keys"


# -- 1. OpenID Connect, a key, the SDK, the Usage page, revoking -----------------------------------------------
@pytest.mark.skipif(not node_available() or not (NODE_DIR / "node_modules" / "oidc-provider").is_dir(),
                    reason="needs node and tests/node's oidc-provider (npm ci)")
@pytest.mark.timeout(120)
async def test_oidc_sign_in_then_a_key_used_watched_and_revoked(browser: Browser, make_portal: StartPortal) -> None:
    port = free_port()
    callback = f"http://127.0.0.1:{port}/login/oidc/callback"
    op = await asyncio.to_thread(start_oidc_provider, CLIENT_ID, CLIENT_SECRET, [callback], ACCOUNTS)
    try:
        portal = await make_portal(port, issuer=op.issuer)
        browser.origin = portal.origin

        # The sign-in page's button leads to the provider's login form; alice signs in there.
        await browser.open("/login")
        await browser.click_text("a", SSO_LABEL)
        await browser.wait(lambda d: d.current_url.startswith(op.issuer) and d.find_elements(By.NAME, "login"),
                           message="the provider's login form did not show")
        await browser.fill("input[name=login]", "alice")
        await browser.fill("input[name=password]", "any password")
        await browser.click("form button[type=submit]")
        assert await browser.wait_path("/keys") == "/keys"
        assert await browser.text("header .who .name") == "alice@example.edu"
        account = await portal.rt.store.account("alice@example.edu")
        assert (account.group, account.email) == ("staff", "alice@example.edu")

        # A key, shown once, with snippets that carry it.
        await browser.fill("input[name=label]", "laptop")
        await browser.click("#create-key")
        key = await browser.value("input#new-key")
        assert key.startswith("sk_") and len(key) == 43
        assert await browser.text("#new-key-title") == "Your new key: laptop"
        assert key in await browser.text("#snippet-python") and key in await browser.text("#snippet-curl")
        assert f"{portal.origin}/v1" in await browser.text("#snippet-python")
        rows = await browser.find_all("tbody tr[id^='key-']")
        assert len(rows) == 1
        key_id = (await browser.run(rows[0].get_attribute, "id")).removeprefix("key-")
        prefix = (await browser.text(f"tr#key-{key_id} code")).rstrip("…")
        assert key.startswith(prefix) and len(prefix) == 8

        # The SDK uses it; the request shows on the Usage page, in the latest requests and by key.
        assert (await asyncio.to_thread(portal.chat, key)).endswith("Hello from the browser test")
        await portal.rt.usage.flush()
        await browser.click_text("a", "Usage")
        assert await browser.current() == "/usage"
        recent = await browser.script(ROWS, "table#recent tbody tr")
        assert len(recent) == 1 and recent[0][1] == "echo" and recent[0][3] == f"{prefix}…", recent
        assert recent[0][6] == "200", recent
        by_key = await browser.script(TABLE_BY_CAPTION, "By key")
        assert [row[:3] for row in by_key] == [[f"{prefix}…", "laptop", "1"]], by_key
        by_model = await browser.script(TABLE_BY_CAPTION, "By model")
        assert [row[:2] for row in by_model] == [["echo", "1"]], by_model

        # The live panel: its script polls /usage/live.json every 3 s; a second request shows without a reload.
        shown = int(await browser.text("#live-requests .used"))
        assert shown >= 1
        await asyncio.to_thread(portal.chat, key, "echo", "once more")
        await browser.wait(lambda d: int(d.find_element(By.CSS_SELECTOR, "#live-requests .used").text) >= shown + 1,
                           10, "the live panel did not count the second request within 10 s")
        stamp = await browser.text("#live-updated")
        assert stamp.startswith("Updated ") and stamp != LIVE_STAMP, stamp
        assert await browser.script("return document.querySelector('#live-requests meter').value") >= shown + 1

        # Revoking, through the confirm page; the SDK is refused at once.
        await browser.click_text("a", "API keys")
        await browser.click(f"tr#key-{key_id} a.danger")
        assert await browser.current() == f"/keys/{key_id}/revoke"
        assert prefix in await browser.text("h1")
        await browser.click("#confirm-revoke")
        assert f"Key {prefix}… is revoked." in await browser.text(".notice")
        assert "gone" in (await browser.run((await browser.find(f"tr#key-{key_id}")).get_attribute, "class"))
        with pytest.raises(openai.AuthenticationError) as refused:
            await asyncio.to_thread(portal.chat, key)
        assert refused.value.status_code == 401
    finally:
        await asyncio.to_thread(op.stop)


# -- 2. A one-time link, signing out, the link spent ---------------------------------------------------------

async def test_link_sign_in_sign_out_and_the_link_is_spent(browser: Browser, make_portal: StartPortal) -> None:
    portal = await make_portal()
    browser.origin = portal.origin
    await portal.account("bob")
    token = await portal.link("bob")

    await browser.open(f"/login/link/{token}")
    assert await browser.text("h1") == "Sign in to Lumen"
    await browser.click("#sign-in")
    assert await browser.wait_path("/keys", within=3) == "/keys"
    assert await browser.text("header .who .name") == "bob"

    await browser.click_text("button", "Sign out")
    assert await browser.wait_path("/login") == "/login"
    await browser.open("/keys")
    assert (await browser.wait_path("/login")).startswith("/login?next=")

    await browser.open(f"/login/link/{token}")
    await browser.click("#sign-in")
    assert await browser.text("h1") == "Sign-in link not valid"
    assert "already used" in await browser.text("main")


async def test_sign_out_from_the_nav(browser: Browser, make_portal: StartPortal) -> None:
    portal = await make_portal()
    browser.origin = portal.origin
    await portal.account("bo")
    await sign_in(browser, portal, "bo")
    assert await browser.text("header .who .name") == "bo"

    await browser.click_text("button", "Sign out")
    assert await browser.wait_path("/login") == "/login"
    assert not await browser.find_all("header nav")
    await browser.open("/keys")
    assert await browser.wait_path("/login") == "/login?next=/keys"
    await browser.open("/usage")
    assert await browser.wait_path("/login") == "/login?next=/usage"


# -- 3. Screenshots: light and dark, wide and phone; nothing wider than a phone ------------------------------
async def usage_history(portal: Portal, account: AccountRow, keys: dict[str, int]) -> None:
    """30 days of daily totals for the charts, written straight to SQLite (as the usage writer would have)."""
    today = datetime.now(UTC).date()
    rng = random.Random(30)
    rows = []
    for back in range(1, 30):
        day = (today - timedelta(days=back)).isoformat()
        weekend = (today - timedelta(days=back)).weekday() >= 5
        for model, key, scale, (p_price, c_price) in (("echo", keys["laptop"], 900_000, (1, 1)),
                                                       ("echo-mini", keys["notebook"], 1_400_000, (1, 2))):
            if rng.random() < 0.12:
                continue  # a day off for this model
            prompt = int(scale * rng.uniform(0.3, 1.0) * (0.35 if weekend else 1.0))
            completion = int(prompt * rng.uniform(0.2, 0.6))
            requests = max(1, prompt // 2500)
            rows.append((day, account.id, model, key, requests, rng.randint(0, 2), prompt, completion,
                         prompt * p_price + completion * c_price))

    def write() -> None:
        with sqlite3.connect(portal.database, timeout=10) as conn:
            conn.executemany("INSERT INTO usage_daily (day, account_id, model, key_id, requests, errors,"
                             " prompt_tokens, completion_tokens, cost) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.close()

    async with portal.rt.usage.lock:
        await asyncio.to_thread(write)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


class ScrollsSideways(AssertionError):
    """A page is wider than a phone's screen (not a table scrolling in its own .table-wrap)."""


PAGES = ["login", "keys", "usage"]


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.timeout(120)
async def test_screenshots_light_dark_wide_phone(page: str, browser: Browser, make_portal: StartPortal,
                                                 tmp_path: Path) -> None:
    folder = SCREENSHOTS if os.environ.get("LUMEN_SCREENSHOTS") == "1" else tmp_path / "screenshots"
    portal = await make_portal()
    browser.origin = portal.origin
    name = "ada.lovelace@example.edu"
    account = await portal.account(name)
    keys = {label: await portal.key(name, label) for label in ("laptop", "notebook")}
    if page == "login":
        await browser.open("/login")
        assert await browser.text("a.button.primary") == SSO_LABEL
    elif page == "keys":
        await sign_in(browser, portal, name)
        await browser.fill("input[name=label]", "thesis-notebook")
        await browser.click("#create-key")
        assert (await browser.value("input#new-key")).startswith("sk_")
    else:
        for i in range(20):  # two models, two keys: today's bars, the tables, the latest requests
            label, model = ("laptop", "echo") if i % 3 else ("notebook", "echo-mini")
            await asyncio.to_thread(portal.chat, keys[label], model, "Summarise the lecture notes " * (1 + i % 4))
        await portal.rt.usage.flush()
        ids = {row.label: row.id for row, _name in await portal.rt.store.keys(name)}
        await usage_history(portal, account, {label: ids[label] for label in keys})
        await sign_in(browser, portal, name)
        await browser.click_text("a", "Usage")
        assert len(await browser.script(ROWS, "table#recent tbody tr")) == 20
        assert [row[0] for row in await browser.script(TABLE_BY_CAPTION, "By model")] == ["echo-mini", "echo"]
        assert len(await browser.find_all("svg.chart rect")) > 40

    sideways = {}
    for scheme in ("light", "dark"):
        await browser.scheme(scheme)
        for width in ("wide", "phone"):
            await browser.width(width)
            path = folder / f"{page}-{scheme}-{width}.png"
            assert await browser.screenshot(path) > 0
            shot_width, shot_height = png_size(path.read_bytes())
            assert shot_width == (1280 if width == "wide" else 390) and shot_height > 300, (path, shot_width)
            if width == "phone":
                scroll, viewport = await browser.overflow()
                if scroll > viewport + 1:
                    sideways[scheme] = (scroll, viewport, await browser.wider_than_viewport())
    assert sorted(p.name for p in folder.glob(f"{page}-*.png")) == sorted(
        f"{page}-{scheme}-{width}.png" for scheme in ("light", "dark") for width in ("wide", "phone"))
    if sideways:  # after the screenshots, so they are written (and show it) either way
        raise ScrollsSideways(f"{page} scrolls sideways at 390 px (document width, viewport, culprits): {sideways}")


# -- 4. The keyboard ---------------------------------------------------------------------------------------
async def test_keyboard_skip_link_nav_and_the_key_form(browser: Browser, make_portal: StartPortal) -> None:
    portal = await make_portal()
    browser.origin = portal.origin
    await portal.account("kim")
    await sign_in(browser, portal, "kim")

    # Tab from the top: the skip link first (and visible once focused), then the header's links in order.
    seen = []
    for _ in range(6):
        await browser.press(Keys.TAB)
        seen.append(await browser.active())
    assert [(s["tag"], s["text"]) for s in seen] == [
        ("a", "Skip to content"), ("a", "Lumen"), ("a", "Chat"), ("a", "API keys"), ("a", "Usage"),
        ("button", "Sign out")], seen
    outline = await browser.script("return getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", ""), "the focused Sign out button shows no focus outline"
    await browser.open("/keys")
    await browser.press(Keys.TAB)
    box = await browser.script("const r = document.activeElement.getBoundingClientRect();"
                               "return [r.left, r.top, r.width, r.height, innerWidth, innerHeight]")
    assert box[0] >= 0 and box[1] >= 0 and box[2] > 0 and box[0] + box[2] <= box[4], f"skip link off screen: {box}"

    # The skip link skips: Enter, then Tab lands inside <main> (the key form's label field).
    await browser.press(Keys.ENTER)
    await browser.press(Keys.TAB)
    focused = await browser.active()
    assert focused["inMain"] and focused["name"] == "label", focused

    # The create form submits with Enter from the label field.
    await browser.fill("input[name=label]", "by-keyboard", enter=True)
    assert await browser.text("#new-key-title") == "Your new key: by-keyboard"
    assert (await browser.value("input#new-key")).startswith("sk_")

    # Every field has an accessible name (a wrapping <label>, label[for], aria-label or aria-labelledby).
    assert await browser.find_all("input#new-key, input[name=label], select[name=expires_days]")
    assert await browser.unlabelled_fields() == []
    key_id = (await browser.run((await browser.find("tbody tr[id^='key-']")).get_attribute, "id")).removeprefix("key-")
    await browser.open(f"/keys/{key_id}/revoke")
    assert await browser.unlabelled_fields() == []
    await browser.open("/usage")
    assert await browser.unlabelled_fields() == []


# -- 5. Nothing from elsewhere, no console errors ------------------------------------------------------------
async def test_pages_load_only_from_the_proxy(browser: Browser, make_portal: StartPortal) -> None:
    portal = await make_portal()
    browser.origin = portal.origin
    await portal.account("lee")
    key = await portal.key("lee", "script")
    await asyncio.to_thread(portal.chat, key)
    await portal.rt.usage.flush()
    token = await portal.link("lee")
    key_id = (await portal.rt.store.keys("lee"))[0][0].id

    pages = ["/login", f"/login/link/{token}", "/keys", f"/keys/{key_id}/revoke", "/usage", "/keys/999/revoke"]
    for path in pages:
        if path == "/keys":
            await sign_in(browser, portal, "lee")
        await browser.open(path)
        if path == "/usage":  # the live panel's first poll of /usage/live.json, 3 s after the load
            await browser.wait(lambda d: d.find_element(By.ID, "live-updated").text != LIVE_STAMP, 6)
        loaded = await browser.resources()
        assert loaded, f"{path}: no stylesheet or script loaded"
        elsewhere = [url for url in loaded if not url.startswith(portal.origin + "/")]
        assert elsewhere == [], f"{path} loaded from elsewhere: {elsewhere}"
        problems = [entry["message"] for entry in await browser.console()
                    if entry["level"] == "SEVERE" and "/keys/999/revoke" not in entry["message"]]
        assert problems == [], f"{path}: console errors: {problems}"
        if path == "/usage":
            assert {url.split("?")[0].removeprefix(portal.origin) for url in loaded} >= {
                "/static/portal.css", "/static/portal.js", "/usage/live.json"}, loaded


# -- 6. Dark mode ------------------------------------------------------------------------------------------
async def test_dark_mode_changes_the_page(browser: Browser, make_portal: StartPortal) -> None:
    portal = await make_portal()
    browser.origin = portal.origin
    await browser.open("/login")
    await browser.scheme("light")
    light = (await browser.background("body"), await browser.background(".card"))
    await browser.scheme("dark")
    dark = (await browser.background("body"), await browser.background(".card"))
    assert light[0] != dark[0] and light[1] != dark[1], (light, dark)
    assert light[0] == "rgb(246, 247, 249)" and dark[0] == "rgb(15, 18, 22)", (light, dark)
    assert await browser.script("return getComputedStyle(document.body).color") == "rgb(230, 233, 238)"

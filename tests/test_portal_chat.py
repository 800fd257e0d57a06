"""The portal's Chat page in a real browser: headless Chromium (Debian's, through its ChromeDriver).

What a person does on /chat, the way a browser does it: pick a model, set a system prompt, talk over several
turns while the answer streams in, stop an answer half-way, meet Lumen's refusals (no coins, a rate limit),
get Markdown that is rendered but cannot run anything, keep conversations in the browser (rename, delete,
reload) while Lumen stores no prompt; and, without a browser, that /chat/completions wants the session and
its CSRF token (never a key). What happened is read from the fake backend's recordings and from the
database with a connection of the test's own.

Screenshots go to docs/screenshots/chat-<light|dark>-<wide|phone>.png when LUMEN_SCREENSHOTS=1, else to
the test's tmp_path:  LUMEN_SCREENSHOTS=1 python -m pytest tests/test_portal_chat.py -k screenshots

One Chromium serves the module; each test gets its own proxy (gpt-4o on the fake upstream, priced, and the
built-in echo) and a browser with no cookies, in light mode, 1280 px wide. Each proxy has its own port, so
its own origin and its own local storage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from lumen_proxy.portal.guard import COOKIE, PORTAL
from lumen_proxy.relay import NO_COINS
from tests.browser import Browser, missing
from tests.conftest import MakeProxy, Proxy, build_config, config_dict, query
from tests.fake_upstream import UpstreamServer

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHAT_PATH = "/v1/chat/completions"  # what the fake upstream is asked
SYSTEM = ("You are a careful assistant for the Lumen chat test. Answer briefly and plainly, in full sentences, "
          "without lists, and say so when you are not sure about something at all.")
STOPPED_NOTE = " (stopped: the part received was billed)"

# The text of each message (role from its class, body and cost line), in order.
MESSAGES = """
return [...document.querySelectorAll('#messages .message')].map(m => ({
  role: ['user', 'assistant', 'error'].find(r => m.classList.contains(r)) || m.className,
  body: m.querySelector('.body').innerText.trim(), cost: (m.querySelector('.cost') || {}).textContent || '',
  stopped: !!m.querySelector('.stopped')}));
"""
# Every text the last assistant answer showed while it streamed (a MutationObserver on #messages).
WATCH_STREAM = """
window.seenTexts = [];
new MutationObserver(() => {
  const bodies = document.querySelectorAll('#messages .message.assistant .body');
  const last = bodies[bodies.length - 1];
  if (last && last.isConnected) window.seenTexts.push(last.textContent);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""
IDLE = "return !document.getElementById('send').hidden && document.getElementById('stop').hidden"
CONVERSATIONS = "return [...document.querySelectorAll('#conversations li .open')].map(b => b.textContent)"
MARKDOWN_ATTACK = """Here is **bold** text, and a table and some code below.

<script>window.pwned=1</script>

<img src=x onerror="window.pwned=2">

A [bad link](javascript:alert(1)) and [a good one](https://example.org/docs).

```python
import openai
client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="sk_...")
print(client.models.list())
```

| Model | Prompt | Completion |
|-------|-------:|-----------:|
| gpt-4o | 2.5 | 10 |
| echo | 1 | 1 |
"""
SHOWCASE = """Call Lumen with the `openai` SDK; only the base URL and the key change:

```python
from openai import OpenAI
client = OpenAI(base_url="https://lumen.example.edu/v1", api_key="sk_your_key_from_the_keys_page_goes_here")
reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hello"}])
print(reply.choices[0].message.content)
```

What the two models cost, in coins per million tokens:

| Model | Prompt | Completion |
|-------|-------:|-----------:|
| gpt-4o | 2.5 | 10 |
| echo | 1 | 1 |
"""


# -- the browser and the proxy -------------------------------------------------------------------------------
@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> Proxy:
    """gpt-4o on the fake upstream (2.5 / 10 coins per million tokens), the built-in echo, no portal config:
    sessions are opened by the test (the sign-in flows are tests/test_portal_browser.py's)."""
    return await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url])))


async def open_session(proxy: Proxy, account: str) -> tuple[str, str]:
    """A session of `account`: its id (the cookie's value) and its CSRF token."""
    row = await proxy.rt.store.account(account)
    sid, session = await proxy.app[PORTAL].records.open_session(row.id, "link", 1)
    return sid, session.csrf


async def sign_in(browser: Browser, proxy: Proxy, account: str) -> None:
    """A signed-in browser on /chat, by a session and its cookie."""
    browser.origin = proxy.origin
    sid, _csrf = await open_session(proxy, account)
    cookie = {"name": COOKIE, "value": sid, "url": proxy.origin, "path": "/", "httpOnly": True, "sameSite": "Lax"}
    assert (await browser.run(browser.driver.execute_cdp_cmd, "Network.setCookie", cookie))["success"]
    await browser.open("/chat")
    assert await browser.current() == "/chat"
    await browser.wait(lambda d: d.execute_script("return !!(window.marked && window.DOMPurify)"), 5,
                       "the vendored marked and DOMPurify did not load")


async def set_limits(proxy: Proxy, account: str, **limits: int) -> None:
    async with proxy.rt.usage.lock:
        await proxy.rt.store.update_account(account, **limits)
    await proxy.rt.view.reload()


async def choose_model(browser: Browser, model: str) -> None:
    element = await browser.find("select#model")
    await browser.run(Select(element).select_by_value, model)


async def set_system(browser: Browser, text: str) -> None:
    await browser.click("#system-box summary")  # the textarea shows (and takes keys) once the box is open
    await browser.fill("textarea#system", text)


async def send(browser: Browser, text: str) -> None:
    """Type `text` in the composer and press Send."""
    await browser.fill("textarea#prompt", text)
    await browser.click("button#send")


async def settled(browser: Browser, count: int, within: float = 10) -> list[dict[str, str]]:
    """Wait until `count` messages show, the answer is over (Send back, Stop hidden) and every assistant
    answer shows its cost line; the messages."""
    def done(d: WebDriver) -> Any:
        if not d.execute_script(IDLE):
            return False
        shown = d.execute_script(MESSAGES)
        ready = len(shown) == count and all(m["cost"] for m in shown if m["role"] == "assistant")
        return shown if ready else False
    try:
        return list(await browser.wait(done, within))
    except TimeoutException:
        raise AssertionError(f"expected {count} settled messages, the page shows "
                             f"{await browser.script(MESSAGES)}") from None


def usage_rows(proxy: Proxy, account_id: int) -> list[sqlite3.Row]:
    return query(Path(proxy.rt.config.database), "SELECT request_id, account_id, key_id, model, status, prompt_tokens,"
                 " completion_tokens, cost, partial, estimated FROM usage WHERE account_id = ? ORDER BY id",
                 account_id)


def js_number(value: float) -> str:
    """String(Number(value.toFixed(6))) in JavaScript, for the plain numbers a cost line shows."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def cost_line(row: sqlite3.Row) -> str:
    """The cost line the spec asks for: the row's tokens and its coins (to the micro-coin)."""
    line = f"{row['prompt_tokens']} tokens in, {row['completion_tokens']} out · {js_number(row['cost'] / 1e6)} coins"
    return line + (STOPPED_NOTE if row["partial"] else "")


async def click_then_dialog(browser: Browser, css: str) -> Any:
    """Click a button that opens window.prompt/confirm; the open dialog (Browser.click would run a script and
    so dismiss it)."""
    element = await browser.find(css)
    await browser.run(element.click)
    return await browser.run(lambda: WebDriverWait(browser.driver, 5).until(expected_conditions.alert_is_present()))


def button_of(title_start: str, label: str) -> str:
    """An XPath to the `label` button (Rename, Delete) of the conversation whose title starts so."""
    return (f"//ul[@id='conversations']/li[button[contains(@class, 'open') and starts-with(normalize-space(),"
            f" '{title_start}')]]/button[normalize-space()='{label}']")


# -- 1. A streamed multi-turn conversation -------------------------------------------------------------------
@pytest.mark.timeout(120)
async def test_a_streamed_conversation_over_two_turns(browser: Browser, proxy: Proxy,
                                                      upstream: UpstreamServer) -> None:
    account = await proxy.account("ada")
    await sign_in(browser, proxy, "ada")
    options = await browser.script("return [...document.querySelectorAll('#model option')].map(o => o.value)")
    assert options[0] == "gpt-4o" and "echo" in options, options
    assert await browser.unlabelled_fields() == []
    await choose_model(browser, "gpt-4o")
    await set_system(browser, SYSTEM)
    upstream.state.behavior.chunk_delay = 0.05  # slow enough to see the answer grow

    # The first turn: the answer streams in (several texts, each longer), then shows its cost.
    await browser.script(WATCH_STREAM)
    await send(browser, "first")
    shown = await settled(browser, 2)
    first_answer = "Echo from up1 [messages=2 system=yes]: first"
    assert [(m["role"], m["body"]) for m in shown] == [("user", "first"), ("assistant", first_answer)], shown
    seen = [t for t in await browser.script("return window.seenTexts") if t]
    growing = sorted({len(t) for t in seen if first_answer.startswith(t.strip())})
    assert len(growing) >= 3, f"the answer did not stream in (texts seen while it came): {seen}"
    assert await browser.value("textarea#prompt") == ""

    # The second turn, by the keyboard (Enter sends): the backend gets the whole conversation, in order.
    await browser.fill("textarea#prompt", "second\n")
    shown = await settled(browser, 4)
    second_answer = "Echo from up1 [messages=4 system=yes]: second"
    assert [m["body"] for m in shown] == ["first", first_answer, "second", second_answer], shown
    asked = upstream.state.requests_to(CHAT_PATH)
    assert len(asked) == 2
    assert asked[-1].body["messages"] == [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": first_answer}, {"role": "user", "content": "second"}]
    assert asked[-1].body["stream"] is True and asked[-1].body["model"] == "fake-model"
    assert asked[-1].authorization == "Bearer upstream-secret-key"  # the backend's key, never the session's

    # Each answer's cost line is its usage row: the account's, with key id 0 (the portal's chat).
    await proxy.flush()
    rows = usage_rows(proxy, account.id)
    assert [(r["account_id"], r["key_id"], r["model"], r["status"], r["partial"]) for r in rows] == [
        (account.id, 0, "gpt-4o", 200, 0)] * 2
    assert all(r["cost"] >= 100 for r in rows), "costs of at least 0.0001 coins: the line shows them in full"
    assert [m["cost"] for m in shown if m["role"] == "assistant"] == [cost_line(r) for r in rows]
    assert rows[1]["prompt_tokens"] > rows[0]["prompt_tokens"]  # the second turn carried the first


# -- 2. Stop ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
async def test_stop_keeps_the_partial_answer_and_bills_it(browser: Browser, proxy: Proxy,
                                                          upstream: UpstreamServer) -> None:
    account = await proxy.account("bo")
    await sign_in(browser, proxy, "bo")
    words = [f"w{i}" for i in range(1, 301)]
    upstream.state.behavior.reply = " ".join(words)
    upstream.state.behavior.chunk_delay = 0.2  # a minute for the whole answer

    await send(browser, "Tell me a long story")
    assert await browser.script("return document.getElementById('stop').hidden") is False
    await browser.wait(lambda d: "w5" in d.execute_script(MESSAGES)[-1]["body"], 10, "no streamed text within 10 s")
    await browser.click("button#stop")
    shown = await settled(browser, 2)
    body = shown[-1]["body"]
    assert shown[-1]["stopped"], shown[-1]  # the note is beside the answer, not in it
    received = body.split()
    assert len(received) >= 5 and received == words[:len(received)] and len(received) < 100, body

    # The backend saw the client leave before the end; the usage row is partial, 499, and billed.
    await asyncio.wait_for(upstream.state.disconnected.wait(), 5)
    cut = upstream.state.requests_to(CHAT_PATH)[-1]
    assert cut.disconnected and not cut.finished
    await proxy.flush()
    rows = usage_rows(proxy, account.id)
    assert len(rows) == 1
    row = rows[0]
    # 200 when the relay's handler is cancelled after the stream began (status as sent), 499 when a write
    # notices first (relay_stream): the same departure, two statuses (reported); partial either way.
    assert (row["partial"], row["estimated"], row["key_id"]) == (1, 1, 0) and row["status"] in (200, 499), dict(row)
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] >= len(received) and row["cost"] > 0, dict(row)
    assert shown[-1]["cost"] == cost_line(row), (shown[-1], dict(row))

    # The conversation goes on: the stopped answer (without the note) is part of what the next request sends.
    upstream.state.behavior.reply = None
    upstream.state.behavior.chunk_delay = 0
    await send(browser, "shorter please")
    shown = await settled(browser, 4)
    assert shown[-1]["body"] == "Echo from up1 [messages=3 system=no]: shorter please"
    sent = upstream.state.requests_to(CHAT_PATH)[-1].body["messages"]
    assert sent[1]["role"] == "assistant" and sent[1]["content"] == " ".join(received), sent


# -- 3. Lumen's refusals, shown as errors ----------------------------------------------------------------------
@pytest.mark.timeout(120)
async def test_no_coins_a_rate_limit_and_a_failing_backend_show_lumens_message(
        browser: Browser, proxy: Proxy, upstream: UpstreamServer) -> None:
    await proxy.account("poor", coins=0)
    await sign_in(browser, proxy, "poor")
    await send(browser, "hello")
    shown = await settled(browser, 2)
    assert shown[-1] == {"role": "error", "body": NO_COINS, "cost": "", "stopped": False}, shown
    assert await browser.script("return document.querySelector('.message.error').getAttribute('role')") == "alert"
    assert upstream.state.requests_to(CHAT_PATH) == []

    # Coins now, but the backend is down: the backend's failure comes as Lumen's message, not a bare status.
    async with proxy.rt.usage.lock:
        await proxy.rt.store.add_coins("poor", 10 * 1_000_000)
    await proxy.rt.view.reload()
    upstream.state.behavior.fail_status = 503
    await send(browser, "hello again")
    shown = await settled(browser, 4)
    assert shown[-1]["role"] == "error" and shown[-1]["body"], shown
    assert shown[-1]["body"] == "Model backend for `gpt-4o` is currently unavailable. Retry later.", shown[-1]

    # A rate limit of one request a minute: the second message gets the 429's message and its wait.
    await proxy.account("hasty")
    await set_limits(proxy, "hasty", rpm=1)
    await browser.reset()
    await sign_in(browser, proxy, "hasty")
    upstream.state.behavior.fail_status = None
    await send(browser, "one")
    await settled(browser, 2)
    await send(browser, "two")
    shown = await settled(browser, 4)
    error = shown[-1]
    assert error["role"] == "error", shown
    assert error["body"].startswith("Rate limit reached for requests per minute (limit 1)"), error
    assert re.search(r"Retry after \d+(\.\d+)?s\.", error["body"]), error  # Lumen's own words carry the wait
    assert len(upstream.state.requests_to(CHAT_PATH)) == 2  # hello again (503) and one; two never left Lumen


async def test_the_rate_limit_message_names_its_wait_once(browser: Browser, proxy: Proxy) -> None:
    await proxy.account("hasty")
    await set_limits(proxy, "hasty", rpm=1)
    await sign_in(browser, proxy, "hasty")
    await choose_model(browser, "echo")
    await send(browser, "one")
    await settled(browser, 2)
    await send(browser, "two")
    error = (await settled(browser, 4))[-1]
    assert error["role"] == "error"
    assert len(re.findall(r"retry after|try again", error["body"], re.IGNORECASE)) == 1, error["body"]


# -- 4. Markdown: rendered, sanitised, with Copy buttons --------------------------------------------------------
@pytest.mark.timeout(120)
async def test_markdown_is_rendered_and_cannot_run_anything(browser: Browser, proxy: Proxy,
                                                            upstream: UpstreamServer) -> None:
    await proxy.account("cy")
    await sign_in(browser, proxy, "cy")
    upstream.state.behavior.reply = MARKDOWN_ATTACK
    await send(browser, "Show me everything")
    await settled(browser, 2)

    async def check() -> None:
        assert await browser.script("return typeof window.pwned") == "undefined"
        found = await browser.script("""
            const box = document.getElementById('messages');
            const answer = [...box.querySelectorAll('.message.assistant .body')].pop();
            return {scripts: box.querySelectorAll('script').length,
                    handlers: [...box.querySelectorAll('*')].filter(e => [...e.attributes].some(
                        a => a.name.startsWith('on'))).map(e => e.outerHTML),
                    links: [...answer.querySelectorAll('a')].map(a => [a.textContent, a.getAttribute('href'),
                                                                     a.target, a.rel]),
                    bold: answer.querySelector('strong')?.textContent,
                    code: answer.querySelector('pre code')?.textContent,
                    copy: [...answer.querySelectorAll('.code-block > button.copy-code')].map(b => b.textContent),
                    table: [...answer.querySelectorAll('table tr')].map(r => [...r.cells].map(
                        c => c.textContent.trim()))};""")
        assert found["scripts"] == 0 and found["handlers"] == [], found
        assert all(not (href or "").strip().lower().startswith("javascript:") for _t, href, _g, _r in found["links"])
        assert ["a good one", "https://example.org/docs", "_blank", "noopener noreferrer"] in found["links"], found
        assert found["bold"] == "bold"
        assert found["code"].startswith("import openai\n") and 'base_url="http://127.0.0.1:8080/v1"' in found["code"]
        assert found["copy"] == ["Copy"]
        assert found["table"] == [["Model", "Prompt", "Completion"], ["gpt-4o", "2.5", "10"], ["echo", "1", "1"]]

    await check()
    # Stored as the raw Markdown in local storage, rendered again (and sanitised again) after a reload.
    await browser.open("/chat")
    await browser.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages pre code"), 5)
    await check()

    # Copy puts the code (not the button's own label) on the clipboard, and says so.
    await browser.run(browser.driver.execute_cdp_cmd, "Browser.grantPermissions", {
        "origin": proxy.origin, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    await browser.click("#messages .code-block > button.copy-code")
    await browser.wait(lambda d: d.find_element(By.CSS_SELECTOR, ".code-block > button.copy-code").text == "Copied", 5,
                       "the Copy button did not say Copied")
    copied = await browser.run(browser.driver.execute_async_script,
                               "navigator.clipboard.readText().then(arguments[0], e => arguments[0]('!' + e))")
    assert copied.startswith("import openai\n") and "Copy" not in copied, copied


# -- 5. Conversations live in the browser only -------------------------------------------------------------
@pytest.mark.timeout(120)
async def test_conversations_are_kept_in_the_browser_only(browser: Browser, proxy: Proxy, upstream: UpstreamServer,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lumen_proxy")
    caplog.set_level(logging.INFO)
    await proxy.account("dee")
    await proxy.account("eve")
    await sign_in(browser, proxy, "dee")
    secrets = [f"alpha-{uuid.uuid4().hex}", f"beta-{uuid.uuid4().hex}"]

    await send(browser, f"{secrets[0]} the first conversation")
    await settled(browser, 2)
    await browser.click("button#new-chat")
    assert await browser.script(MESSAGES) == []
    assert (await browser.active())["id"] == "prompt"  # ready to type
    await send(browser, f"{secrets[1]} the second conversation")
    await settled(browser, 2)
    titles = await browser.script(CONVERSATIONS)
    assert [t[:5] for t in titles] == ["beta-", "alpha"], titles

    # A reload lists both (the newest first, and open); the first opens with its messages.
    await browser.open("/chat")
    assert [t[:5] for t in await browser.script(CONVERSATIONS)] == ["beta-", "alpha"]
    assert (await browser.script(MESSAGES))[0]["body"].startswith(secrets[1])
    await browser.click_text("button", titles[1])
    assert (await browser.script(MESSAGES))[0]["body"].startswith(secrets[0])

    # Rename the first (window.prompt), delete the second (window.confirm).
    element = await browser.run(browser.driver.find_element, By.XPATH, button_of("alpha", "Rename"))
    assert await browser.run(element.get_attribute, "aria-label") == f"Rename {titles[1]}"
    await browser.run(element.click)
    dialog = await browser.run(lambda: WebDriverWait(browser.driver, 5).until(
        expected_conditions.alert_is_present()))
    assert dialog.text == "Rename the conversation"
    await browser.run(dialog.send_keys, "Renamed chat")
    await browser.run(dialog.accept)
    await browser.wait(lambda d: d.execute_script(CONVERSATIONS)[1] == "Renamed chat", 5)
    element = await browser.run(browser.driver.find_element, By.XPATH, button_of("beta", "Delete"))
    await browser.run(element.click)
    dialog = await browser.run(lambda: WebDriverWait(browser.driver, 5).until(
        expected_conditions.alert_is_present()))
    assert dialog.text == f"Delete “{titles[0]}” from this browser?"
    await browser.run(dialog.accept)
    await browser.wait(lambda d: d.execute_script(CONVERSATIONS) == ["Renamed chat"], 5)

    await browser.open("/chat")
    assert await browser.script(CONVERSATIONS) == ["Renamed chat"]
    assert (await browser.script(MESSAGES))[0]["body"].startswith(secrets[0])
    stored = json.loads(await browser.script("return localStorage.getItem('lumen.chat.v1:dee')"))
    assert [(c["title"], c["messages"][0]["content"].split()[0]) for c in stored] == [("Renamed chat", secrets[0])]

    # Another account in the same browser sees its own (empty) list.
    await browser.reset()
    await sign_in(browser, proxy, "eve")
    assert await browser.script(CONVERSATIONS) == []

    # Lumen kept no prompt: not in its database (WAL included), not in its log; the backend did get them.
    await proxy.flush()
    assert [m.body["messages"][-1]["content"].split()[0] for m in upstream.state.requests_to(CHAT_PATH)] == secrets
    database = Path(proxy.rt.config.database)
    files = sorted(database.parent.glob(database.name + "*"))
    assert database in files
    for secret in secrets:
        for file in files:
            assert secret.encode() not in file.read_bytes(), f"{secret} stored in {file.name}"
        assert secret not in caplog.text, f"{secret} in the server's log"
    assert '"POST /chat/completions HTTP/1.1" 200' in caplog.text, "the server's log was not captured"


# -- 6. The endpoint: a session and its CSRF token, never a key -----------------------------------------------
async def test_chat_completions_wants_the_session_and_its_csrf_token(proxy: Proxy,
                                                                     upstream: UpstreamServer) -> None:
    account = await proxy.account("fay")
    key = await proxy.key("fay")
    sid, csrf = await open_session(proxy, "fay")
    url = proxy.origin + "/chat/completions"
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    page = {"Origin": proxy.origin}

    async with aiohttp.ClientSession(cookies={COOKIE: sid}) as signed, aiohttp.ClientSession() as anonymous:
        for headers in (page, {**page, "X-CSRF-Token": "not-the-token"}, {**page, "X-CSRF-Token": ""}):
            async with signed.post(url, json=body, headers=headers) as r:
                assert r.status == 403, await r.text()
                assert r.content_type == "text/html" and "Refused" in await r.text()
        async with signed.post(url, json=body, headers={"X-CSRF-Token": csrf}) as r:  # no Origin: refused too
            assert r.status == 403
        async with anonymous.post(url, json=body, headers={**page, "Authorization": f"Bearer {key}"},
                                  allow_redirects=False) as r:
            text = await r.text()
            assert r.status == 401 and r.content_type == "text/html", text
            assert "Signed out" in text and "choices" not in text
        async with anonymous.get(proxy.origin + "/chat", headers={"Authorization": f"Bearer {key}"},
                                 allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/login?next=/chat"
        assert upstream.state.requests_to(CHAT_PATH) == []

        # With both, the request is relayed as the account (key id 0), and its cost is readable by it only.
        async with signed.post(url, json=body, headers={**page, "X-CSRF-Token": csrf}) as r:
            assert r.status == 200, await r.text()
            request_id = r.headers["x-request-id"]
            assert (await r.json())["choices"][0]["message"]["content"].endswith(": hi")
        await proxy.flush()
        async with signed.get(f"{proxy.origin}/usage/request/{request_id}.json") as r:
            cost = await r.json()
            assert r.status == 200 and cost["model"] == "gpt-4o" and cost["partial"] is False, cost
        await proxy.account("gus")
        other, _ = await open_session(proxy, "gus")
        async with aiohttp.ClientSession(cookies={COOKIE: other}) as someone_else:
            async with someone_else.get(f"{proxy.origin}/usage/request/{request_id}.json") as r:
                assert r.status == 404
        async with anonymous.get(f"{proxy.origin}/usage/request/{request_id}.json",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 401
    rows = usage_rows(proxy, account.id)
    assert [(r["request_id"], r["key_id"], r["status"]) for r in rows] == [(request_id, 0, 200)]

    # The page offers the models the account may use, no other.
    await proxy.account("hal", models=["echo"])
    hal, _ = await open_session(proxy, "hal")
    async with aiohttp.ClientSession(cookies={COOKIE: hal}) as session, session.get(proxy.origin + "/chat") as r:
        assert r.status == 200
        assert re.findall(r'<option value="([^"]+)">', await r.text()) == ["echo"]


# -- 7. Screenshots: light and dark, wide and phone -----------------------------------------------------------
class ScrollsSideways(AssertionError):
    """The page is wider than a phone's screen."""


@pytest.mark.timeout(120)
async def test_screenshots_light_dark_wide_phone(browser: Browser, proxy: Proxy, upstream: UpstreamServer,
                                                 tmp_path: Path) -> None:
    folder = SCREENSHOTS if os.environ.get("LUMEN_SCREENSHOTS") == "1" else tmp_path / "screenshots"
    name = "ada.lovelace@example.edu"
    await proxy.account(name)
    await sign_in(browser, proxy, name)
    await send(browser, "What is Lumen, in one sentence?")
    await settled(browser, 2)
    await browser.click("button#new-chat")
    upstream.state.behavior.reply = SHOWCASE
    await send(browser, "How do I call Lumen from Python, and what do the models cost?")
    shown = await settled(browser, 2)
    assert shown[-1]["cost"].endswith(" coins")
    assert len(await browser.find_all("#messages pre code")) == 1 and len(await browser.find_all("#messages table"))
    assert len(await browser.script(CONVERSATIONS)) == 2
    assert await browser.unlabelled_fields() == []
    await browser.script("document.activeElement.blur()")

    sideways = {}
    for scheme in ("light", "dark"):
        await browser.scheme(scheme)
        for width in ("wide", "phone"):
            await browser.width(width)
            if width == "wide":  # tall enough that the messages need no scrolling of their own: a screenshot
                await browser.run(browser.driver.set_window_size, 1280, 1000)  # beyond the viewport scrolls
            path = folder / f"chat-{scheme}-{width}.png"                          # them back to the top
            assert await browser.screenshot(path) > 0
            if width == "phone":
                scroll, viewport = await browser.overflow()
                if scroll > viewport + 1:
                    sideways[scheme] = (scroll, viewport, await browser.wider_than_viewport())
    assert sorted(p.name for p in folder.glob("chat-*.png")) == sorted(
        f"chat-{scheme}-{width}.png" for scheme in ("light", "dark") for width in ("wide", "phone"))
    if sideways:  # after the screenshots, so they are written (and show it) either way
        raise ScrollsSideways(f"/chat scrolls sideways at 390 px (document width, viewport, culprits): {sideways}")


# -- Found while testing (strict xfails: each passes once its bug is fixed) ----------------------------------
async def test_send_and_stop_swap_while_an_answer_streams(browser: Browser, proxy: Proxy,
                                                          upstream: UpstreamServer) -> None:
    await proxy.account("ivy")
    await sign_in(browser, proxy, "ivy")
    shown = "return [...arguments].map(id => document.getElementById(id).checkVisibility())"
    upstream.state.behavior.gate = asyncio.Event()  # the backend waits: the answer is under way
    try:
        await send(browser, "hello")
        await browser.wait(lambda d: not d.execute_script(IDLE), 5)
        streaming = await browser.script(shown, "send", "stop")
    finally:
        upstream.state.behavior.gate.set()
    await settled(browser, 2)
    idle = await browser.script(shown, "send", "stop")
    assert (streaming, idle) == ([False, True], [True, False]), "[Send, Stop] visible while streaming, then idle"


@pytest.mark.timeout(120)
async def test_the_next_answer_keeps_streaming_while_the_last_cost_arrives(browser: Browser, proxy: Proxy,
                                                                           upstream: UpstreamServer) -> None:
    await proxy.account("jo")
    await sign_in(browser, proxy, "jo")
    async with proxy.rt.usage.lock:  # the usage writer waits: the first answer's cost is not recorded yet
        await send(browser, "first")
        await browser.wait(lambda d: d.execute_script(IDLE) and len(d.execute_script(MESSAGES)) == 2, 10)
        upstream.state.behavior.reply = " ".join(f"w{i}" for i in range(1, 41))
        upstream.state.behavior.chunk_delay = 0.1  # four seconds of answer
        await send(browser, "second")
        await browser.wait(lambda d: "w3" in d.execute_script(MESSAGES)[-1]["body"], 5)
    try:  # written now: the page's next poll shows the first answer's cost, while the second still streams
        await browser.wait(lambda d: d.execute_script(MESSAGES)[1]["cost"], 5, "the first cost line did not show")
        before = (await browser.script(MESSAGES))[-1]["body"]
        await asyncio.sleep(1)
        after = (await browser.script(MESSAGES))[-1]["body"]
        assert not await browser.script(IDLE), "the answer ended before the check"
    finally:
        upstream.state.behavior.chunk_delay = 0  # the rest of the answer at once: nothing left to wait for
    assert len(after) > len(before), f"the streaming answer stopped growing on the page: {before!r}"


async def test_a_small_cost_shows_its_coins(browser: Browser, proxy: Proxy) -> None:
    account = await proxy.account("kai")
    await sign_in(browser, proxy, "kai")
    await choose_model(browser, "echo")  # 1 coin per million tokens, both ways
    await send(browser, "hi")
    shown = await settled(browser, 2)
    await proxy.flush()
    [row] = usage_rows(proxy, account.id)
    assert 0 < row["cost"] < 100
    assert shown[-1]["cost"] == cost_line(row)

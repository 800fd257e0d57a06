"""A real browser for the portal's tests: Debian's Chromium, headless, through its ChromeDriver.

Nothing is downloaded at run time: the driver is /usr/bin/chromedriver (given to Selenium's Service, so
Selenium Manager never runs; SE_OFFLINE=true says the same should it ever be asked) and the browser is
/usr/bin/chromium. Tests skip, with the reason, where either is missing (CI installs both: .ci/run).

Selenium's calls block, and the proxy under test is served by the test's own event loop, so the async
:class:`Browser` runs every WebDriver call in a thread (``asyncio.to_thread``): the loop keeps serving the
pages the browser asks for. One Chromium serves a whole test module (``chrome()``); :meth:`Browser.reset`
gives each test a fresh start (no cookies, light scheme, wide window, a blank page).
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SIZES = {"wide": (1280, 900), "phone": (390, 844)}
Scheme = Literal["light", "dark"]
Width = Literal["wide", "phone"]
T = TypeVar("T")

# Which element has the focus, in words a failing assertion can show: tag, id, name, href and text.
ACTIVE = """
const e = document.activeElement;
if (!e) return null;
return {tag: e.tagName.toLowerCase(), id: e.id, name: e.getAttribute('name'), href: e.getAttribute('href'),
        text: (e.innerText || e.value || '').trim(), inMain: !!e.closest('main')};
"""

# Form fields without an accessible name: no wrapping <label>, no <label for=...>, no aria-label(ledby).
UNLABELLED = """
const out = [];
for (const e of document.querySelectorAll('input:not([type=hidden]), select, textarea')) {
  const byFor = e.id && document.querySelector('label[for="' + CSS.escape(e.id) + '"]');
  const named = (e.getAttribute('aria-label') || '').trim() || e.getAttribute('aria-labelledby');
  if (!e.closest('label') && !byFor && !named) out.push(e.outerHTML);
}
return out;
"""


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path, package in ((CHROMEDRIVER, "chromium-driver"), (CHROMIUM, "chromium")):
        if not (path.is_file() and os.access(path, os.X_OK)):
            return f"needs {path} (apt-get install {package}); nothing is downloaded at run time"
    return None


@contextmanager
def chrome() -> Iterator[WebDriver]:
    """A headless Chromium (wide window) for as long as the `with` lasts."""
    os.environ.setdefault("SE_OFFLINE", "true")  # belt and braces: a Service with a path already skips Selenium Manager
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--lang=en-US", "--no-first-run", "--disable-extensions",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, CSP violations
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(20)
        yield driver
    finally:
        driver.quit()


class Browser:
    """The module's Chromium, driven from worker threads; paths are relative to the proxy's ``origin``."""

    def __init__(self, driver: WebDriver, origin: str = "") -> None:
        self.driver = driver
        self.origin = origin

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(call, *args)

    # -- state between tests -------------------------------------------------------------------------------
    def _reset(self) -> None:
        d = self.driver
        d.get("about:blank")  # stops the last page's timers (the Usage page polls) before its server goes
        d.delete_all_cookies()
        d.execute_cdp_cmd("Network.enable", {})
        d.execute_cdp_cmd("Network.clearBrowserCookies", {})  # every origin's, the provider's included
        d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        d.set_window_size(*SIZES["wide"])
        d.get_log("browser")  # drop what earlier tests logged

    async def reset(self) -> None:
        await self.run(self._reset)

    # -- navigation and the page ---------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return path if "://" in path else self.origin + path

    async def open(self, path: str) -> None:
        await self.run(self.driver.get, self.url(path))

    async def current(self) -> str:
        """The current URL without the proxy's origin (a path, with its query)."""
        url = await self.run(lambda: self.driver.current_url)
        return url[len(self.origin):] if self.origin and url.startswith(self.origin) else url

    async def script(self, source: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, source, *args)

    async def find(self, css: str) -> WebElement:
        return await self.run(self.driver.find_element, By.CSS_SELECTOR, css)

    async def find_all(self, css: str) -> list[WebElement]:
        return await self.run(self.driver.find_elements, By.CSS_SELECTOR, css)

    async def text(self, css: str = "body") -> str:
        element = await self.find(css)
        return await self.run(lambda: element.text)

    async def value(self, css: str) -> str:
        element = await self.find(css)
        return str(await self.run(element.get_attribute, "value"))

    async def click(self, css: str) -> None:
        """Click (as a person would: the element must be visible) and wait for a page that has loaded."""
        element = await self.find(css)
        await self.run(element.click)
        await self.loaded()

    async def click_text(self, tag: str, text: str) -> None:
        """Click the visible `tag` element whose text is `text` (a link or a button, by what people read)."""
        xpath = f"//{tag}[normalize-space()={_xpath_literal(text)}]"
        element = await self.run(self.driver.find_element, By.XPATH, xpath)
        await self.run(element.click)
        await self.loaded()

    async def fill(self, css: str, text: str, *, enter: bool = False) -> None:
        element = await self.find(css)
        await self.run(element.clear)
        await self.run(element.send_keys, text + (Keys.ENTER if enter else ""))
        if enter:
            await self.loaded()

    async def loaded(self) -> None:
        await self.wait(lambda d: d.execute_script("return document.readyState") == "complete", 10)

    async def wait(self, condition: Callable[[WebDriver], Any], within: float = 10, message: str = "") -> Any:
        """WebDriverWait(condition) in a thread: its truthy result, or TimeoutException with `message`."""
        return await self.run(lambda: WebDriverWait(self.driver, within, poll_frequency=0.1).until(condition,
                                                                                                    message))

    async def wait_path(self, prefix: str, within: float = 10) -> str:
        """Wait until the browser is on the proxy at a path starting with `prefix` (redirects take hops)."""
        want = self.url(prefix)
        try:
            await self.wait(lambda d: d.current_url.startswith(want) and
                            d.execute_script("return document.readyState") == "complete", within)
        except TimeoutException:
            raise AssertionError(f"expected {want}..., the browser is at {self.driver.current_url}:\n"
                                 f"{self.driver.find_element(By.TAG_NAME, 'body').text}") from None
        return await self.current()

    # -- keyboard ------------------------------------------------------------------------------------------
    async def press(self, *keys: str) -> None:
        await self.run(lambda: webdriver.ActionChains(self.driver).send_keys(*keys).perform())

    async def active(self) -> dict[str, Any]:
        return dict(await self.script(ACTIVE) or {})

    async def unlabelled_fields(self) -> list[str]:
        return list(await self.script(UNLABELLED))

    # -- looks ---------------------------------------------------------------------------------------------
    async def scheme(self, scheme: Scheme) -> None:
        features = [{"name": "prefers-color-scheme", "value": scheme}]
        await self.run(self.driver.execute_cdp_cmd, "Emulation.setEmulatedMedia", {"features": features})

    async def width(self, width: Width) -> None:
        await self.run(self.driver.set_window_size, *SIZES[width])
        await self.wait(lambda d: d.execute_script("return window.innerWidth") == SIZES[width][0], 5,
                        f"the viewport did not become {SIZES[width][0]} px wide")

    async def overflow(self) -> tuple[int, int]:
        """(the document's scroll width, the viewport's width): a page fits when the first <= the second."""
        sizes = await self.script("return [document.documentElement.scrollWidth, window.innerWidth]")
        return int(sizes[0]), int(sizes[1])

    async def wider_than_viewport(self) -> list[str]:
        """The elements that reach beyond the viewport's right edge and are not inside a scroll container that
        clips them (a .table-wrap or a <pre> does, for what it contains): the reason a page scrolls sideways."""
        return list(await self.script("""
            const out = [];
            const clipped = (e) => {  // an ancestor in its containing-block chain clips its overflow
              let position = getComputedStyle(e).position;
              if (position === 'fixed') return false;
              for (let box = e.parentElement; box && box !== document.body; box = box.parentElement) {
                const style = getComputedStyle(box);
                if (position === 'absolute' && style.position === 'static') continue;  // not its containing block
                if (style.overflowX !== 'visible') return true;
                position = style.position;
              }
              return false;
            };
            for (const e of document.body.querySelectorAll('*')) {
              const r = e.getBoundingClientRect();
              if (!r.width || r.right <= window.innerWidth + 1 || clipped(e)) continue;
              const cls = typeof e.className === 'string' && e.className.trim() ? '.' +
                e.className.trim().split(/\\s+/).join('.') : '';
              out.push(e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + cls + ' right=' + Math.round(r.right));
            }
            return out.slice(0, 8);"""))

    def _screenshot(self, path: Path) -> int:
        """The whole page (not only the viewport) as a PNG at `path`; its size in bytes."""
        d = self.driver
        width, height = d.execute_script(
            "return [window.innerWidth, Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)]")
        shot = d.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True, "fromSurface": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
        data = base64.b64decode(shot["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return len(data)

    async def screenshot(self, path: Path) -> int:
        return await self.run(self._screenshot, path)

    async def background(self, css: str = "body") -> str:
        return str(await self.script("return getComputedStyle(document.querySelector(arguments[0])).backgroundColor",
                                     css))

    # -- what the page did ---------------------------------------------------------------------------------
    async def resources(self) -> list[str]:
        """Every URL the page loaded (stylesheets, scripts, icons, fetches), from the Resource Timing API."""
        return list(await self.script("return performance.getEntriesByType('resource').map(e => e.name)"))

    async def console(self) -> list[dict[str, Any]]:
        """The console's messages since the last call (script errors, CSP violations, failed loads)."""
        return list(await self.run(self.driver.get_log, "browser"))


def _xpath_literal(text: str) -> str:
    if '"' not in text:
        return f'"{text}"'
    if "'" not in text:
        return f"'{text}'"
    return "concat(" + ", '\"', ".join(f'"{part}"' for part in text.split('"')) + ")"


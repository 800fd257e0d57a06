"""A real OpenID Connect provider for tests: the certified `oidc-provider` npm package (tests/node/oidc.mjs).

    with start_oidc_provider("portal", "s3cret", [callback_url], {"alice": {"email": "alice@example.edu"}}) as op:
        op.issuer  # "http://127.0.0.1:PORT"; discovery at op.discovery_url
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            callback = await sign_in(browser, start_url, "alice")

The provider registers one confidential client (client_secret_basic, authorization_code, response type code,
PKCE S256 required), offers the scopes openid, email, profile and groups, shows its built-in development login
form (any login, any password) and never asks for consent. Accounts listed in `accounts` get their claims
(sub = the login name, preferred_username defaults to it); any other login signs in too, with sub and
preferred_username only. As oidc-provider does by default, the ID token from the code flow carries only sub,
nonce, aud, iss, iat and exp (RS256, kid from jwks_uri): email, name, groups... come from userinfo.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from html import unescape
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import yarl

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "oidc.mjs"
START_TIMEOUT = 20.0  # seconds to wait for the provider's {"issuer": ...} line
MAX_HOPS = 20  # redirects sign_in follows before giving up


class OidcProvider:
    """A running tests/node/oidc.mjs; `.issuer` is its issuer URL, `.stop()` (or leaving `with`) ends it."""

    def __init__(self, process: subprocess.Popen[bytes], stderr_file: Any, issuer: str) -> None:
        self._process = process
        self._stderr_file = stderr_file
        self.issuer = issuer

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def pid(self) -> int:
        return self._process.pid

    def stderr(self) -> str:
        """What the provider wrote to stderr so far (oidc-provider's warnings, server errors)."""
        self._stderr_file.flush()
        self._stderr_file.seek(0)
        text: str = self._stderr_file.read().decode(errors="replace")
        return text

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; idempotent."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()
        if not self._stderr_file.closed:
            self._stderr_file.close()

    def __enter__(self) -> OidcProvider:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_oidc_provider(
    client_id: str,
    client_secret: str,
    redirect_uris: Sequence[str],
    accounts: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    port: int = 0,
    timeout: float = START_TIMEOUT,
) -> OidcProvider:
    """Start `node tests/node/oidc.mjs` on 127.0.0.1 and wait (blocking, about a second) until it listens.

    `accounts` maps login names to claims, e.g. {"alice": {"email": "alice@example.edu", "email_verified": True,
    "groups": ["staff"], "name": "Alice A"}}. Returns the running provider; use it as a context manager or call
    `.stop()`. Raises RuntimeError, with the provider's stderr, if it exits or says nothing within `timeout`.
    """
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH: cannot start tests/node/oidc.mjs")
    if not (NODE_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
        raise RuntimeError(f"oidc-provider is not installed: run `npm ci` in {NODE_DIR}")
    env = dict(os.environ)
    env.update(
        OIDC_PORT=str(port),
        OIDC_CLIENT_ID=client_id,
        OIDC_CLIENT_SECRET=client_secret,
        OIDC_REDIRECT_URIS=",".join(redirect_uris),
        OIDC_ACCOUNTS=json.dumps(dict(accounts or {})),
    )
    # stderr goes to a file: nothing has to drain it, and it is there for error messages. stdin stays open:
    # oidc.mjs exits at its EOF, so a test run that dies without stop() leaves no provider behind.
    stderr_file = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [node, str(SCRIPT)], cwd=NODE_DIR, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr_file
    )
    lines: queue.Queue[bytes] = queue.Queue()

    def read_first_line() -> None:
        try:
            lines.put(process.stdout.readline() if process.stdout is not None else b"")
        except (OSError, ValueError):  # stop() closed the pipe after a timeout
            lines.put(b"")

    threading.Thread(target=read_first_line, daemon=True).start()
    provider = OidcProvider(process, stderr_file, issuer="")
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        stderr = provider.stderr()
        provider.stop()
        raise RuntimeError(f"oidc.mjs did not report its issuer within {timeout:g} s; stderr:\n{stderr}") from None
    try:
        issuer = json.loads(line)["issuer"]
    except (ValueError, KeyError, TypeError):
        stderr = provider.stderr()
        provider.stop()  # reaps the process, so its exit status is known
        raise RuntimeError(
            f"oidc.mjs did not start (exit status {process.returncode}); stdout: {line!r}; stderr:\n{stderr}"
        ) from None
    provider.issuer = issuer
    return provider


def client_secret_basic(client_id: str, client_secret: str) -> str:
    """The Authorization header value for client_secret_basic (RFC 6749 2.3.1: form-urlencode, then base64).

    oidc-provider form-urldecodes both halves ("+" is a space), so a secret with "+", "%" or ":" only works
    encoded like this; aiohttp.BasicAuth (deprecated in aiohttp 3.14 anyway) does not encode.
    """
    pair = f"{quote_plus(client_id)}:{quote_plus(client_secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


_FORM = re.compile(r"<form\b[^>]*>.*?</form>", re.S | re.I)
_ATTR = re.compile(r"""(\w[\w-]*)\s*=\s*("([^"]*)"|'([^']*)')""")
_INPUT = re.compile(r"<input\b[^>]*>", re.I)


def _attrs(tag: str) -> dict[str, str]:
    return {
        m.group(1).lower(): unescape(m.group(3) if m.group(3) is not None else m.group(4)) for m in _ATTR.finditer(tag)
    }


def _login_form(html: str) -> tuple[str, dict[str, str]] | None:
    """The (action, hidden fields) of the page's form that has a `login` input, if any."""
    for form in _FORM.findall(html):
        inputs = [_attrs(tag) for tag in _INPUT.findall(form)]
        if any(i.get("name") == "login" for i in inputs):
            action = _attrs(form[: form.index(">") + 1]).get("action", "")
            hidden = {i["name"]: i.get("value", "") for i in inputs if i.get("type") == "hidden" and "name" in i}
            return action, hidden
    return None


def _origin(url: yarl.URL) -> tuple[str | None, str | None, int | None]:
    return url.scheme, url.host, url.port


async def sign_in(session: aiohttp.ClientSession, start_url: str | yarl.URL, login: str) -> yarl.URL:
    """Sign `login` in at the provider, headless, and return the relying party's callback URL, not followed.

    `session` is the "browser": create it with `aiohttp.CookieJar(unsafe=True)`, or aiohttp's default jar drops
    the cookies of 127.0.0.1 (IP addresses), and the provider loses track of the interaction. Cookies are not
    port-scoped: the relying party's and the provider's cookies for 127.0.0.1 share the jar and reach both.

    The flow, with every redirect followed by hand (allow_redirects=False) so the last one is not taken:
    1. GET start_url, the relying party's page that redirects (302/303) to the provider's authorization endpoint,
       /auth?response_type=code&client_id=...&state=...&nonce=...&code_challenge=... . The provider's origin is
       the first one the redirects reach that is not start_url's.
    2. The provider redirects (303) to its interaction page /interaction/<uid>, setting the `_interaction` and
       `_interaction_resume` cookies, and answers 200 with the development login form: inputs name="login" and
       name="password" and a hidden prompt=login, posting to the form's action (/interaction/<uid>).
    3. POST the form: login=<login>, password=any (any password works), prompt=login.
    4. The provider redirects (303) to /auth/<uid> (resume), which finds the new session, grants the requested
       scopes without a consent screen and redirects (303) to the redirect_uri:
       <redirect_uri>?code=...&state=...&iss=<issuer> (RFC 9207's iss), or ?error=...&state=... .
    5. That first redirect leaving the provider's origin is returned as is: the relying party has not seen it,
       so a test can follow it, or tamper with state or code first.
    If the provider session already has this client's grant (same jar, earlier sign-in), step 2-3 are skipped
    and the callback comes straight back from step 1; `login` is then ignored. A provider error page (any
    non-redirect other than the login form) raises AssertionError with the page's text.
    """
    url = yarl.URL(start_url)
    start_origin = _origin(url)
    provider_origin: tuple[str | None, str | None, int | None] | None = None
    method, data = "GET", None
    submitted = False
    for _ in range(MAX_HOPS):
        async with session.request(method, url, data=data, allow_redirects=False) as response:
            body = await response.text()
            location = response.headers.get("Location")
        if response.status in (301, 302, 303, 307, 308) and location:
            target = url.join(yarl.URL(location, encoded=True))
            if provider_origin is None and _origin(target) != start_origin:
                provider_origin = _origin(target)
            elif provider_origin is not None and _origin(target) != provider_origin:
                return target
            url, method, data = target, "GET", None
            continue
        form = _login_form(body) if response.status == 200 and provider_origin == _origin(url) else None
        if form is None or submitted:
            hint = "\n(cookies lost: is the session's jar aiohttp.CookieJar(unsafe=True)?)" if "cookie" in body else ""
            raise AssertionError(f"sign-in stopped at {url} (HTTP {response.status}) without a redirect:\n{body}{hint}")
        action, hidden = form
        url, method, data = url.join(yarl.URL(action)), "POST", {**hidden, "login": login, "password": "any"}
        submitted = True
    raise AssertionError(f"sign-in took more than {MAX_HOPS} redirects (last: {url})")

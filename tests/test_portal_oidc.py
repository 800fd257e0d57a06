"""The portal's OpenID Connect sign-in against a real provider (tests/oidc_provider.py: the `oidc-provider` package).

Every test is a person with a browser (an aiohttp session with an unsafe cookie jar, so 127.0.0.1 keeps its
cookies) and asserts on what they see (status, page, cookies) and on what the database holds afterwards.

The provider is started once for the module. It must know every redirect URI up front, so the module picks a
pool of free ports first and each test runs its Lumen on one of them (``public_url`` = that origin). The
hostile tests that need a provider which lies run a man-in-the-middle "issuer" in the test: its discovery
document points at itself for the token endpoint and the JWKS, forwards the code exchange to the real provider,
and re-signs the ID token the way the test wants.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import TestServer
from joserfc import jwt
from joserfc.jwk import RSAKey

from lumen_proxy.keys import hash_key
from lumen_proxy.portal.guard import PORTAL
from tests.conftest import MakeProxy, Proxy, build_config, config_dict, free_port, query
from tests.nodejs import node_available
from tests.oidc_provider import NODE_DIR, OidcProvider, sign_in, start_oidc_provider

pytestmark = pytest.mark.skipif(
    not node_available() or not (NODE_DIR / "node_modules" / "oidc-provider").is_dir(),
    reason="needs node and tests/node's oidc-provider (npm ci)",
)

CLIENT_ID = "lumen-portal"
CLIENT_SECRET = "portal secret+%/:="  # Lumen must form-urlencode it for client_secret_basic
ACCOUNTS = {
    "alice": {"email": "alice@example.edu", "email_verified": True, "groups": ["staff"], "name": "Alice A"},
    "carol": {"email": "carol@example.edu", "email_verified": False},
    # claims an address that is not hers (her provider lets anyone type one: email_verified false)
    "mallory": {"email": "bob@example.edu", "email_verified": False},
}
SCOPES = ["openid", "email", "profile", "groups"]
PORTS = 32  # more than the tests that run a Lumen
CALLBACK = "/login/oidc/callback"


def b64json(part: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return data


@dataclass
class ProviderPool:
    op: OidcProvider
    ports: Iterator[int]


@pytest.fixture(scope="module")
def provider() -> Iterator[ProviderPool]:
    ports: set[int] = set()
    while len(ports) < PORTS:
        ports.add(free_port())
    uris = [f"http://127.0.0.1:{port}{CALLBACK}" for port in sorted(ports)]
    with start_oidc_provider(CLIENT_ID, CLIENT_SECRET, uris, ACCOUNTS) as op:
        yield ProviderPool(op, iter(sorted(ports)))


@dataclass
class Mitm:
    """An "issuer" in front of the real provider that re-signs its ID tokens as the test says.

    publish: "own" (its own public key at jwks_uri) or "real" (the real provider's JWKS).
    kid: the kid in the re-signed token's header (default: its own key's).
    claims: a function of the real token's claims, returning claims to set in the re-signed one (iss is the MITM's
    unless it says otherwise).
    """

    real: dict[str, Any]  # the real provider's discovery document
    real_jwks: dict[str, Any]
    http: aiohttp.ClientSession
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "mitm-key"},
                                                                     private=True))
    publish: str = "own"
    kid: str = "mitm-key"
    claims: Callable[[dict[str, Any]], dict[str, Any]] = lambda claims: {}
    issuer: str = ""
    jwks_fetches: int = 0
    exchanges: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_post("/token", self.token)
        app.router.add_get("/jwks", self.jwks)
        return app

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response({**self.real, "issuer": self.issuer, "token_endpoint": self.issuer + "/token",
                                  "jwks_uri": self.issuer + "/jwks"})

    async def jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        if self.publish == "real":
            return web.json_response(self.real_jwks)
        return web.json_response({"keys": [self.key.as_dict(private=False)]})

    async def token(self, request: web.Request) -> web.Response:
        self.exchanges += 1
        headers = {name: request.headers[name] for name in ("Authorization", "Content-Type") if name in request.headers}
        async with self.http.post(self.real["token_endpoint"], data=await request.read(), headers=headers) as answer:
            status, tokens = answer.status, await answer.json()
        if status == 200:
            claims = b64json(tokens["id_token"].split(".")[1])  # decoded, not verified: we are the attacker
            claims.update({"iss": self.issuer, **self.claims(claims)})
            tokens["id_token"] = jwt.encode({"alg": "RS256", "kid": self.kid}, claims, self.key)
        return web.json_response(tokens, status=status)


class Harness:
    """Lumens on the pool's ports, helper servers and browsers; all closed at the end of the test."""

    def __init__(self, pool: ProviderPool, tmp_path: Path, make_proxy: MakeProxy) -> None:
        self.pool, self.tmp_path, self.make_proxy = pool, tmp_path, make_proxy
        self.servers: list[TestServer] = []
        self.sessions: list[aiohttp.ClientSession] = []

    @property
    def issuer(self) -> str:
        return self.pool.op.issuer

    @property
    def database(self) -> Path:
        return self.tmp_path / "lumen.db"

    async def lumen(self, *, issuer: str | None = None, portal: dict[str, Any] | None = None,
                    **oidc: Any) -> Proxy:
        port = next(self.pool.ports)
        data = config_dict(self.tmp_path, [])
        data["models"] = [m for m in data["models"] if m["name"] == "echo"]
        data["groups"] = [{"name": "staff"}, {"name": "students"}]
        data["public_url"] = f"http://127.0.0.1:{port}"
        data["portal"] = {"oidc": {"issuer": issuer or self.issuer, "client_id": CLIENT_ID,
                                   "client_secret": CLIENT_SECRET, "scopes": SCOPES, **oidc}, **(portal or {})}
        return await self.make_proxy(build_config(self.tmp_path, data), port=port)  # closed by make_proxy

    async def serve(self, app: web.Application) -> TestServer:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        self.servers.append(server)
        return server

    def browser(self, **kwargs: Any) -> aiohttp.ClientSession:
        kwargs.setdefault("cookie_jar", aiohttp.CookieJar(unsafe=True))
        self.sessions.append(aiohttp.ClientSession(**kwargs))
        return self.sessions[-1]

    async def bounce(self, target: str) -> str:
        """A URL on another origin that redirects to ``target`` (sign_in needs to start off the provider)."""
        app = web.Application()

        async def go(request: web.Request) -> web.StreamResponse:
            raise web.HTTPSeeOther(target)

        app.router.add_get("/go", go)
        return str((await self.serve(app)).make_url("/go"))

    async def mitm(self) -> Mitm:
        http = self.browser(cookie_jar=aiohttp.DummyCookieJar())
        async with http.get(self.pool.op.discovery_url) as response:
            real = await response.json()
        async with http.get(real["jwks_uri"]) as response:
            real_jwks = await response.json()
        mitm = Mitm(real, real_jwks, http)
        mitm.issuer = str((await self.serve(mitm.app())).make_url("")).rstrip("/")
        return mitm

    def sessions_rows(self) -> list[Any]:
        return query(self.database, "SELECT hash, account_id, method FROM sessions")

    def account_rows(self) -> list[Any]:
        return query(self.database, "SELECT name, email, group_name, balance FROM accounts ORDER BY name")

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()
        for server in reversed(self.servers):
            await server.close()


@pytest.fixture
async def h(provider: ProviderPool, tmp_path: Path, make_proxy: MakeProxy) -> AsyncIterator[Harness]:
    harness = Harness(provider, tmp_path, make_proxy)
    yield harness
    await harness.close()


@dataclass
class Seen:
    status: int
    text: str
    location: str | None
    cookies: dict[str, str]


async def visit(browser: aiohttp.ClientSession, url: str | yarl.URL, **kwargs: Any) -> Seen:
    async with browser.get(url, allow_redirects=False, **kwargs) as response:
        return Seen(response.status, await response.text(), response.headers.get("Location"),
                    {name: morsel.value for name, morsel in response.cookies.items()})


async def add_account(proxy: Proxy, name: str, **fields: Any) -> None:
    async with proxy.rt.usage.lock:
        await proxy.rt.store.add_account(name, 0, group=fields.pop("group", None))
        if fields:
            await proxy.rt.store.update_account(name, **fields)
    await proxy.rt.view.reload()


async def callback_of(proxy: Proxy, browser: aiohttp.ClientSession, login: str) -> yarl.URL:
    url = await sign_in(browser, proxy.origin + "/login/oidc", login)
    assert str(url.with_query(None)) == proxy.origin + CALLBACK, url
    assert "error" not in url.query, url.query
    return url


def assert_refused(seen: Seen, status: int, *words: str) -> None:
    assert seen.status == status, (seen.status, seen.text)
    assert "lumen_session" not in seen.cookies
    for word in words:
        assert word in seen.text, seen.text


# -- a person signs in -----------------------------------------------------------------------------------------
async def test_sign_in_opens_a_session_for_the_account_with_that_email(h: Harness) -> None:
    proxy = await h.lumen()
    await add_account(proxy, "alice", email="alice@example.edu")  # named otherwise: found by its email
    browser = h.browser()

    callback = await callback_of(proxy, browser, "alice")
    seen = await visit(browser, callback)

    assert seen.status == 303, seen.text
    assert seen.location == "/keys"
    sid = seen.cookies["lumen_session"]
    assert seen.cookies["lumen_signin"] == ""  # the flow's cookie is cleared
    keys = await visit(browser, proxy.origin + "/keys")
    assert keys.status == 200, keys.text
    assert 'title="Signed in as alice"' in keys.text
    rows = h.sessions_rows()
    assert len(rows) == 1
    assert rows[0]["method"] == "oidc"
    assert rows[0]["account_id"] == (await proxy.rt.store.account("alice")).id
    assert rows[0]["hash"] != sid and rows[0]["hash"] == hash_key(sid)


async def test_first_sign_in_creates_the_account_in_the_mapped_group(h: Harness) -> None:
    proxy = await h.lumen(portal={"new_accounts": {"create": True, "coins": 5}}, groups_claim="groups",
                          groups={"staff": "staff"})
    browser = h.browser()

    seen = await visit(browser, await callback_of(proxy, browser, "alice"))

    assert seen.status == 303, seen.text
    assert "lumen_session" in seen.cookies
    rows = [dict(r) for r in h.account_rows()]
    assert rows == [{"name": "alice@example.edu", "email": "alice@example.edu", "group_name": "staff",
                     "balance": 5_000_000}]
    keys = await visit(browser, proxy.origin + "/keys")
    assert 'title="Signed in as alice@example.edu"' in keys.text
    assert len(h.sessions_rows()) == 1


async def test_first_sign_in_without_account_creation_says_no_account_yet(h: Harness) -> None:
    proxy = await h.lumen(portal={"new_accounts": {"create": False}})
    browser = h.browser()

    seen = await visit(browser, await callback_of(proxy, browser, "alice"))

    assert_refused(seen, 403, "No account yet", "alice@example.edu")
    assert h.account_rows() == []
    assert h.sessions_rows() == []


async def test_group_mapping_moves_an_existing_account_at_sign_in(h: Harness) -> None:
    proxy = await h.lumen(groups_claim="groups", groups={"staff": "staff"})
    await add_account(proxy, "alice@example.edu", group="students")
    browser = h.browser()

    seen = await visit(browser, await callback_of(proxy, browser, "alice"))

    assert seen.status == 303, seen.text
    assert [r["group_name"] for r in h.account_rows()] == ["staff"]
    account = await proxy.rt.store.account("alice@example.edu")
    assert proxy.rt.view.accounts[account.id].group == "staff"  # the running server sees it at once


async def test_account_claim_preferred_username_from_userinfo(h: Harness) -> None:
    proxy = await h.lumen(account_claim="preferred_username")
    await add_account(proxy, "alice")
    browser = h.browser()

    seen = await visit(browser, await callback_of(proxy, browser, "alice"))

    assert seen.status == 303, seen.text
    keys = await visit(browser, proxy.origin + "/keys")
    assert 'title="Signed in as alice"' in keys.text
    assert [dict(r) for r in h.account_rows()] == [{"name": "alice", "email": "alice@example.edu",
                                                    "group_name": None, "balance": 0}]
    assert [r["method"] for r in h.sessions_rows()] == ["oidc"]


async def test_unverified_email_is_refused(h: Harness) -> None:
    proxy = await h.lumen()
    await add_account(proxy, "carol@example.edu")  # the account exists: the refusal is about the email
    browser = h.browser()

    seen = await visit(browser, await callback_of(proxy, browser, "carol"))

    assert_refused(seen, 403, "Email not verified")
    assert h.sessions_rows() == []



async def test_unverified_email_never_names_an_account(h: Harness) -> None:
    proxy = await h.lumen(account_claim="preferred_username", portal={"new_accounts": {"create": True}})
    mallory = h.browser()
    assert (await visit(mallory, await callback_of(proxy, mallory, "mallory"))).status == 303

    # The account named by preferred_username is hers; the address her provider did not verify is not.
    assert [(r["name"], r["email"]) for r in h.account_rows()] == [("mallory", None)]
    # Bob's preferred_username is his address (the provider's default: his login); his first sign-in must
    # create his own account, not open Mallory's.
    bob = h.browser()
    seen = await visit(bob, await callback_of(proxy, bob, "bob@example.edu"))
    assert seen.status == 303, seen.text
    keys = await visit(bob, proxy.origin + "/keys")
    assert 'title="Signed in as bob@example.edu"' in keys.text

# -- hostile callbacks ---------------------------------------------------------------------------------------
async def test_tampered_state_is_refused(h: Harness) -> None:
    proxy = await h.lumen()
    await add_account(proxy, "alice@example.edu")
    browser = h.browser()
    callback = await callback_of(proxy, browser, "alice")

    seen = await visit(browser, callback.update_query(state="A" * 43))

    assert_refused(seen, 400, "Sign-in failed", "not started here")
    assert h.sessions_rows() == []


async def test_callback_in_another_browser_is_refused(h: Harness) -> None:
    proxy = await h.lumen()
    await add_account(proxy, "alice@example.edu")
    victim = h.browser()
    callback = await callback_of(proxy, victim, "alice")

    seen = await visit(h.browser(), callback)  # no lumen_signin cookie: someone the URL was sent to

    assert_refused(seen, 400, "Sign-in failed", "another browser")
    assert h.sessions_rows() == []


async def test_replayed_callback_is_refused(h: Harness) -> None:
    proxy = await h.lumen()
    await add_account(proxy, "alice@example.edu")
    browser = h.browser()
    callback = await callback_of(proxy, browser, "alice")
    flow_cookie = browser.cookie_jar.filter_cookies(callback)["lumen_signin"].value

    first = await visit(browser, callback)
    again = await visit(browser, callback)
    thief = h.browser(cookie_jar=aiohttp.DummyCookieJar())  # kept the flow cookie too: the flow itself is spent
    stolen = await visit(thief, callback, headers={"Cookie": f"lumen_signin={flow_cookie}"})

    assert first.status == 303, first.text
    assert_refused(again, 400, "not started here")
    assert_refused(stolen, 400, "not started here")
    assert len(h.sessions_rows()) == 1


async def test_id_token_with_another_nonce_is_refused(h: Harness) -> None:
    proxy = await h.lumen()
    await add_account(proxy, "alice@example.edu")
    browser = h.browser()
    start = await visit(browser, proxy.origin + "/login/oidc")
    assert start.status == 303 and start.location is not None
    authorize = yarl.URL(start.location)
    assert authorize.query["nonce"]
    tampered = str(authorize.update_query(nonce="attacker-chosen-nonce"))

    # sign_in must start on another origin than the provider's, hence a bounce
    callback = await sign_in(browser, await h.bounce(tampered), "alice")
    seen = await visit(browser, callback)

    assert_refused(seen, 400, "Sign-in failed", "nonce")
    assert h.sessions_rows() == []


async def test_provider_error_is_shown(h: Harness) -> None:
    proxy = await h.lumen()
    browser = h.browser()
    # The person presses the provider's "Cancel" (its dev interaction's abort URL): access_denied comes back.
    url = yarl.URL(proxy.origin + "/login/oidc")
    for _ in range(10):
        seen = await visit(browser, url)
        if seen.status == 200 and url.path.startswith("/interaction/"):
            url = url.with_path(url.path + "/abort")
            continue
        assert seen.status in (302, 303) and seen.location, (seen.status, seen.text)
        url = url.join(yarl.URL(seen.location, encoded=True))
        if url.origin() == yarl.URL(proxy.origin) and url.path == CALLBACK:
            break
    assert url.query.get("error") == "access_denied", url

    seen = await visit(browser, url)

    assert_refused(seen, 400, "Sign-in failed", "access_denied")
    assert h.sessions_rows() == []


async def test_sign_in_attempts_are_rate_limited(h: Harness) -> None:
    proxy = await h.lumen(portal={"signin_per_minute": 2})
    browser = h.browser()

    statuses = [(await visit(browser, proxy.origin + "/login/oidc")).status for _ in range(2)]
    third = await visit(browser, proxy.origin + "/login/oidc")

    assert statuses == [303, 303]
    assert_refused(third, 429, "Too many sign-in attempts")
    assert third.location is None


# -- a provider that lies: a man in the middle re-signs the ID token ----------------------------------------
async def test_mitm_control_its_own_published_key_signs_in(h: Harness) -> None:
    mitm = await h.mitm()
    proxy = await h.lumen(issuer=mitm.issuer)
    await add_account(proxy, "alice@example.edu")
    browser = h.browser()

    seen = await visit(browser, await callback_of(proxy, browser, "alice"))

    assert seen.status == 303, seen.text  # the MITM path works: the refusals below are about the signature
    assert mitm.exchanges == 1 and mitm.jwks_fetches == 1
    assert len(h.sessions_rows()) == 1


async def test_id_token_signed_with_another_key_under_the_real_kid_is_refused(h: Harness) -> None:
    mitm = await h.mitm()
    mitm.publish = "real"
    mitm.kid = mitm.real_jwks["keys"][0]["kid"]
    proxy = await h.lumen(issuer=mitm.issuer)
    await add_account(proxy, "alice@example.edu")
    browser = h.browser()

    seen = await visit(browser, await callback_of(proxy, browser, "alice"))

    assert_refused(seen, 400, "Sign-in failed", "signature")
    assert mitm.exchanges == 1
    assert h.sessions_rows() == []


async def test_id_token_with_an_unknown_kid_is_refused_and_the_jwks_refetch_is_rate_limited(h: Harness) -> None:
    mitm = await h.mitm()
    mitm.kid = "in-no-jwks"
    proxy = await h.lumen(issuer=mitm.issuer)
    await add_account(proxy, "alice@example.edu")
    browser = h.browser()

    first = await visit(browser, await callback_of(proxy, browser, "alice"))
    second = await visit(browser, await callback_of(proxy, browser, "alice"))
    fetched_within_the_minute = mitm.jwks_fetches
    # A minute later (the OIDC client's clock), an unknown kid may refetch the JWKS once (key rotation).
    proxy.app[PORTAL].oidc.clock = lambda: time.time() + 61
    third = await visit(browser, await callback_of(proxy, browser, "alice"))

    for seen in (first, second, third):
        assert_refused(seen, 400, "Sign-in failed", "a key the identity provider does not publish")
    assert mitm.exchanges == 3
    assert fetched_within_the_minute == 1  # the first fetch; the unknown kid's refetch waits for the minute
    assert mitm.jwks_fetches == 2
    assert h.sessions_rows() == []


@pytest.mark.parametrize(("change", "why"), [
    (lambda c: {"aud": "another-app"}, "is meant for another application"),
    (lambda c: {"aud": ["another-app", CLIENT_ID], "azp": "another-app"}, "is meant for another application"),
    (lambda c: {"iss": c["iss"]}, "was issued by another provider"),  # the real issuer, not the configured one
    (lambda c: {"exp": time.time() - 3600, "iat": time.time() - 7200}, "has expired"),
    (lambda c: {"iat": time.time() + 3600, "exp": time.time() + 7200}, "is dated in the future"),
    (lambda c: {"sub": ""}, "names nobody"),
], ids=["aud-other-client", "aud-shared-azp-other-client", "iss-other-issuer", "expired", "future-iat", "no-sub"])
async def test_id_token_with_wrong_claims_is_refused(h: Harness, change: Callable[[dict[str, Any]], dict[str, Any]],
                                                     why: str) -> None:
    mitm = await h.mitm()  # signs with the key it publishes: only the claims are wrong
    mitm.claims = change
    proxy = await h.lumen(issuer=mitm.issuer)
    await add_account(proxy, "alice@example.edu")
    browser = h.browser()

    seen = await visit(browser, await callback_of(proxy, browser, "alice"))

    assert_refused(seen, 400, "Sign-in failed", why)
    assert mitm.exchanges == 1
    assert h.sessions_rows() == []

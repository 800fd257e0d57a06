"""tests/oidc_provider.py on its own: the real oidc-provider, a tiny relying party, a full code flow.

The relying party here is a few lines of aiohttp; the proxy's portal is not involved. It proves that
start_oidc_provider and sign_in drive a standard authorization code flow (PKCE S256, state, nonce,
client_secret_basic) and that the tokens verify with joserfc against the provider's JWKS.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import TestServer
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.nodejs import node_available
from tests.oidc_provider import NODE_DIR, client_secret_basic, sign_in, start_oidc_provider

pytestmark = pytest.mark.skipif(
    not node_available() or not (NODE_DIR / "node_modules" / "oidc-provider").is_dir(),
    reason="needs node and tests/node's oidc-provider (npm ci)",
)

CLIENT_ID = "lumen-portal"
CLIENT_SECRET = "portal secret+%/:="  # client_secret_basic form-urlencodes it
ACCOUNTS = {
    "alice": {"email": "alice@example.edu", "email_verified": True, "groups": ["staff"], "name": "Alice A"},
}
SCOPE = "openid email profile groups"


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


async def test_code_flow_against_real_provider() -> None:
    # The relying party: /start remembers state, nonce and the PKCE verifier and redirects to /auth.
    flow: dict[str, Any] = {}

    async def start(request: web.Request) -> web.StreamResponse:
        verifier, challenge = pkce_pair()
        flow.update(state=secrets.token_urlsafe(16), nonce=secrets.token_urlsafe(16), verifier=verifier)
        authorize = flow["discovery"]["authorization_endpoint"]
        query = {
            "response_type": "code",
            "client_id": CLIENT_ID,
            "redirect_uri": flow["redirect_uri"],
            "scope": SCOPE,
            "state": flow["state"],
            "nonce": flow["nonce"],
        }
        if request.query.get("pkce") != "0":
            query.update(code_challenge=challenge, code_challenge_method="S256")
        raise web.HTTPFound(str(yarl.URL(authorize).with_query(query)))

    async def callback(request: web.Request) -> web.StreamResponse:
        raise AssertionError("sign_in must return the callback URL without following it")

    app = web.Application()
    app.router.add_get("/start", start)
    app.router.add_get("/callback", callback)
    rp = TestServer(app, host="127.0.0.1")
    await rp.start_server()
    try:
        flow["redirect_uri"] = str(rp.make_url("/callback"))
        with start_oidc_provider(CLIENT_ID, CLIENT_SECRET, [flow["redirect_uri"]], ACCOUNTS) as op:
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar) as browser, aiohttp.ClientSession() as backchannel:
                async with backchannel.get(op.discovery_url) as response:
                    assert response.status == 200
                    flow["discovery"] = discovery = await response.json()
                assert discovery["issuer"] == op.issuer
                assert "S256" in discovery["code_challenge_methods_supported"]

                url = await sign_in(browser, rp.make_url("/start"), "alice")

                assert str(url.with_query(None)) == flow["redirect_uri"]
                assert url.query["state"] == flow["state"]
                assert url.query["iss"] == op.issuer  # RFC 9207
                assert "error" not in url.query, url.query

                # The code exchange: client_secret_basic, the PKCE verifier, the same redirect_uri.
                async with backchannel.post(
                    discovery["token_endpoint"],
                    headers={"Authorization": client_secret_basic(CLIENT_ID, CLIENT_SECRET)},
                    data={
                        "grant_type": "authorization_code",
                        "code": url.query["code"],
                        "redirect_uri": flow["redirect_uri"],
                        "code_verifier": flow["verifier"],
                    },
                ) as response:
                    tokens = await response.json()
                    assert response.status == 200, tokens
                assert tokens["token_type"].lower() == "bearer"
                assert set(tokens["scope"].split()) == set(SCOPE.split())
                access_token = tokens["access_token"]

                async with backchannel.get(discovery["jwks_uri"]) as response:
                    keys = KeySet.import_key_set(await response.json())
                id_token = jwt.decode(
                    tokens["id_token"], keys, algorithms=discovery["id_token_signing_alg_values_supported"]
                )
                claims = id_token.claims
                jwt.JWTClaimsRegistry(
                    iss={"essential": True, "value": op.issuer},
                    aud={"essential": True, "value": CLIENT_ID},
                    nonce={"essential": True, "value": flow["nonce"]},
                    sub={"essential": True, "value": "alice"},
                ).validate(claims)
                assert "email" not in claims  # default: scope claims are for userinfo when an access token exists

                async with backchannel.get(
                    discovery["userinfo_endpoint"], headers={"Authorization": f"Bearer {access_token}"}
                ) as response:
                    userinfo = await response.json()
                    assert response.status == 200, userinfo
                assert userinfo["sub"] == "alice"
                assert userinfo["email"] == "alice@example.edu"
                assert userinfo["email_verified"] is True
                assert userinfo["groups"] == ["staff"]
                assert userinfo["preferred_username"] == "alice"
                assert userinfo["name"] == "Alice A"

                # The code is single-use: a replay is refused.
                async with backchannel.post(
                    discovery["token_endpoint"],
                    headers={"Authorization": client_secret_basic(CLIENT_ID, CLIENT_SECRET)},
                    data={
                        "grant_type": "authorization_code",
                        "code": url.query["code"],
                        "redirect_uri": flow["redirect_uri"],
                        "code_verifier": flow["verifier"],
                    },
                ) as response:
                    assert response.status == 400
                    assert (await response.json())["error"] == "invalid_grant"

            # A login that is not in ACCOUNTS signs in too, with sub and preferred_username only.
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
                url = await sign_in(browser, rp.make_url("/start"), "bob")
            assert url.query["state"] == flow["state"]
            async with aiohttp.ClientSession() as backchannel:
                async with backchannel.post(
                    flow["discovery"]["token_endpoint"],
                    headers={"Authorization": client_secret_basic(CLIENT_ID, CLIENT_SECRET)},
                    data={
                        "grant_type": "authorization_code",
                        "code": url.query["code"],
                        "redirect_uri": flow["redirect_uri"],
                        "code_verifier": flow["verifier"],
                    },
                ) as response:
                    tokens = await response.json()
                    assert response.status == 200, tokens
                async with backchannel.get(
                    flow["discovery"]["userinfo_endpoint"],
                    headers={"Authorization": f"Bearer {tokens['access_token']}"},
                ) as response:
                    assert await response.json() == {"sub": "bob", "preferred_username": "bob"}

            # PKCE is required for this confidential client too: no code_challenge, no code.
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
                url = await sign_in(browser, rp.make_url("/start").with_query(pkce="0"), "alice")
            assert str(url.with_query(None)) == flow["redirect_uri"]
            assert url.query["error"] == "invalid_request", url.query
            assert "code" not in url.query
    finally:
        await rp.close()

"""OpenID Connect sign-in: the authorization code flow with PKCE, ``state`` and ``nonce``.

The ID token's signature and claims are checked by joserfc (a maintained JOSE library: no
hand-written crypto here) against the issuer's JWKS; the accepted algorithms are the asymmetric ones
the provider announces (never ``none``, never an HMAC a client secret could forge). A ``kid`` the
cached JWKS lacks refetches it once (key rotation), at most once a minute (a forged ``kid`` cannot
make Lumen hammer the provider). Claims the ID token does not carry (``oidc-provider`` and others
put ``email`` only in userinfo) are read from the userinfo endpoint, whose ``sub`` must match.

A flow waiting for its callback is kept in memory for 10 minutes, bound to the browser that started
it by a random cookie (so a callback URL sent to someone else signs nobody in); at most
:data:`MAX_FLOWS` wait, the oldest dropped first.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from yarl import URL

from .settings import Oidc

FLOW_SECONDS = 600.0
MAX_FLOWS = 10_000
METADATA_SECONDS = 3600.0
JWKS_REFETCH_AFTER = 60.0
LEEWAY = 120  # seconds of clock difference tolerated on exp/iat
MAX_BODY = 1 << 20
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class SignInFailed(Exception):
    """A sign-in that cannot complete; the message is safe to show the person (no secrets in it)."""


@dataclass(frozen=True, slots=True)
class Flow:
    state: str
    nonce: str
    verifier: str
    binding: str  # sha256 of the browser cookie that started the flow
    started: float
    next: str = "/keys"  # the portal page to land on


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def challenge_of(verifier: str) -> str:
    """PKCE S256 (RFC 7636): base64url(sha256(verifier))."""
    return _b64(hashlib.sha256(verifier.encode()).digest())


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Flows:
    """Sign-ins between the redirect to the provider and its callback (bounded, expiring)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._flows: OrderedDict[str, Flow] = OrderedDict()

    def start(self, next_page: str = "/keys") -> tuple[Flow, str]:
        """A new flow and the browser cookie that binds it."""
        now = self.clock()
        while self._flows and (len(self._flows) >= MAX_FLOWS
                               or next(iter(self._flows.values())).started < now - FLOW_SECONDS):
            self._flows.popitem(last=False)
        cookie = secrets.token_urlsafe(32)
        flow = Flow(secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(48),
                    _digest(cookie), now, next_page)
        self._flows[flow.state] = flow
        return flow, cookie

    def finish(self, state: str, cookie: str | None) -> Flow:
        """The flow ``state`` names, once; it must be fresh and started by this browser."""
        flow = self._flows.get(state)
        if flow is None or flow.started < self.clock() - FLOW_SECONDS:
            raise SignInFailed("This sign-in was not started here or took longer than 10 minutes. Start again.")
        if cookie is None or not hmac.compare_digest(flow.binding, _digest(cookie)):
            raise SignInFailed("This sign-in was started in another browser. Start again from the sign-in page.")
        del self._flows[state]
        return flow

    def __len__(self) -> int:
        return len(self._flows)


class OidcClient:
    """Talks to providers: discovery, JWKS, the token and userinfo endpoints (cached per issuer)."""

    def __init__(self, http: aiohttp.ClientSession, clock: Callable[[], float] = time.time) -> None:
        self.http, self.clock = http, clock
        self._metadata: dict[str, tuple[float, dict[str, Any]]] = {}
        self._keys: dict[str, tuple[float, KeySet]] = {}

    async def _get_json(self, url: str, **kwargs: Any) -> Any:
        try:
            async with self.http.get(url, allow_redirects=False, **kwargs) as response:
                body = await response.content.read(MAX_BODY + 1)
                if response.status != 200 or len(body) > MAX_BODY:
                    raise SignInFailed(f"The identity provider answered {response.status} at {URL(url).path}.")
                return orjson.loads(body)
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise SignInFailed(f"The identity provider cannot be reached ({type(exc).__name__}). "
                               "Try again in a minute.") from exc

    async def metadata(self, settings: Oidc) -> dict[str, Any]:
        cached = self._metadata.get(settings.issuer)
        if cached is not None and cached[0] > self.clock() - METADATA_SECONDS:
            return cached[1]
        data = await self._get_json(settings.issuer + "/.well-known/openid-configuration")
        if not isinstance(data, dict) or data.get("issuer") != settings.issuer:
            raise SignInFailed("The identity provider's discovery document names another issuer.")
        for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(data.get(field), str):
                raise SignInFailed(f"The identity provider's discovery document has no {field}.")
        self._metadata[settings.issuer] = (self.clock(), data)
        return data

    async def _key_set(self, settings: Oidc, *, refresh: bool = False) -> KeySet:
        cached = self._keys.get(settings.issuer)
        if cached is not None and not (refresh and cached[0] < self.clock() - JWKS_REFETCH_AFTER):
            return cached[1]
        metadata = await self.metadata(settings)
        try:
            keys = KeySet.import_key_set(await self._get_json(metadata["jwks_uri"]))
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise SignInFailed("The identity provider's signing keys cannot be read.") from exc
        self._keys[settings.issuer] = (self.clock(), keys)
        return keys

    async def authorize_url(self, settings: Oidc, redirect_uri: str, flow: Flow) -> str:
        metadata = await self.metadata(settings)
        return str(URL(metadata["authorization_endpoint"]).update_query({
            "response_type": "code", "client_id": settings.client_id, "redirect_uri": redirect_uri,
            "scope": " ".join(settings.scopes), "state": flow.state, "nonce": flow.nonce,
            "code_challenge": challenge_of(flow.verifier), "code_challenge_method": "S256",
        }))

    async def finish(self, settings: Oidc, redirect_uri: str, flow: Flow, code: str) -> dict[str, Any]:
        """Exchange ``code``, verify the ID token, and return the person's claims (userinfo merged in)."""
        metadata = await self.metadata(settings)
        tokens = await self._exchange(settings, metadata, redirect_uri, flow, code)
        claims = await self._verify(settings, metadata, tokens.get("id_token"), flow.nonce)
        wanted = [settings.account_claim] + ([settings.groups_claim] if settings.groups_claim else [])
        if any(name not in claims for name in wanted) and isinstance(metadata.get("userinfo_endpoint"), str):
            info = await self._userinfo(metadata["userinfo_endpoint"], tokens.get("access_token"))
            if info.get("sub") != claims["sub"]:
                raise SignInFailed("The identity provider's userinfo names another person than its ID token.")
            claims = {**info, **claims}
        return claims

    async def _exchange(self, settings: Oidc, metadata: dict[str, Any], redirect_uri: str, flow: Flow,
                        code: str) -> dict[str, Any]:
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": flow.verifier}
        methods = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        headers = {}
        if "client_secret_basic" in methods or "client_secret_post" not in methods:
            pair = f"{quote(settings.client_id, safe='')}:{quote(settings.client_secret, safe='')}"  # RFC 6749 2.3.1
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form |= {"client_id": settings.client_id, "client_secret": settings.client_secret}
        try:
            async with self.http.post(metadata["token_endpoint"], data=form, headers=headers,
                                      allow_redirects=False) as response:
                body = await response.content.read(MAX_BODY + 1)
                data = orjson.loads(body) if len(body) <= MAX_BODY else None
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise SignInFailed("The identity provider's token endpoint did not answer properly. "
                               "Try again in a minute.") from exc
        if response.status != 200 or not isinstance(data, dict) or not isinstance(data.get("id_token"), str):
            error = data.get("error") if isinstance(data, dict) else None
            why = str(error or response.status)[:60]
            raise SignInFailed(f"The identity provider refused the sign-in code ({why}). "
                               "Start again.")
        return data

    async def _verify(self, settings: Oidc, metadata: dict[str, Any], id_token: Any, nonce: str) -> dict[str, Any]:
        announced = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        algorithms = [alg for alg in ASYMMETRIC if alg in announced]
        try:
            token = jwt.decode(id_token, await self._key_set(settings), algorithms=algorithms)
        except (JoseError, ValueError) as exc:
            if not _unknown_key(exc):
                raise SignInFailed("The ID token's signature is not valid.") from exc
            try:  # the provider may have rotated its keys since they were cached
                token = jwt.decode(id_token, await self._key_set(settings, refresh=True), algorithms=algorithms)
            except (JoseError, ValueError) as again:
                raise SignInFailed("The ID token is signed by a key the identity provider does not publish.") from again
        claims = dict(token.claims)
        self._check_claims(settings, claims, nonce)
        return claims

    def _check_claims(self, settings: Oidc, claims: dict[str, Any], nonce: str) -> None:
        now = self.clock()
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        problems = [
            (claims.get("iss") != settings.issuer, "was issued by another provider"),
            (settings.client_id not in audiences, "is meant for another application"),
            (len(audiences) > 1 and claims.get("azp") != settings.client_id, "is meant for another application"),
            (not isinstance(claims.get("exp"), int | float) or claims["exp"] < now - LEEWAY, "has expired"),
            (not isinstance(claims.get("iat"), int | float) or claims["iat"] > now + LEEWAY, "is dated in the future"),
            (not isinstance(claims.get("nonce"), str) or not hmac.compare_digest(claims["nonce"], nonce),
             "does not belong to this sign-in (nonce)"),
            (not isinstance(claims.get("sub"), str) or not claims["sub"], "names nobody (no sub)"),
        ]
        for failed, why in problems:
            if failed:
                raise SignInFailed(f"The ID token {why}. Start again.")

    async def _userinfo(self, url: str, access_token: Any) -> dict[str, Any]:
        if not isinstance(access_token, str):
            raise SignInFailed("The identity provider sent no access token for its userinfo endpoint.")
        info = await self._get_json(url, headers={"Authorization": f"Bearer {access_token}"})
        if not isinstance(info, dict):
            raise SignInFailed("The identity provider's userinfo is not an object.")
        return info


def _unknown_key(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return "key" in text and ("not found" in text or "missing" in text or "kid" in text)

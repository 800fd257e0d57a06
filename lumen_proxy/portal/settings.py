"""The portal's settings (``public_url`` and ``portal:`` in the YAML), parsed into frozen dataclasses.

Kept apart from :mod:`config` because only the portal reads them; :func:`parse_portal` is called by
``config.parse_config`` with its reader, so ``${VAR}`` expansion (the client secret) stays in one
place and every problem is the same one-line :class:`~.config.ConfigError`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from yarl import URL

if TYPE_CHECKING:
    from ..config import _Reader

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Oidc:
    """One OpenID Connect provider (Keycloak, Entra ID, Google, SATOSA, CILogon...)."""

    issuer: str
    client_id: str
    client_secret: str
    account_claim: str = "email"  # the claim whose value is the account's name (or email)
    groups_claim: str | None = None  # a claim listing the person's groups at the provider
    groups: tuple[tuple[str, str], ...] = ()  # (provider group, Lumen group): the first that matches wins
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    label: str = "Sign in with single sign-on"

    @property
    def callback_path(self) -> str:
        return "/login/oidc/callback"


@dataclass(frozen=True, slots=True)
class TrustedHeader:
    """An authenticating reverse proxy (oauth2-proxy, mod_auth_openidc, Shibboleth) names the person."""

    header: str
    proxies: tuple[Network, ...]
    logout_url: str | None = None  # where Sign out goes, so the proxy forgets the person too

    def trusts(self, address: str | None) -> bool:
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return False
        return any(ip in network for network in self.proxies)


@dataclass(frozen=True, slots=True)
class NewAccounts:
    """What happens to a person the sign-in names who has no account yet."""

    create: bool = False  # False: a page says to ask the administrator
    group: str | None = None  # None: the config's default_group
    coins: int = 0  # micro-coins of the new account's balance (the group's allowance comes on top)


@dataclass(frozen=True, slots=True)
class Portal:
    oidc: Oidc | None = None
    trusted_header: TrustedHeader | None = None
    login_links: bool = True
    session_hours: float = 12.0
    new_accounts: NewAccounts = NewAccounts()
    signin_per_minute: int = 20  # sign-in attempts per client address

    @property
    def methods(self) -> tuple[str, ...]:
        """The sign-in methods turned on: oidc, header, link."""
        return tuple(name for name, on in (("oidc", self.oidc), ("header", self.trusted_header),
                                           ("link", self.login_links)) if on)


def parse_url(r: _Reader, value: Any, path: str) -> str:
    """An http(s) URL with no query (public_url, the issuer, logout_url), without its trailing slash."""
    text = r.string(value, path).rstrip("/")
    url = URL(text)
    if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
        raise r.fail(path, f"must be an http:// or https:// URL with no query, got {text!r}")
    return text


def _oidc(r: _Reader, value: Any, path: str, groups: Collection[str]) -> Oidc:
    data = r.mapping(value, path, {"issuer", "client_id", "client_secret", "account_claim", "groups_claim",
                                   "groups", "scopes", "label"})
    for key in ("issuer", "client_id", "client_secret"):
        if key not in data:
            raise r.fail(f"{path}.{key}", "is required")
    mapped: list[tuple[str, str]] = []
    if data.get("groups") is not None:
        given = r.mapping(data["groups"], f"{path}.groups", set(map(str, data["groups"] or {})))
        for outside, inside in given.items():
            lumen_group = r.string(inside, f"{path}.groups.{outside}")
            if lumen_group not in groups:
                raise r.fail(f"{path}.groups.{outside}", f"no group named {lumen_group!r} in groups")
            mapped.append((str(outside), lumen_group))
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    if data.get("scopes") is not None:
        if not isinstance(data["scopes"], list) or "openid" not in data["scopes"]:
            raise r.fail(f"{path}.scopes", "must be a list of scopes that includes openid")
        scopes = tuple(r.string(s, f"{path}.scopes[{i}]") for i, s in enumerate(data["scopes"]))
    default = Oidc("", "", "")
    return Oidc(
        issuer=parse_url(r, data["issuer"], f"{path}.issuer"),
        client_id=r.string(data["client_id"], f"{path}.client_id"),
        client_secret=r.string(data["client_secret"], f"{path}.client_secret"),
        account_claim=r.optional(data, "account_claim", path, r.string, default.account_claim),
        groups_claim=r.optional(data, "groups_claim", path, r.string, None),
        groups=tuple(mapped),
        scopes=scopes,
        label=r.optional(data, "label", path, r.string, default.label),
    )


def _trusted_header(r: _Reader, value: Any, path: str) -> TrustedHeader:
    data = r.mapping(value, path, {"header", "proxies", "logout_url"})
    if "header" not in data:
        raise r.fail(f"{path}.header", "is required (for example X-Forwarded-Email)")
    proxies = data.get("proxies")
    if not isinstance(proxies, list) or not proxies:
        raise r.fail(f"{path}.proxies", "must list the addresses of the reverse proxies, such as [127.0.0.1]")
    networks: list[Network] = []
    for i, text in enumerate(proxies):
        try:
            networks.append(ipaddress.ip_network(str(text), strict=False))
        except ValueError:
            raise r.fail(f"{path}.proxies[{i}]", f"must be an address or network, got {text!r}") from None
    return TrustedHeader(
        header=r.string(data["header"], f"{path}.header"),
        proxies=tuple(networks),
        logout_url=r.optional(data, "logout_url", path, lambda v, p: parse_url(r, v, p), None),
    )


def _new_accounts(r: _Reader, value: Any, path: str, groups: Collection[str]) -> NewAccounts:
    from ..config import micro_coins

    data = r.mapping(value, path, {"create", "group", "coins"})
    group = r.optional(data, "group", path, r.string, None)
    if group is not None and group not in groups:
        raise r.fail(f"{path}.group", f"no group named {group!r} in groups")
    return NewAccounts(
        create=r.optional(data, "create", path, r.boolean, False),
        group=group,
        coins=r.optional(data, "coins", path, lambda v, p: micro_coins(v, p, r), 0),
    )


def parse_portal(r: _Reader, value: Any, path: str, groups: Collection[str]) -> Portal:
    data = r.mapping(value, path, {"oidc", "trusted_header", "login_links", "session_hours", "new_accounts",
                                   "signin_per_minute"})
    return Portal(
        oidc=r.optional(data, "oidc", path, lambda v, p: _oidc(r, v, p, groups), None),
        trusted_header=r.optional(data, "trusted_header", path, lambda v, p: _trusted_header(r, v, p), None),
        login_links=r.optional(data, "login_links", path, r.boolean, True),
        session_hours=r.optional(data, "session_hours", path, lambda v, p: float(r.number(v, p, minimum=0.01)), 12.0),
        new_accounts=r.optional(data, "new_accounts", path, lambda v, p: _new_accounts(r, v, p, groups),
                                NewAccounts()),
        signin_per_minute=r.optional(data, "signin_per_minute", path,
                                     lambda v, p: int(r.number(v, p, minimum=1, integer=True)), 20),
    )

"""Who is calling, and which models they may use.

Keys and accounts are served from an in-memory view; storage is off the request path. The view
follows the store's change feed (:meth:`.store.Store.changes`, a look every ``POLL`` seconds) and
reloads when its generation moves (another writer, i.e. the admin CLI, committed), so an admin change
takes effect within a second. A key the view does not know gets one more look before its 401
(:meth:`AccessView.identify`), so a key works the moment ``keys create`` returns; those looks are
coalesced and spaced ``MISS_SPACING`` apart, so a flood of unknown keys costs the store at most one
cheap :meth:`~.store.Store.generation` read per spacing. If the store cannot be read for longer than
``STALE_AFTER`` the view is no longer trusted and callers get 503, never 401: a client treats 401 as
"my key is wrong".
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .billing import Coins
from .config import Config, GroupLimits, Model
from .errors import InvalidKey, ModelNotAllowed, ModelNotFound, StorageUnavailable
from .keys import hash_key
from .ratelimit import LimitSpec
from .store import AccountRow, KeyRow, StorageFailure, Store

log = logging.getLogger("lumen_proxy")
POLL = 0.25
STALE_AFTER = 3.0
MISS_SPACING = 0.02


class UnknownKey(InvalidKey):
    """No key with this hash in the view (as opposed to an expired or malformed one)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is for: the key that came (0: the portal's chat, signed in by a session) and the
    account billed; ``delegate``: the key may act for the person its request names (Open WebUI);
    ``acting``: it does, for ``account``."""

    key_id: int
    account: AccountRow
    delegate: bool = False
    acting: bool = False

    @property
    def subject(self) -> str:
        """The per-key rate-limit subject: a delegating key's is per person (one front end's users never
        share a window), the portal chat's per account."""
        if self.acting:
            return f"key:{self.key_id}:{self.account.id}"
        return f"key:{self.key_id}" if self.key_id else f"chat:{self.account.id}"


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def credentials(headers: Mapping[str, str]) -> str | None:
    """The ``Authorization`` value to authenticate: the header itself, else Anthropic's ``x-api-key``
    (what the Anthropic SDKs and Claude Code send) as a Bearer token."""
    authorization = headers.get("Authorization")
    if authorization is not None and bearer_token(authorization) is not None:
        return authorization
    key = headers.get("x-api-key")
    return authorization if key is None else "Bearer " + key


class AccessView:
    """The in-memory copy of keys and accounts, plus the loop that keeps it fresh."""

    def __init__(self, store: Store, wallets: Coins, lock: asyncio.Lock,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.store, self.wallets, self.lock, self.clock = store, wallets, lock, clock
        self.keys: dict[str, KeyRow] = {}
        self.accounts: dict[int, AccountRow] = {}
        self.named: dict[str, AccountRow] = {}  # by name (delegation)
        self.emailed: dict[str, AccountRow] = {}  # by lower-cased email
        self._generation: int | None = None  # the store's, as of the view's last reload
        self._fresh_at = 0.0  # monotonic time of the last successful check
        self._miss_lock = asyncio.Lock()
        self._looked_at = -MISS_SPACING  # monotonic time the last look for an unknown key started

    async def reload(self) -> None:
        await self._reload(await self.store.generation())

    async def reload_holding_lock(self) -> None:
        """:meth:`reload` for a caller that holds ``lock`` already (the allowance refill)."""
        await self._load(await self.store.generation())

    async def _reload(self, generation: int) -> None:
        async with self.lock:  # never between a usage commit and its wallet update
            await self._load(generation)

    async def _load(self, generation: int) -> None:
        accounts, keys = await self.store.load_view()
        self.accounts = {a.id: a for a in accounts}
        self.named = {a.name: a for a in accounts}
        self.emailed = {a.email.lower(): a for a in accounts if a.email}
        self.keys = {k.hash: k for k in keys}
        self.wallets.load((a.id, a.balance + a.allowance) for a in accounts)
        self.wallets.load_allowances((a.id, a.allowance) for a in accounts)
        self._generation = generation
        self._fresh_at = time.monotonic()

    async def refresh(self) -> None:
        """Reload only when another writer has committed since the last look."""
        await self._follow(await self.store.generation())

    async def _follow(self, generation: int) -> None:
        if generation != self._generation:
            await self._reload(generation)
        self._fresh_at = time.monotonic()

    async def run(self) -> None:
        """Follow the store's change feed; a feed that ends by an error is logged and started again."""
        while True:
            try:
                async for seen in self.store.changes(POLL):
                    await self._take(seen)
            except Exception as exc:
                log.error("the change feed of keys and accounts stopped (restarting it): %s", exc)
            await asyncio.sleep(POLL)

    async def _take(self, seen: int | StorageFailure) -> None:
        """One look of the feed: reload if the generation moved; a failure is logged, the view kept."""
        if isinstance(seen, StorageFailure):
            _cannot_refresh(seen)
            return
        try:
            await self._follow(seen)
        except Exception as exc:  # keep serving from the view; is_stale() decides when to stop
            _cannot_refresh(exc)

    async def identify(self, authorization: str | None) -> Principal:
        """:meth:`authenticate`, looking at the database once more before calling a key unknown."""
        try:
            return self.authenticate(authorization)
        except UnknownKey:
            await self._look_again()
            return self.authenticate(authorization)

    async def _look_again(self) -> None:
        """Reload if another writer committed since: one look at a time, joined by every miss that came before it."""
        asked = time.monotonic()
        async with self._miss_lock:
            if self._looked_at >= asked:  # a look that started after this miss has seen what it needs
                return
            wait = self._looked_at + MISS_SPACING - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._looked_at = time.monotonic()
            try:
                await self.refresh()
            except Exception as exc:  # the poll loop reports and decides staleness; this caller gets its 401
                log.debug("cannot look for a new key: %s", exc)

    def is_stale(self) -> bool:
        return self._generation is None or time.monotonic() - self._fresh_at > STALE_AFTER

    def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        if token is None:
            raise InvalidKey("Missing API key. Send it as the header 'Authorization: Bearer sk_...' "
                             "(or 'x-api-key: sk_...', as the Anthropic SDKs do).")
        if self.is_stale():
            raise StorageUnavailable("The key store is temporarily unavailable. Retry shortly.",
                                     headers={"Retry-After": "5"})
        key = self.keys.get(hash_key(token))
        if key is None:
            raise UnknownKey(f"Incorrect API key provided: {_redact(token)}. Ask your administrator for a key.")
        if key.expires_at is not None and key.expires_at <= self.clock():
            raise InvalidKey(f"The API key {key.prefix}... has expired. Ask your administrator for a new key.")
        account = self.accounts.get(key.account_id)
        if account is None:
            raise InvalidKey("Incorrect API key provided.")
        if not account.enabled:
            raise ModelNotAllowed(f"The account {account.name!r} is disabled. Contact your administrator.",
                                  code="account_disabled")
        return Principal(key.id, account, key.delegate)

    def person(self, who: str) -> AccountRow | None:
        """The account named ``who``, else the one whose email it is (case-insensitively)."""
        return self.named.get(who) or self.emailed.get(who.lower())


def _cannot_refresh(exc: Exception) -> None:
    log.error("cannot read the database to refresh keys and accounts: %s", exc)


def _redact(token: str) -> str:
    return token[:6] + "..." + token[-2:] if len(token) > 12 else "***"


def account_limits(config: Config, account: AccountRow) -> LimitSpec:
    """The one resolution of limits: what the admin set on the account (``accounts set-limits``), else
    its group's, else the defaults."""
    group = config.group(account.group)
    limits = group.limits if group is not None else NO_GROUP_LIMITS
    return _merged_limits(config.limits, limits.rpm if account.rpm is None else account.rpm,
                          limits.tpm if account.tpm is None else account.tpm,
                          limits.concurrency if account.concurrency is None else account.concurrency)


NO_GROUP_LIMITS = GroupLimits()


@functools.lru_cache(maxsize=4096)
def _merged_limits(default: LimitSpec, rpm: int | None, tpm: int | None, concurrency: int | None) -> LimitSpec:
    return LimitSpec(
        rpm=default.rpm if rpm is None else rpm,
        tpm=default.tpm if tpm is None else tpm,
        concurrency=default.concurrency if concurrency is None else concurrency,
    )


def allowed_models(config: Config, account: AccountRow) -> tuple[str, ...] | None:
    """The models ``account`` may use (None: all), by :meth:`.config.Config.models_allowed`."""
    return config.models_allowed(account.models, account.group)


def may_use(config: Config, account: AccountRow, model: Model) -> bool:
    allowed = allowed_models(config, account)
    return allowed is None or model.name in allowed


def visible_models(config: Config, account: AccountRow) -> list[Model]:
    return [m for m in config.models if may_use(config, account, m)]


def require_model(config: Config, account: AccountRow, name: str) -> Model:
    model = config.model(name)
    if model is None:
        raise ModelNotFound(f"The model `{name}` does not exist or you do not have access to it.",
                            param="model")
    if not may_use(config, account, model):
        raise ModelNotAllowed(f"Your account does not have access to the model `{name}`.", param="model")
    return model

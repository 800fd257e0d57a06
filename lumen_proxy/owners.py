"""Which backend holds a Responses API response, and which account may touch it.

A backend that stores responses (vLLM, llama.cpp's server, OpenAI) keeps them itself; Lumen only
remembers, for each response id it relayed, the backend that made it and the account that asked. To
any other account the id does not exist (the same 404 as an unknown id, so ids cannot be probed).
The memory is bounded (``response_ids.keep``, oldest forgotten first; ``response_ids.per_account`` for
each account, so no account can push the others' ids out) and expires (``response_ids.hours``); it is
this process's, so a restart forgets it (a reload does not).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .config import Backend, Config, Model
from .errors import NotFound

RESPONSES_API = "responses"


@dataclass(frozen=True, slots=True)
class Owner:
    account_id: int
    model: str  # the public model name the response was made with
    backend_url: str
    backend_model: str
    expires: float  # monotonic


class ResponseOwners:
    """Response id → who made it where; bounded, per account too, and expiring. Every operation is O(1).

    An account holds at most ``per_account`` ids (its oldest go first), so one key holder's flood of
    responses cannot push everyone else's ids out of the ``keep`` the whole map holds.
    """

    def __init__(self, *, keep: int, ttl: float, per_account: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.keep, self.ttl, self.clock = keep, ttl, clock
        self.per_account = per_account if per_account is not None else keep
        self._owners: OrderedDict[str, Owner] = OrderedDict()
        self._by_account: dict[int, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._owners)

    def remember(self, response_id: str, account_id: int, model: str, backend: Backend) -> None:
        now = self.clock()
        self._drop(response_id)
        self._owners[response_id] = Owner(account_id, model, backend.url, backend.model, now + self.ttl)
        mine = self._by_account.setdefault(account_id, OrderedDict())
        mine[response_id] = None
        if len(mine) > self.per_account:
            self._drop(next(iter(mine)))
        while len(self._owners) > self.keep:
            self._drop(next(iter(self._owners)))
        while self._owners:  # expired ones leave from the front (oldest first), so the map never keeps them long
            oldest_id, oldest = next(iter(self._owners.items()))
            if oldest.expires > now:
                break
            self._drop(oldest_id)

    def owner(self, response_id: str, account_id: int) -> Owner | None:
        """The owner, if ``account_id`` made ``response_id`` and it has not expired; else None."""
        owner = self._owners.get(response_id)
        if owner is None or owner.account_id != account_id:
            return None
        if owner.expires <= self.clock():
            self._drop(response_id)
            return None
        return owner

    def forget(self, response_id: str) -> None:
        self._drop(response_id)

    def _drop(self, response_id: str) -> None:
        owner = self._owners.pop(response_id, None)
        if owner is None:
            return
        mine = self._by_account[owner.account_id]
        del mine[response_id]
        if not mine:
            del self._by_account[owner.account_id]


def holder(config: Config, owner: Owner, response_id: str) -> tuple[Model, Backend]:
    """The model and backend that hold ``response_id``, from the running config (a reload keeps them
    when the backend is still configured for that model)."""
    model = config.model(owner.model)
    if model is not None:
        for backend in model.backends_for(RESPONSES_API):
            if backend.url == owner.backend_url and backend.model == owner.backend_model:
                return model, backend
    raise NotFound(f"Response with id '{response_id}' is held by a backend that is no longer configured.")


def not_found(response_id: str) -> NotFound:
    """OpenAI's 404 for a response id: the same for an unknown id and for another account's."""
    return NotFound(f"Response with id '{response_id}' not found.", code=None)

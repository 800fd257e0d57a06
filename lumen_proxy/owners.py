"""Which backend holds a Responses API response, and which account may touch it.

A backend that stores responses (vLLM, llama.cpp's server, OpenAI) keeps them itself; Lumen only
remembers, for each response id it relayed, the backend that made it and the account that asked. To
any other account the id does not exist (the same 404 as an unknown id, so ids cannot be probed).
The memory is bounded (``response_ids.keep``, oldest forgotten first) and expires
(``response_ids.hours``); it is this process's, so a restart forgets it (a reload does not).
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
    """Response id → who made it where; bounded and expiring. Every operation is O(1)."""

    def __init__(self, *, keep: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.keep, self.ttl, self.clock = keep, ttl, clock
        self._owners: OrderedDict[str, Owner] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def remember(self, response_id: str, account_id: int, model: str, backend: Backend) -> None:
        now = self.clock()
        self._owners[response_id] = Owner(account_id, model, backend.url, backend.model, now + self.ttl)
        self._owners.move_to_end(response_id)
        while len(self._owners) > self.keep:
            self._owners.popitem(last=False)
        while self._owners:  # expired ones leave from the front (oldest first), so the map never keeps them long
            oldest = next(iter(self._owners.values()))
            if oldest.expires > now:
                break
            self._owners.popitem(last=False)

    def owner(self, response_id: str, account_id: int) -> Owner | None:
        """The owner, if ``account_id`` made ``response_id`` and it has not expired; else None."""
        owner = self._owners.get(response_id)
        if owner is None or owner.account_id != account_id:
            return None
        if owner.expires <= self.clock():
            del self._owners[response_id]
            return None
        return owner

    def forget(self, response_id: str) -> None:
        self._owners.pop(response_id, None)


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

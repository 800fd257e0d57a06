"""People Lumen meets before their administrator created their account.

A portal sign-in (OpenID Connect, a trusted header) or a delegating key's request (Open WebUI) can
name someone with no account. One rule, ``portal.new_accounts``, decides for all of them: create the
account (named by what the sign-in or the front end says, in the configured group, else
``default_group``) or refuse with a message that says whom to ask.
"""

from __future__ import annotations

import logging

from .cli_input import EMAIL, name_problem, shown
from .runtime import Runtime
from .store import AccountRow, StoreError

log = logging.getLogger("lumen_proxy")


class NotAdmitted(Exception):
    """No account for this person, and none may be created; the message says what to do."""


async def admit_newcomer(rt: Runtime, who: str, *, group: str | None = None, how: str) -> AccountRow:
    """The new account of ``who`` (or the one a concurrent request just created), or :class:`NotAdmitted`."""
    rule = rt.config.portal.new_accounts
    if not rule.create:
        raise NotAdmitted(f"There is no Lumen account for {shown(who, 80)}. Ask your administrator to create "
                          "one (lumen-proxy accounts add), then try again.")
    if name_problem(who) is not None:
        raise NotAdmitted(f"The name {shown(who, 80)} cannot name a Lumen account. Ask your administrator to "
                          "create one for you.")
    chosen = group or rule.group or rt.config.default_group
    try:
        account = await rt.store.add_account(who, rule.coins, group=chosen)
    except StoreError:  # a concurrent sign-in or request (or the CLI) created it meanwhile
        await rt.view.reload()
        found = rt.view.person(who)
        if found is None:
            raise
        return found
    if EMAIL.fullmatch(who) and rt.view.person(who) is None:  # named by an address: it is also its email
        account = await rt.store.update_account(account.name, email=who)
    log.info("created the account %s (group %s) at its first %s", account.id, chosen or "-", how)
    await rt.view.reload()
    return account

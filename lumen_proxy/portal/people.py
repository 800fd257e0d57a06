"""Which account a sign-in names, and what happens to a person who has none yet.

One rule for every way in (OpenID Connect, the trusted header): the account whose name is the
value, else the one whose email is (case-insensitively); none, then ``portal.new_accounts``:
create it (named by the value, in the configured group, else ``default_group``) or refuse with a
page that says whom to ask. A provider's groups claim, when mapped in ``portal.oidc.groups``, sets
the group at every sign-in: the identity provider stays the source of truth for membership.
"""

from __future__ import annotations

import logging

from ..cli_input import name_problem
from ..runtime import Runtime
from ..store import AccountRow, StoreError
from .guard import Problem
from .records import PortalRecords

log = logging.getLogger("lumen_proxy")


async def account_for(rt: Runtime, records: PortalRecords, who: str, *, email: str | None,
                      group: str | None) -> AccountRow:
    """The enabled account ``who`` names (created if the config says so), in ``group`` if one is mapped."""
    if not who:
        raise Problem(403, "No account", "Your sign-in did not say who you are. Contact your administrator.")
    account = await records.find_account(who)
    if account is None:
        account = await _create(rt, records, who, email=email, group=group)
    elif group is not None and account.group != group:
        account = await rt.store.update_account(account.name, group=group)
        await rt.view.reload()
    if email is not None and account.email is None:
        await records.set_email(account.id, email)
    if not account.enabled:
        raise Problem(403, "Account disabled", f"The account {account.name} is disabled. Contact your administrator.")
    return rt.view.accounts.get(account.id, account)


async def _create(rt: Runtime, records: PortalRecords, who: str, *, email: str | None,
                  group: str | None) -> AccountRow:
    rule = rt.config.portal.new_accounts
    if not rule.create:
        raise Problem(403, "No account yet", f"There is no Lumen account for {who}. Ask your administrator to create "
                                             "one (lumen-proxy accounts add), then sign in again.")
    problem = name_problem(who)
    if problem is not None:
        raise Problem(403, "Cannot create your account", f"Your sign-in names you {who!r}, which cannot name an "
                                                         "account. Ask your administrator to create one for you.")
    chosen = group or rule.group or rt.config.default_group
    try:
        account = await rt.store.add_account(who, rule.coins, group=chosen)
    except StoreError:  # created meanwhile by a second sign-in or the CLI
        found = await records.find_account(who)
        if found is None:
            raise
        return found
    log.info("portal: created the account %s (group %s) at its first sign-in", account.id, chosen or "-")
    await rt.view.reload()
    return account

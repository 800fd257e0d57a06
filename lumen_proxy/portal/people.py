"""Which account a sign-in names, and what happens to a person who has none yet.

One rule for every way in (OpenID Connect, the trusted header): the account whose name is the
value, else the one whose email is (case-insensitively); none, then ``portal.new_accounts``:
create it (named by the value, in the configured group, else ``default_group``) or refuse with a
page that says whom to ask. A provider's groups claim, when mapped in ``portal.oidc.groups``, sets
the group at every sign-in: the identity provider stays the source of truth for membership.
"""

from __future__ import annotations

from ..newcomers import NotAdmitted, admit_newcomer
from ..runtime import Runtime
from ..store import AccountRow
from .guard import Problem
from .records import PortalRecords


async def account_for(rt: Runtime, records: PortalRecords, who: str, *, email: str | None,
                      group: str | None) -> AccountRow:
    """The enabled account ``who`` names (created if the config says so), in ``group`` if one is mapped."""
    if not who:
        raise Problem(403, "No account", "Your sign-in did not say who you are. Contact your administrator.")
    account = await records.find_account(who)
    if account is None:
        account = await _create(rt, records, who, email=email, group=group)
    if not account.enabled:  # before any change: a refused sign-in changes nothing
        raise Problem(403, "Account disabled", f"The account {account.name} is disabled. Contact your administrator.")
    if group is not None and account.group != group:
        account = await rt.store.update_account(account.name, group=group)
        await rt.view.reload()
    if email is not None and account.email is None:
        await records.set_email(account.id, email)
        await rt.view.reload()  # our own write: the change feed only sees other connections'
    return rt.view.accounts.get(account.id, account)


async def _create(rt: Runtime, records: PortalRecords, who: str, *, email: str | None,
                  group: str | None) -> AccountRow:
    try:
        return await admit_newcomer(rt, who, group=group, how="sign-in")
    except NotAdmitted as refused:
        raise Problem(403, "No account yet", str(refused)) from None

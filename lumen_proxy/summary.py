"""What a person may see of their own account, computed once for ``/lumen/v1/me`` and the portal.

Everything here comes from memory (the access view, the wallets, the limiter's windows, the
config): no SQL, so scripts can poll ``/lumen/v1/me`` and the Usage page its live panel freely.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .auth import account_limits, visible_models
from .billing import to_coins
from .periods import iso, next_start
from .runtime import Runtime
from .store import AccountRow


def account_summary(rt: Runtime, account: AccountRow) -> dict[str, Any]:
    """Balance, allowance (with its refill time), coins held, models and limits of ``account``."""
    allowance_left = rt.wallets.allowance_left(account.id)
    group = rt.config.group(account.group)
    allowance = None
    if group is not None and group.allowance is not None:
        resets = next_start(rt.allowances.clock(), group.allowance.every, rt.config.timezone)
        allowance = {"coins": to_coins(group.allowance.coins), "left": to_coins(allowance_left),
                     "every": group.allowance.every, "resets_at": iso(resets, rt.config.timezone)}
    return {
        "account": account.name,
        "group": group.name if group is not None else None,
        "coins": to_coins(rt.wallets.settled(account.id) - allowance_left),  # the persistent balance
        "allowance": allowance,
        "coins_held": to_coins(rt.wallets.held_by(account.id)),
        "models": [m.name for m in visible_models(rt.config, account)],
        "limits": dataclasses.asdict(account_limits(rt.config, account)),
    }


def live_window(rt: Runtime, account: AccountRow) -> dict[str, Any]:
    """The account's sliding window now, against its limits (0 = unlimited)."""
    limits = account_limits(rt.config, account)
    used = rt.limiter.window(f"account:{account.id}")
    return {
        "requests": {"used": used.requests, "limit": limits.rpm},
        "tokens": {"used": used.tokens, "limit": limits.tpm},
        "in_flight": {"used": used.in_flight, "limit": limits.concurrency},
        "waiting": rt.share.waiting_of(account.id),  # this person's requests waiting for a busy backend
        "window_seconds": 60,
    }

"""Part 10's scenario from README alone, through the real CLI beside the running server.

The groups come from README's YAML block (only the model names are this test's); the admin imports
500 accounts from a CSV, they are served on the allowance the server grants, the next month refills
them (the server's clock is injected: no sleeping), and one student moves to staff.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import openai
import yaml

from tests.conftest import MakeProxy, admin, build_config, config_dict, eventually, query, write_config
from tests.fake_upstream import UpstreamServer

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BERLIN = ZoneInfo("Europe/Berlin")
USER = [{"role": "user", "content": "hello"}]


def readme_groups() -> dict[str, Any]:
    """The YAML block of README's "Groups and allowances" section."""
    section = README[README.index("## Groups and allowances"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert block is not None
    data: dict[str, Any] = yaml.safe_load(block.group(1))
    return data


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_two_groups_500_accounts_a_refill_and_a_move(make_proxy: MakeProxy, upstream: UpstreamServer,
                                                           tmp_path: Path) -> None:
    groups = readme_groups()
    assert [g["name"] for g in groups["groups"]] == ["students", "staff"]
    groups["groups"][0]["models"] = ["gpt-4o", "echo"]  # README's model names are an example's
    data = config_dict(tmp_path, [upstream.base_url], **groups)
    config_file = write_config(tmp_path, data)
    clock = Clock(datetime(2026, 11, 30, 12, 0, tzinfo=BERLIN).timestamp())
    proxy = await make_proxy(build_config(tmp_path, data), clock=clock)

    roster = tmp_path / "students.csv"
    roster.write_text("name,group\n" + "".join(f"student{i:03d},students\n" for i in range(499)) + "ana,\n")
    planned = await admin(config_file, "accounts", "import", str(roster), "--dry-run")
    assert "500" in planned and not query(proxy.rt.config.database, "SELECT 1 FROM accounts")
    assert "500 created" in await admin(config_file, "accounts", "import", str(roster))
    assert "500 unchanged" in await admin(config_file, "accounts", "import", str(roster))
    key = (await admin(config_file, "keys", "create", "ana")).strip()

    async def served() -> bool:
        try:
            return bool((await proxy.sdk(key).chat.completions.create(model="gpt-4o", messages=USER)).choices)
        except openai.APIStatusError:  # 401 until the server has seen the key
            return False

    assert await eventually(served, within=2)
    await proxy.flush()
    shown = json.loads(await admin(config_file, "groups", "show", "students", "--json"))
    assert shown["members"] == 500
    ana = json.loads(await admin(config_file, "accounts", "show", "ana", "--json"))
    assert ana["group"] == "students" and ana["coins"] == 0
    assert ana["allowance"]["granted"] is True and 99 < ana["allowance"]["left"] < 100  # one answer spent
    assert ana["allowance"]["resets_at"] == "2026-12-01T00:00:00+01:00"

    clock.now = datetime(2026, 12, 1, 0, 0, 1, tzinfo=BERLIN).timestamp()  # the next period
    await proxy.rt.allowances.refill()
    lefts = {a["name"]: a["allowance"]["left"]
             for a in json.loads(await admin(config_file, "accounts", "list", "--group", "students", "--json"))}
    assert len(lefts) == 500 and set(lefts.values()) == {100}
    refills = query(proxy.rt.config.database, "SELECT count(*) FROM ledger WHERE note = 'allowance 2026-12 (students)'")
    assert refills[0][0] == 500

    await admin(config_file, "accounts", "set-group", "ana", "staff")

    async def staff_limits() -> bool:
        raw = await proxy.sdk(key).chat.completions.with_raw_response.create(model="echo", messages=USER)
        return raw.headers["x-ratelimit-limit-requests"] == "120"

    assert await eventually(staff_limits, within=2)
    assert len([m async for m in proxy.sdk(key).models.list()]) == len(data["models"])  # staff: every model
    await proxy.flush()
    problems = query(proxy.rt.config.database, """
        SELECT a.name FROM accounts a WHERE
          (SELECT coalesce(sum(amount), 0) FROM ledger l WHERE l.account_id = a.id)
          - (SELECT coalesce(sum(cost), 0) FROM usage_daily d WHERE d.account_id = a.id)
          != a.balance + a.allowance""")
    assert not problems

"""Delegating keys (part 12): one shared front end's key (Open WebUI's) acting for each of its users.

Open WebUI with ``ENABLE_FORWARD_USER_INFO_HEADERS=true`` sends, with every request to an OpenAI
backend, the headers of ``backend/open_webui/utils/headers.py``: ``X-OpenWebUI-User-Name`` (URL-quoted,
spaces kept), ``-User-Id``, ``-User-Email``, ``-User-Role`` (and, newer, ``-Chat-Id``). :func:`owui_headers`
builds exactly those, and the official ``openai`` SDK sends them (``extra_headers=``) as Open WebUI's
requests carry them. The main scenarios run the real ``lumen-proxy serve`` with accounts and keys made
by the CLI and check the billing in the database; the rest run the app in-process (``make_proxy``).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import openai
import pytest

from lumen_proxy import billing
from lumen_proxy.config import load_config
from tests.conftest import (
    LumenProcess,
    MakeProxy,
    Proxy,
    admin,
    auth,
    build_config,
    config_dict,
    eventually,
    query,
    write_config,
)
from tests.fake_upstream import UpstreamServer

MESSAGES: list[Any] = [{"role": "user", "content": "Hello from Open WebUI"}]
EMAIL_HEADER = "X-OpenWebUI-User-Email"
NAME_HEADER = "X-OpenWebUI-User-Name"


def owui_headers(name: str, email: str, role: str = "user") -> dict[str, str]:
    """What Open WebUI's ``include_user_info_headers`` adds for a user (plus the newer chat id)."""
    return {
        NAME_HEADER: quote(name, safe=" "),
        "X-OpenWebUI-User-Id": str(uuid.uuid5(uuid.NAMESPACE_URL, email)),
        EMAIL_HEADER: email,
        "X-OpenWebUI-User-Role": role,
        "X-OpenWebUI-Chat-Id": str(uuid.uuid4()),
    }


def micro(coins: float) -> int:
    return int(coins * 1_000_000)


def account_ids(database: Path) -> dict[str, int]:
    return {r["name"]: r["id"] for r in query(database, "SELECT id, name FROM accounts")}


def balance(database: Path, name: str) -> int:
    return int(query(database, "SELECT balance FROM accounts WHERE name = ?", name)[0]["balance"])


def rows_by_request(database: Path) -> dict[str, sqlite3.Row]:
    return {r["request_id"]: r for r in query(database, "SELECT * FROM usage")}


def assert_openai_error(body: Any, status: int, code: str) -> str:
    """``body`` is OpenAI's error shape with ``code``; returns the message."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code, (status, error)
    assert isinstance(error["message"], str) and error["message"]
    return str(error["message"])


async def chat(session: aiohttp.ClientSession, base_url: str, key: str, headers: dict[str, str],
               model: str = "gpt-4o") -> tuple[int, Any]:
    """One non-streaming chat completion with raw aiohttp (the bytes of the headers are the point)."""
    async with session.post(base_url + "/chat/completions", json={"model": model, "messages": MESSAGES},
                            headers={**auth(key), **headers}) as response:
        return response.status, await response.json(content_type=None)


async def flushed(proxy: Proxy) -> Path:
    await proxy.flush()
    return proxy.rt.config.database


# -- in-process helpers --------------------------------------------------------------------------------
def owui_config(tmp_path: Path, upstream: UpstreamServer, **top: Any) -> dict[str, Any]:
    """The usual test config with two groups: students (gpt-4o and echo only) and staff (all models)."""
    data = config_dict(tmp_path, [upstream.base_url], **top)
    data.setdefault("groups", [{"name": "students", "models": ["gpt-4o", "echo"]}, {"name": "staff"}])
    return data


async def delegating_key(proxy: Proxy, account: str = "owui") -> tuple[str, int]:
    async with proxy.rt.usage.lock:
        key, row = await proxy.rt.store.create_key(account, "open-webui", None, delegate=True)
    await proxy.rt.view.reload()
    assert row.delegate
    return key, row.id


async def set_email(proxy: Proxy, name: str, email: str) -> None:
    async with proxy.rt.usage.lock:
        await proxy.rt.store.update_account(name, email=email)
    await proxy.rt.view.reload()


async def front_end(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path,
                    **top: Any) -> tuple[Proxy, str, int]:
    """A proxy with owui (the front end's own account, no coins), bob (email bob@uni.example, 10 coins)
    and owui's delegating key."""
    proxy = await make_proxy(build_config(tmp_path, owui_config(tmp_path, upstream, **top)))
    await proxy.account("owui", coins=0)
    await proxy.account("bob", coins=10)
    await set_email(proxy, "bob", "bob@uni.example")
    key, key_id = await delegating_key(proxy)
    return proxy, key, key_id


# -- the real process ----------------------------------------------------------------------------------
async def test_open_webui_bills_each_person_through_lumen_proxy_serve(
        lumen_process: Any, upstream: UpstreamServer, tmp_path: Path) -> None:
    """Open WebUI's key with its users' headers, through ``lumen-proxy serve``: each person's requests
    (streamed and not) are billed to their account, with the delegating key's id, and the front end's
    own account pays nothing; /v1/models, /lumen/v1/me and /lumen/v1/usage answer for the person."""
    data = owui_config(tmp_path, upstream, default_group="students")
    path = write_config(tmp_path, data)
    database = load_config(path).database
    price = load_config(path).by_name["gpt-4o"].price
    await admin(path, "accounts", "add", "owui", "--group", "staff")  # the front end's own account: 0 coins
    await admin(path, "accounts", "add", "alice@uni.example", "--coins", "10")  # matched by name
    await admin(path, "accounts", "add", "bob", "--coins", "10", "--group", "staff")
    await admin(path, "accounts", "set-email", "bob", "bob@uni.example")  # matched by email
    created = json.loads(await admin(path, "keys", "create", "owui", "--delegate", "--label", "open-webui", "--json"))
    key, key_id = created["key"], created["id"]
    assert created["delegate"] is True and created["account"] == "owui"
    listed = json.loads(await admin(path, "keys", "list", "owui", "--json"))
    assert [(k["id"], k["delegate"]) for k in listed] == [(key_id, True)]
    ids = account_ids(database)
    proc: LumenProcess = lumen_process(path)

    alice = owui_headers("Alice Liddell", "alice@uni.example")
    bob = owui_headers("Bob Ärger", "bob@uni.example", role="admin")
    sent: dict[str, str] = {}  # request id -> whose
    client = openai.AsyncOpenAI(api_key=key, base_url=proc.base_url, max_retries=0)
    try:
        for who, headers in (("alice@uni.example", alice), ("bob", bob)):
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=MESSAGES, extra_headers=headers)
            assert raw.parse().choices[0].message.content
            sent[raw.headers["x-request-id"]] = who
            raw_stream = await client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=headers)
            text = "".join([c.choices[0].delta.content or "" async for c in raw_stream.parse() if c.choices])
            assert text
            sent[raw_stream.headers["x-request-id"]] = who

        # Without the header the key is owui's own, which has no coins: OpenAI's 402.
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert refused.value.status_code == 402
        assert_openai_error(refused.value.response.json(), 402, "insufficient_quota")

        # The models a person may use, not the front end's (alice is a student: gpt-4o and echo).
        assert sorted(m.id for m in (await client.models.list()).data) == ["echo", "gpt-4o", "text-embedding-3-small"]
        assert sorted(m.id for m in (await client.models.list(extra_headers=alice)).data) == ["echo", "gpt-4o"]
        with pytest.raises(openai.PermissionDeniedError):
            await client.models.retrieve("text-embedding-3-small", extra_headers=alice)
        assert (await client.models.retrieve("text-embedding-3-small", extra_headers=bob)).id == \
            "text-embedding-3-small"
    finally:
        await client.close()

    async def all_logged() -> bool:  # the four answers and the 402
        return len(rows_by_request(database)) == 5 and all(r in rows_by_request(database) for r in sent)

    assert await eventually(all_logged, within=5)
    rows = rows_by_request(database)
    spent = {"alice@uni.example": 0, "bob": 0}
    for request_id, who in sent.items():
        row = rows[request_id]
        assert (row["account_id"], row["key_id"], row["status"], row["model"]) == (ids[who], key_id, 200, "gpt-4o")
        assert row["estimated"] == 0 and row["cost"] > 0
        assert row["cost"] == billing.cost(price, row["prompt_tokens"], row["completion_tokens"])
        spent[who] += row["cost"]
    for who, cost in spent.items():
        assert balance(database, who) == micro(10) - cost
        assert query(database, "SELECT sum(cost) AS c FROM usage WHERE account_id = ?", ids[who])[0]["c"] == cost
    assert balance(database, "owui") == 0
    owui_rows = query(database, "SELECT status, cost, key_id FROM usage WHERE account_id = ?", ids["owui"])
    assert [tuple(r) for r in owui_rows] == [(402, 0, key_id)]
    assert len(account_ids(database)) == 3  # nobody was created

    # The backend never learns who the person is: clients' headers are not forwarded.
    posts = [r for r in upstream.state.requests if r.method == "POST"]
    assert len(posts) == 4
    assert not any(name.lower().startswith("x-openwebui") for r in posts for name in r.headers)

    async with aiohttp.ClientSession() as session:
        async with session.get(proc.origin + "/lumen/v1/me", headers={**auth(key), **bob}) as response:
            me = await response.json()
        assert (response.status, me["account"], me["key_id"], me["group"]) == (200, "bob", key_id, "staff")
        assert me["coins"] == (micro(10) - spent["bob"]) / 1_000_000
        async with session.get(proc.origin + "/lumen/v1/me", headers=auth(key)) as response:
            assert (await response.json())["account"] == "owui"

        async def bobs_usage() -> Any:
            async with session.get(proc.origin + "/lumen/v1/usage?by=key", headers={**auth(key), **bob}) as answer:
                assert answer.status == 200
                return await answer.json()

        async def bobs_usage_counted() -> bool:
            return [r["requests"] for r in (await bobs_usage())["data"]] == [2]

        assert await eventually(bobs_usage_counted, within=5)
        report = await bobs_usage()
        assert report["account"] == "bob"
        assert [(r["key"], r["errors"], r["cost"]) for r in report["data"]] == [(key_id, 0, spent["bob"] / 1_000_000)]


async def test_user_name_header_and_keys_delegate_off_while_serving(
        lumen_process: Any, upstream: UpstreamServer, tmp_path: Path) -> None:
    """``delegation.header: X-OpenWebUI-User-Name``: the URL-quoted name is unquoted (``jane%2Edoe`` is
    jane.doe), a display name that cannot name an account is refused, not created; ``keys delegate ID
    --off`` while the server runs makes the header meaningless within a second, ``keys delegate ID``
    makes it count again."""
    data = owui_config(tmp_path, upstream, delegation={"header": NAME_HEADER},
                       portal={"new_accounts": {"create": True, "group": "students", "coins": 1}})
    path = write_config(tmp_path, data)
    database = load_config(path).database
    await admin(path, "accounts", "add", "owui", "--coins", "5")
    await admin(path, "accounts", "add", "jane.doe", "--coins", "5")
    created = json.loads(await admin(path, "keys", "create", "owui", "--delegate", "--json"))
    key, key_id = created["key"], created["id"]
    ids = account_ids(database)
    proc: LumenProcess = lumen_process(path)

    async with aiohttp.ClientSession() as session:
        async def me(headers: dict[str, str]) -> tuple[int, Any]:
            async with session.get(proc.origin + "/lumen/v1/me", headers={**auth(key), **headers}) as response:
                return response.status, await response.json()

        jane = {**owui_headers("jane.doe", "jane@uni.example"), NAME_HEADER: "jane%2Edoe"}
        assert (await me(jane))[1]["account"] == "jane.doe"
        status, body = await chat(session, proc.base_url, key, jane)
        assert status == 200, body
        first = body["id"]

        # Open WebUI's quoting of display names that no account can be named: refused, nobody created.
        assert owui_headers("Zoë Ärger", "zoe@uni.example")[NAME_HEADER] == "Zo%C3%AB %C3%84rger"
        for name in ("Zoë Ärger", "Jane Doe", "=cmd"):
            headers = owui_headers(name, "zoe@uni.example")
            status, body = await chat(session, proc.base_url, key, headers)
            assert status == 403, body
            message = assert_openai_error(body, 403, "account_not_found")
            assert "cannot name a Lumen account" in message and "administrator" in message
        assert account_ids(database) == ids

        off = json.loads(await admin(path, "keys", "delegate", str(key_id), "--off", "--json"))
        assert off["delegate"] is False

        async def ignored() -> bool:
            return (await me(jane))[1]["account"] == "owui"

        assert await eventually(ignored, within=3)  # promised: a second
        status, body = await chat(session, proc.base_url, key, jane)
        assert status == 200, body
        second = body["id"]
        status, body = await chat(session, proc.base_url, key, owui_headers("Zoë Ärger", "zoe@uni.example"))
        assert status == 200, body  # an ordinary key: the header means nothing, nobody is refused or created

        on = json.loads(await admin(path, "keys", "delegate", str(key_id), "--json"))
        assert on["delegate"] is True

        async def counted() -> bool:
            return (await me(jane))[1]["account"] == "jane.doe"

        assert await eventually(counted, within=3)
        status, body = await chat(session, proc.base_url, key, jane)
        assert status == 200, body
        third = body["id"]

    answered = [json.loads(bytes(r.sent))["id"] for r in upstream.state.requests if r.method == "POST"]
    assert len(answered) == 4 and {first, second, third} <= set(answered)  # the refused never reached it

    async def logged() -> bool:
        return len(query(database, "SELECT 1 FROM usage WHERE status = 200")) == 4

    assert await eventually(logged, within=5)
    rows = query(database, "SELECT account_id, key_id, cost FROM usage WHERE status = 200 ORDER BY id")
    assert [(r["account_id"], r["key_id"]) for r in rows] == [
        (ids["jane.doe"], key_id), (ids["owui"], key_id), (ids["owui"], key_id), (ids["jane.doe"], key_id)]
    assert balance(database, "jane.doe") == micro(5) - rows[0]["cost"] - rows[3]["cost"]
    assert balance(database, "owui") == micro(5) - rows[1]["cost"] - rows[2]["cost"]
    assert account_ids(database) == ids


# -- in-process ----------------------------------------------------------------------------------------
async def test_an_ordinary_keys_headers_are_ignored(make_proxy: MakeProxy, upstream: UpstreamServer,
                                                   tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """From a key that is not delegating, the header names nobody: billed to the key's own account, no
    account created even with ``new_accounts.create: true``."""
    proxy, _, _ = await front_end(make_proxy, upstream, tmp_path,
                                  portal={"new_accounts": {"create": True, "group": "students"}})
    await proxy.account("carol", coins=10)
    carol = await proxy.key("carol")
    before = account_ids(proxy.rt.config.database)
    for headers in (owui_headers("Bob", "bob@uni.example"), owui_headers("New", "newcomer@uni.example"),
                    {EMAIL_HEADER: "=cmd"}):
        status, body = await chat(http, proxy.base_url, carol, headers)
        assert status == 200, body
    async with http.get(proxy.origin + "/lumen/v1/me", headers={**auth(carol), EMAIL_HEADER: "bob"}) as response:
        assert (await response.json())["account"] == "carol"
    database = await flushed(proxy)
    assert account_ids(database) == before
    rows = query(database, "SELECT account_id FROM usage")
    assert [r["account_id"] for r in rows] == [before["carol"]] * 3
    assert balance(database, "bob") == micro(10)


async def test_someone_unknown_gets_an_account_in_the_configured_group(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    """``portal.new_accounts: {create: true, group: staff}``: the first request of someone the front end
    names creates their account (named by the header, in that group, with its coins) and is billed to it;
    the next one reuses it."""
    proxy, key, key_id = await front_end(
        make_proxy, upstream, tmp_path, default_group="students",
        portal={"new_accounts": {"create": True, "group": "staff", "coins": 2}})
    client = proxy.sdk(key)
    newcomer = owui_headers("Dana Newcomer", "dana@uni.example")
    first = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=newcomer)
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                                  extra_headers=owui_headers("Dana Newcomer", "dana@uni.example"))
    assert [c async for c in stream]
    assert first.choices[0].message.content
    models = await client.models.list(extra_headers=newcomer)  # staff: every model
    others = [owui_headers(f"Fay {i}", "fay@uni.example") for i in range(4)]  # four tabs at once, first time
    answers = await asyncio.gather(*(client.chat.completions.create(model="echo", messages=MESSAGES,
                                                                     extra_headers=h) for h in others))
    assert all(a.choices[0].message.content for a in answers)
    assert len(models.data) == 3
    database = await flushed(proxy)
    created = query(database, "SELECT id, group_name, email FROM accounts WHERE name = 'dana@uni.example'")
    assert len(created) == 1 and created[0]["group_name"] == "staff"
    rows = query(database, "SELECT account_id, key_id, cost FROM usage WHERE model = 'gpt-4o'")
    assert [(r["account_id"], r["key_id"]) for r in rows] == [(created[0]["id"], key_id)] * 2
    assert balance(database, "dana@uni.example") == micro(2) - sum(r["cost"] for r in rows)
    assert balance(database, "owui") == 0
    ids = account_ids(database)
    assert sorted(ids) == ["bob", "dana@uni.example", "fay@uni.example", "owui"]  # one account each
    fay = query(database, "SELECT account_id FROM usage WHERE model = 'echo'")
    assert [r["account_id"] for r in fay] == [ids["fay@uni.example"]] * 4


async def test_someone_unknown_is_refused_unless_accounts_are_created(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """``new_accounts.create`` false (the default): 403 ``account_not_found`` saying whom to ask, on every
    path the key reaches; nothing is billed to the front end's account and nobody is created."""
    proxy, key, _ = await front_end(make_proxy, upstream, tmp_path)
    async with proxy.rt.usage.lock:
        await proxy.rt.store.add_coins("owui", micro(5))
    await proxy.rt.view.reload()
    stranger = owui_headers("Eve Stranger", "eve@elsewhere.example")
    status, body = await chat(http, proxy.base_url, key, stranger)
    assert status == 403
    message = assert_openai_error(body, 403, "account_not_found")
    assert "eve@elsewhere.example" in message and "administrator" in message
    for path in ("/v1/models", "/v1/models/gpt-4o", "/lumen/v1/me", "/lumen/v1/usage"):
        async with http.get(proxy.origin + path, headers={**auth(key), **stranger}) as response:
            assert response.status == 403, path
            assert_openai_error(await response.json(), 403, "account_not_found")
    assert not upstream.state.requests
    database = await flushed(proxy)
    assert not query(database, "SELECT * FROM usage")
    assert balance(database, "owui") == micro(5)
    assert "eve@elsewhere.example" not in account_ids(database)


async def test_a_disabled_person_is_refused(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path,
                                            http: aiohttp.ClientSession) -> None:
    proxy, key, _ = await front_end(make_proxy, upstream, tmp_path,
                                    portal={"new_accounts": {"create": True}})
    async with proxy.rt.usage.lock:
        await proxy.rt.store.update_account("bob", enabled=False)
    await proxy.rt.view.reload()
    for headers in (owui_headers("Bob", "bob@uni.example"), {EMAIL_HEADER: "bob"}):
        status, body = await chat(http, proxy.base_url, key, headers)
        assert status == 403
        assert "disabled" in assert_openai_error(body, 403, "account_disabled")
    database = await flushed(proxy)
    assert not query(database, "SELECT * FROM usage") and len(account_ids(database)) == 2


async def test_header_name_case_and_value_spelling(make_proxy: MakeProxy, upstream: UpstreamServer,
                                                   tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Header names are case-insensitive; the value is unquoted and stripped, and an email matches
    case-insensitively."""
    proxy, key, key_id = await front_end(make_proxy, upstream, tmp_path)
    spellings = [
        {"x-openwebui-user-email": "bob@uni.example"},
        {"X-OPENWEBUI-USER-EMAIL": "BOB@UNI.EXAMPLE"},
        {EMAIL_HEADER: "  Bob@Uni.Example  "},
        {EMAIL_HEADER: "%20bob%40uni.example%09"},
        {EMAIL_HEADER: "bob"},  # the account's name
    ]
    for headers in spellings:
        async with http.get(proxy.origin + "/lumen/v1/me", headers={**auth(key), **headers}) as response:
            assert (await response.json())["account"] == "bob", headers
        status, body = await chat(http, proxy.base_url, key, headers)
        assert status == 200, (headers, body)
    database = await flushed(proxy)
    bob = account_ids(database)["bob"]
    assert [(r["account_id"], r["key_id"]) for r in query(database, "SELECT * FROM usage")] == \
        [(bob, key_id)] * len(spellings)
    assert len(account_ids(database)) == 2


async def test_each_person_has_their_own_window_on_the_shared_key(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """``limits: {rpm: 2}``: the key's window is per person, so one person's requests never use up
    another's; a person's own account limits (``accounts set-limits``) apply to them."""
    data = owui_config(tmp_path, upstream, limits={"rpm": 2})
    config_file = write_config(tmp_path, data)
    proxy = await make_proxy(build_config(tmp_path, data))
    for name in ("owui", "alice", "bob", "carol"):
        await proxy.account(name, coins=10)
    key, _ = await delegating_key(proxy)
    await admin(config_file, "accounts", "set-limits", "carol", "--rpm", "1")
    alice, bob, carol = ({EMAIL_HEADER: name} for name in ("alice", "bob", "carol"))

    async def status_of(headers: dict[str, str]) -> int:
        status, body = await chat(http, proxy.base_url, key, headers, model="echo")
        if status == 429:
            assert_openai_error(body, 429, "rate_limit_exceeded")
        return status

    assert [await status_of(alice), await status_of(alice)] == [200, 200]
    assert await status_of(bob) == 200
    assert await status_of(alice) == 429
    assert await status_of(bob) == 200
    assert await status_of(bob) == 429
    assert await status_of({}) == 200  # the front end's own requests: a window of their own
    assert await eventually(lambda: _carol_limited(proxy))
    assert [await status_of(carol), await status_of(carol)] == [200, 429]


async def _carol_limited(proxy: Proxy) -> bool:
    carol = proxy.rt.view.person("carol")
    return carol is not None and carol.rpm == 1


async def test_hostile_header_values(make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path,
                                     http: aiohttp.ClientSession) -> None:
    """With ``new_accounts.create: true``: a 10 KB value is refused by the HTTP parser (400, never 500),
    values that cannot name an account are refused with 403, the front end's own account is just that;
    nothing of it creates an account."""
    proxy, key, key_id = await front_end(make_proxy, upstream, tmp_path,
                                         portal={"new_accounts": {"create": True}})
    async with proxy.rt.usage.lock:
        await proxy.rt.store.add_coins("owui", micro(5))
    await proxy.rt.view.reload()
    database = proxy.rt.config.database
    before = account_ids(database)

    async with http.post(proxy.base_url + "/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES},
                         headers={**auth(key), EMAIL_HEADER: "a" * 10_000 + "@uni.example"}) as response:
        assert response.status == 400  # aiohttp's own refusal (Got more than 8190 bytes), before Lumen
    for value in ("x" * 8000, "a" * 300 + "@uni.example", "=cmd", "+1@evil", "-2", "@SUM(A1)",
                  "bob%0D%0AX-Evil: 1", "%00bob", "..", "%2e%2e%2fetc", "Zo%C3%AB", "a%FFb", "\tbob\tx"):
        status, body = await chat(http, proxy.base_url, key, {EMAIL_HEADER: value})
        assert status == 403, (value, body)
        assert "cannot name a Lumen account" in assert_openai_error(body, 403, "account_not_found")

    status, body = await chat(http, proxy.base_url, key, {EMAIL_HEADER: "owui"})  # its own account
    assert status == 200, body
    await proxy.flush()
    assert account_ids(database) == before
    rows = query(database, "SELECT account_id, key_id, status FROM usage")
    assert [tuple(r) for r in rows] == [(before["owui"], key_id, 200)]


async def test_raw_utf8_in_the_header_is_refused(make_proxy: MakeProxy, upstream: UpstreamServer,
                                                 tmp_path: Path) -> None:
    """A header value in raw UTF-8 (not URL-quoted, as Open WebUI's are) naming no one: 403."""
    proxy, key, _ = await front_end(make_proxy, upstream, tmp_path)
    status, body = await raw_request(proxy, key, EMAIL_HEADER.encode() + b": " + "Zoë".encode())
    assert status == 403, body
    assert "Zoë" in assert_openai_error(json.loads(body), 403, "account_not_found")


async def test_raw_latin1_in_the_header_is_refused_not_a_server_error(
        make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path) -> None:
    """A header value in raw Latin-1 bytes (invalid UTF-8) naming no one: 403, never 500."""
    proxy, key, _ = await front_end(make_proxy, upstream, tmp_path)
    status, body = await raw_request(proxy, key, EMAIL_HEADER.encode() + b": " + "Zoë".encode("latin-1"))
    assert status == 403, body
    assert_openai_error(json.loads(body), 403, "account_not_found")


async def raw_request(proxy: Proxy, key: str, header: bytes) -> tuple[int, bytes]:
    """GET /lumen/v1/me with ``header`` as given, byte for byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    try:
        writer.write(b"GET /lumen/v1/me HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     b"Authorization: Bearer " + key.encode() + b"\r\n" + header + b"\r\n\r\n")
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_a_persons_responses_are_theirs_alone(make_proxy: MakeProxy, upstream: UpstreamServer,
                                                    tmp_path: Path) -> None:
    """The Responses follow-ups answer for the person: alice's stored response, made through the shared
    key, is not found for bob (nor for the front end itself) through that same key."""
    proxy, key, _ = await front_end(make_proxy, upstream, tmp_path)
    await proxy.account("alice", coins=10)
    client = proxy.sdk(key)
    alice, bob = owui_headers("Alice", "alice"), owui_headers("Bob", "bob@uni.example")
    made = await client.responses.create(model="gpt-4o", input="Hello", extra_headers=alice)
    assert (await client.responses.retrieve(made.id, extra_headers=alice)).id == made.id
    for headers in (bob, {}):
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(made.id, extra_headers=headers)

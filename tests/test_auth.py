"""Who may call, and which models: 401, 403, 404 on the wire, with the real openai SDK as the client.

Also: admin changes made with the CLI (a separate process on the same database) reach the running
server within a second, and a storage failure is a 503, never a 401.
"""

from __future__ import annotations

import asyncio
import secrets
import string
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from lumen_proxy import auth
from lumen_proxy.store import StorageFailure
from tests.conftest import Proxy, admin
from tests.fake_upstream import UpstreamServer

HELLO = [{"role": "user", "content": "Hello there"}]
ERROR_FIELDS = {"message", "type", "param", "code"}


def error_fields(error: openai.APIStatusError) -> set[str]:
    """The fields of the body's ``error`` object (the SDK unwraps it)."""
    assert isinstance(error.body, dict)
    return set(error.body)


def random_key() -> str:
    return "sk_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))


async def chat(client: openai.AsyncOpenAI, model: str = "gpt-4o") -> Any:
    return await client.chat.completions.create(model=model, messages=HELLO)


async def call(client: openai.AsyncOpenAI, model: str) -> Any:
    """The call a user makes to ``model``: embeddings for embedding models, chat otherwise."""
    if "embedding" in model:
        return await client.embeddings.create(model=model, input="some words")
    return await chat(client, model)


async def seconds_until(check: Callable[[], Awaitable[bool]], limit: float = 5.0) -> float:
    """How long until ``check`` holds (polled every 20 ms); fails after ``limit`` seconds."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < limit, "the change never took effect"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def is_refused(client: openai.AsyncOpenAI, error: type[openai.APIStatusError],
                     model: str = "gpt-4o") -> bool:
    try:
        await chat(client, model)
    except error:
        return True
    return False


async def is_accepted(client: openai.AsyncOpenAI, model: str = "gpt-4o") -> bool:
    try:
        await chat(client, model)
    except openai.APIStatusError:
        return False
    return True


# -- 401 -------------------------------------------------------------------------------------------------
async def test_missing_key_is_401(proxy: Proxy, alice: str) -> None:
    client = proxy.sdk(alice)
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=HELLO,
                                             extra_headers={"Authorization": openai.Omit()})
    assert error_fields(caught.value) == ERROR_FIELDS
    assert caught.value.code == "invalid_api_key"
    assert "Authorization: Bearer" in caught.value.message


@pytest.mark.parametrize("header", ["Bearer", "Basic dXNlcjpwYXNz", "sk_abcdefghijklmnopqrstuvwxyz0123456789",
                                    "Token sk_abcdefghijklmnopqrstuvwxyz0123456789"])
async def test_malformed_authorization_is_401(proxy: Proxy, alice: str, header: str) -> None:
    client = proxy.sdk(alice, default_headers={"Authorization": header})
    with pytest.raises(openai.AuthenticationError) as caught:
        await chat(client)
    assert error_fields(caught.value) == ERROR_FIELDS
    assert caught.value.code == "invalid_api_key"
    assert caught.value.type == "invalid_request_error"
    assert header.split()[-1] not in caught.value.response.text.replace("Bearer sk_...", "")


async def test_unknown_key_is_401_and_not_echoed(proxy: Proxy, alice: str) -> None:
    key = random_key()
    with pytest.raises(openai.AuthenticationError) as caught:
        await chat(proxy.sdk(key))
    assert caught.value.code == "invalid_api_key"
    assert error_fields(caught.value) == ERROR_FIELDS
    assert key not in caught.value.response.text
    assert key[-30:] not in caught.value.response.text
    assert (caught.value.request_id or "").startswith("req_")


async def test_revoked_key_is_401(proxy: Proxy, alice: str) -> None:
    assert await is_accepted(proxy.sdk(alice))
    await proxy.flush()  # the usage writer is idle: no transaction of its own beside ours
    await proxy.rt.store.revoke_key(alice)
    await proxy.rt.view.reload()
    with pytest.raises(openai.AuthenticationError) as caught:
        await chat(proxy.sdk(alice))
    assert caught.value.code == "invalid_api_key"
    assert alice not in caught.value.response.text


async def test_expired_key_is_401_and_a_future_expiry_works(proxy: Proxy, alice: str) -> None:
    later = await proxy.key("alice", expires_at=time.time() + 3600)
    expired = await proxy.key("alice", expires_at=time.time() - 1)
    assert await is_accepted(proxy.sdk(later))
    with pytest.raises(openai.AuthenticationError) as caught:
        await chat(proxy.sdk(expired))
    assert caught.value.code == "invalid_api_key"
    assert "expired" in caught.value.message
    assert expired not in caught.value.response.text


# -- 403 / 404 and their order ----------------------------------------------------------------------------
async def test_model_outside_the_account_list_is_403(proxy: Proxy, upstream: UpstreamServer) -> None:
    await proxy.account("bob", models=["echo"])
    client = proxy.sdk(await proxy.key("bob"))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await chat(client, "gpt-4o")
    assert error_fields(caught.value) == ERROR_FIELDS
    assert (caught.value.type, caught.value.code, caught.value.param) == (
        "invalid_request_error", "model_not_allowed", "model")
    assert "does not have access" in caught.value.message
    with pytest.raises(openai.PermissionDeniedError):
        await client.models.retrieve("gpt-4o")
    assert upstream.state.requests == []  # refused before any backend saw it


async def test_unknown_model_is_404(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    client = proxy.sdk(alice)
    with pytest.raises(openai.NotFoundError) as caught:
        await chat(client, "gpt-9-imaginary")
    assert error_fields(caught.value) == ERROR_FIELDS
    assert (caught.value.type, caught.value.code, caught.value.param) == (
        "invalid_request_error", "model_not_found", "model")
    assert "gpt-9-imaginary" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-9-imaginary")
    assert upstream.state.requests == []


@pytest.mark.parametrize("model", ["gpt-9-imaginary", "gpt-4o"])
async def test_unauthenticated_caller_learns_nothing_about_models(proxy: Proxy, model: str) -> None:
    await proxy.account("bob", models=["echo"])
    with pytest.raises(openai.AuthenticationError):
        await chat(proxy.sdk(random_key()), model)
    with pytest.raises(openai.AuthenticationError):
        await proxy.sdk(random_key()).models.retrieve(model)


async def test_models_list_is_filtered_per_account(proxy: Proxy, alice: str) -> None:
    await proxy.account("bob", models=["echo", "text-embedding-3-small"])
    bob = proxy.sdk(await proxy.key("bob"))
    everyone = [m.id async for m in proxy.sdk(alice).models.list()]
    assert everyone == ["gpt-4o", "text-embedding-3-small", "echo"]
    assert sorted([m.id async for m in bob.models.list()]) == ["echo", "text-embedding-3-small"]


async def test_models_list_never_shows_a_model_the_call_refuses(proxy: Proxy) -> None:
    await proxy.account("bob", models=["echo", "text-embedding-3-small"])
    bob = proxy.sdk(await proxy.key("bob"))
    listed = {m.id async for m in bob.models.list()}
    for model in proxy.rt.config.models:
        if model.name in listed:
            await call(bob, model.name)  # must not raise
            assert (await bob.models.retrieve(model.name)).id == model.name
        else:
            with pytest.raises(openai.PermissionDeniedError):
                await call(bob, model.name)


async def test_disabled_account_is_refused(proxy: Proxy, alice: str) -> None:
    await proxy.rt.store.update_account("alice", enabled=False)
    await proxy.rt.view.reload()
    client = proxy.sdk(alice)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await chat(client)
    assert caught.value.code == "account_disabled"
    with pytest.raises(openai.PermissionDeniedError):
        await client.models.list()


# -- admin changes reach the running server within a second ------------------------------------------------
async def test_key_revoked_with_the_cli_is_refused_within_a_second(
        proxy: Proxy, alice: str, config_file: Path) -> None:
    client = proxy.sdk(alice)
    assert await is_accepted(client)
    await admin(config_file, "keys", "revoke", alice)
    assert await seconds_until(lambda: is_refused(client, openai.AuthenticationError)) < 1.0


async def test_key_created_with_the_cli_is_accepted_within_a_second(
        proxy: Proxy, alice: str, config_file: Path) -> None:
    client = proxy.sdk((await admin(config_file, "keys", "create", "alice")).strip())
    assert await seconds_until(lambda: is_accepted(client)) < 1.0


async def test_account_disabled_with_the_cli_is_refused_within_a_second(
        proxy: Proxy, alice: str, config_file: Path) -> None:
    client = proxy.sdk(alice)
    await admin(config_file, "accounts", "disable", "alice")
    assert await seconds_until(lambda: is_refused(client, openai.PermissionDeniedError)) < 1.0
    await admin(config_file, "accounts", "enable", "alice")
    assert await seconds_until(lambda: is_accepted(client)) < 1.0


async def test_model_list_changed_with_the_cli_applies_within_a_second(
        proxy: Proxy, alice: str, config_file: Path) -> None:
    client = proxy.sdk(alice)
    await admin(config_file, "accounts", "set-models", "alice", "echo")
    assert await seconds_until(lambda: is_refused(client, openai.PermissionDeniedError, "gpt-4o")) < 1.0
    assert [m.id async for m in client.models.list()] == ["echo"]
    assert await is_accepted(client, "echo")
    await admin(config_file, "accounts", "set-models", "alice", "all")
    assert await seconds_until(lambda: is_accepted(client, "gpt-4o")) < 1.0


# -- a storage failure is 503, never 401 -------------------------------------------------------------------
async def test_storage_failure_is_503_with_retry_after_never_401(
        proxy: Proxy, alice: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def locked() -> int:
        raise StorageFailure("database is locked")

    monkeypatch.setattr(auth, "STALE_AFTER", 0.3)
    monkeypatch.setattr(proxy.rt.store, "generation", locked)
    good, unknown = proxy.sdk(alice), proxy.sdk(random_key())
    assert await seconds_until(lambda: is_refused(good, openai.InternalServerError), limit=3) < 3
    for client in (good, unknown):
        with pytest.raises(openai.InternalServerError) as caught:
            await chat(client)
        assert caught.value.status_code == 503
        assert caught.value.code == "storage_unavailable"
        assert int(caught.value.response.headers["Retry-After"]) > 0
    monkeypatch.undo()
    assert await seconds_until(lambda: is_accepted(good)) < 1.0


async def test_a_key_works_the_moment_keys_create_returns(
        proxy: Proxy, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A script that creates a key and calls the API at once: before, 401 for up to ~0.3 s."""
    await proxy.account("alice")
    for task in proxy.rt.tasks:  # no help from the poll: only the look on a miss may find the key
        if task.get_coro().__qualname__ == "AccessView.run":  # type: ignore[union-attr]
            task.cancel()
    monkeypatch.setattr(auth, "STALE_AFTER", 60.0)
    for _ in range(4):
        key = (await admin(config_file, "keys", "create", "alice")).strip()
        models = await proxy.sdk(key).models.list()
        assert [m.id async for m in models]


async def test_a_flood_of_unknown_keys_looks_at_the_database_a_bounded_number_of_times(
        proxy: Proxy, alice: str, monkeypatch: pytest.MonkeyPatch) -> None:
    looks = 0
    real = proxy.rt.store.generation

    async def counted() -> int:
        nonlocal looks
        looks += 1
        return await real()

    monkeypatch.setattr(proxy.rt.store, "generation", counted)
    async def call(session: aiohttp.ClientSession) -> int:
        async with session.get(proxy.base_url + "/models", headers={"Authorization": f"Bearer {random_key()}"}) as r:
            return r.status

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(*(call(session) for _ in range(300)))
    elapsed = time.monotonic() - started
    assert set(statuses) == {401}
    # One look per MISS_SPACING at most, plus the background poll's own.
    assert looks <= elapsed / auth.MISS_SPACING + elapsed / auth.POLL + 2
    assert await chat(proxy.sdk(alice))  # and a real key is served meanwhile

"""``GET /metrics``: Prometheus text format, and who may read it.

Content is read by prometheus-client's own text parser, so the tests hold for what a Prometheus
server scrapes, not for substrings. Protection needs a request from a non-loopback address, but the
tests only listen on 127.0.0.1: ``as_remote`` builds the real app with one test-only outer middleware
that re-addresses a request carrying ``X-Test-Remote`` through ``request.clone(remote=...)``, which is
how aiohttp itself models a peer address rewritten by a trusted front proxy. Everything after that
middleware (routing, the error middleware, the handler) is the real code path over real HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from lumen_proxy import billing
from lumen_proxy.app import create_app
from lumen_proxy.config import Config
from tests.conftest import MakeProxy, Proxy, build_config, config_dict, eventually
from tests.fake_upstream import UpstreamServer

MESSAGES = [{"role": "user", "content": "count the requests"}]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(origin: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(origin + "/metrics", headers=headers) as response:
        return response.status, response.headers["Content-Type"], await response.text()


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


async def metric(proxy: Proxy, name: str, **labels: str) -> float | None:
    status, _, text = await scrape(proxy.origin)
    assert status == 200
    return value(samples(text), name, **labels)


# -- content -----------------------------------------------------------------------------------------
async def test_metrics_count_requests_latency_tokens_coins_backends_and_refusals(
    make_proxy: MakeProxy, upstream: UpstreamServer, tmp_path: Path
) -> None:
    proxy = await make_proxy(build_config(tmp_path, config_dict(tmp_path, [upstream.base_url],
                                                                limits={"rpm": 3})))
    await proxy.account("alice")
    sdk = proxy.sdk(await proxy.key("alice"))
    usages = []
    for _ in range(2):
        usages.append((await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)).usage)
    stream = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                               stream_options={"include_usage": True})
    usages += [chunk.usage async for chunk in stream if chunk.usage is not None]
    with pytest.raises(openai.RateLimitError):
        await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    status, content_type, text = await scrape(proxy.origin)
    found = samples(text)
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert value(found, "lumen_requests_total", model="gpt-4o", status="200", account="alice") == 3
    assert value(found, "lumen_requests_total", model="-", status="429", account="alice") == 1  # before its body
    assert value(found, "lumen_request_duration_seconds_count", model="gpt-4o") == 3
    assert value(found, "lumen_request_duration_seconds_bucket", model="gpt-4o", le="+Inf") == 3
    assert value(found, "lumen_time_to_first_byte_seconds_count", model="gpt-4o") == 3  # not the 429
    assert value(found, "lumen_time_to_first_byte_seconds_bucket", model="gpt-4o", le="+Inf") == 3
    prompt = sum(u.prompt_tokens for u in usages if u)
    completion = sum(u.completion_tokens for u in usages if u)
    assert len(usages) == 3
    assert value(found, "lumen_tokens_total", model="gpt-4o", kind="prompt") == prompt
    assert value(found, "lumen_tokens_total", model="gpt-4o", kind="completion") == completion
    price = proxy.rt.config.by_name["gpt-4o"].price
    coins = sum(billing.cost(price, u.prompt_tokens, u.completion_tokens) for u in usages if u) / 1_000_000
    assert value(found, "lumen_coins_total", model="gpt-4o") == pytest.approx(coins)
    assert value(found, "lumen_inflight_requests") == 0
    assert value(found, "lumen_backend_up", model="gpt-4o", backend=upstream.base_url) == 1
    assert value(found, "lumen_backend_up", model="echo", backend="builtin:echo") == 1
    assert value(found, "lumen_rate_limit_refusals_total", model="-", limit="requests") == 1


async def test_backend_up_turns_0_when_its_breaker_opens(proxy: Proxy, alice: str, upstream: UpstreamServer) -> None:
    sdk = proxy.sdk(alice)
    upstream.state.behavior.fail_status = 503  # the backend itself says it is broken
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    assert await metric(proxy, "lumen_backend_up", model="gpt-4o", backend=upstream.base_url) == 0
    assert await metric(proxy, "lumen_requests_total", model="gpt-4o", status="503", account="alice") == 3


async def test_inflight_counts_open_streams_and_forgets_abandoned_ones(
    proxy: Proxy, alice: str, upstream: UpstreamServer
) -> None:
    upstream.state.behavior.chunk_delay = 0.05
    upstream.state.behavior.reply = " ".join(f"w{i}" for i in range(10))
    sdk = proxy.sdk(alice)
    assert await metric(proxy, "lumen_inflight_requests") == 0

    finished = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    abandoned = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    await anext(aiter(finished))
    await anext(aiter(abandoned))
    assert await metric(proxy, "lumen_inflight_requests") == 2

    await abandoned.close()  # the client goes away mid-stream: the handler is cancelled
    assert [chunk async for chunk in finished]
    assert await upstream.state.disconnected.wait()

    async def drained() -> bool:
        return await metric(proxy, "lumen_inflight_requests") == 0

    assert await eventually(drained, within=3)


# -- protection --------------------------------------------------------------------------------------
@web.middleware
async def remote_from_header(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    remote = request.headers.get("X-Test-Remote")
    return await handler(request.clone(remote=remote) if remote else request)


@pytest.fixture
async def as_remote(tmp_path: Path) -> AsyncIterator[Callable[[Config], Awaitable[str]]]:
    """Serve ``create_app(config)`` on 127.0.0.1 with ``remote_from_header`` outermost; yields the origin."""
    servers: list[TestServer] = []

    async def serve(config: Config) -> str:
        app = create_app(config)
        app.middlewares.insert(0, remote_from_header)
        servers.append(TestServer(app, host="127.0.0.1"))
        await servers[-1].start_server()
        return f"http://127.0.0.1:{servers[-1].port}"

    yield serve
    for server in servers:
        await server.close()


def protected_config(tmp_path: Path, upstream: UpstreamServer, **top: Any) -> Config:
    return build_config(tmp_path, config_dict(tmp_path, [upstream.base_url], **top))


@pytest.mark.parametrize("remote", [None, "127.0.0.1", "::1"], ids=["real-loopback", "127.0.0.1", "ipv6-loopback"])
async def test_loopback_reads_metrics_without_a_token(
    remote: str | None, as_remote: Any, upstream: UpstreamServer, tmp_path: Path
) -> None:
    origin = await as_remote(protected_config(tmp_path, upstream, admin_token="admin-s3cret"))
    status, _, text = await scrape(origin, {"X-Test-Remote": remote} if remote else None)

    assert status == 200
    assert "lumen_requests" in {f.name for f in text_string_to_metric_families(text)}


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "admin-s3cret", "Basic admin-s3cret"],
                         ids=["no-token", "wrong-token", "not-bearer", "basic"])
async def test_a_remote_client_without_the_admin_token_is_refused(
    authorization: str | None, as_remote: Any, upstream: UpstreamServer, tmp_path: Path
) -> None:
    origin = await as_remote(protected_config(tmp_path, upstream, admin_token="admin-s3cret"))
    headers = {"X-Test-Remote": "203.0.113.9"}
    if authorization:
        headers["Authorization"] = authorization
    async with aiohttp.ClientSession() as session, session.get(origin + "/metrics", headers=headers) as response:
        body = await response.json()

    assert response.status == 404  # not advertised to the outside
    assert body["error"]["type"] == "invalid_request_error"
    assert "lumen_" not in str(body)


async def test_a_remote_client_with_the_admin_token_reads_metrics(
    as_remote: Any, upstream: UpstreamServer, tmp_path: Path
) -> None:
    origin = await as_remote(protected_config(tmp_path, upstream, admin_token="admin-s3cret"))
    status, content_type, text = await scrape(
        origin, {"X-Test-Remote": "203.0.113.9", "Authorization": "Bearer admin-s3cret"})

    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert {"lumen_inflight_requests", "lumen_backend_up"} <= {f.name for f in text_string_to_metric_families(text)}


async def test_without_an_admin_token_configured_no_remote_client_gets_in(
    as_remote: Any, upstream: UpstreamServer, tmp_path: Path
) -> None:
    origin = await as_remote(protected_config(tmp_path, upstream))
    for authorization in ("Bearer None", "Bearer ", "Bearer null"):
        status, _, _ = await scrape(origin, {"X-Test-Remote": "10.0.0.8", "Authorization": authorization})
        assert status == 404



async def test_requests_refused_because_usage_cannot_be_recorded_are_counted(
        proxy: Proxy, alice: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """They have no usage row (the backlog must not grow): the metric is where an admin sees them."""
    from lumen_proxy.errors import StorageUnavailable
    monkeypatch.setattr(proxy.rt.usage, "refusal", lambda: StorageUnavailable("down", headers={"Retry-After": "5"}))
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            await proxy.sdk(alice).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    _, _, text = await scrape(proxy.origin)
    assert value(samples(text), "lumen_storage_refusals_total") == 3

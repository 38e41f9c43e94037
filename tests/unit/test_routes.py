"""moxy.routes in process: each endpoint over httpx's ASGI transport, on Components built as the app's lifespan
builds them, with the Proxy's upstream fetch replaced by a fake (no sockets) and a clock the test moves."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from moxy import routes
from moxy.app import Plan, open_components
from moxy.config import Settings
from moxy.errors import UpstreamError, UpstreamTimeout
from moxy.proxy import Proxy, ProxyRequest, Served
from moxy.responses import SECURITY_HEADERS
from moxy.signing import Signer
from moxy.telemetry import INTERNAL_ERROR, measured
from moxy.upstream import UpstreamResponse

pytestmark = pytest.mark.anyio

KEY = "routes-test-key-0123456789abcdef"
TOKEN = "purge-token-0123456789"
BASE = "http://testserver"
URL = "https://images.example/cat.png"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


class Clock:
    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeFetch:
    """The upstream: one answer per URL (or an error to raise), every call recorded."""

    clock: Clock
    answers: dict[str, tuple[int, dict[str, str], bytes] | UpstreamError] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    async def __call__(self, url: str, headers: Mapping[str, str]) -> UpstreamResponse:
        self.calls.append((url, dict(headers)))
        answer = self.answers.get(url, UpstreamError("connect-failed"))
        if isinstance(answer, UpstreamError):
            raise answer
        status, fields, body = answer
        now = self.clock()
        return UpstreamResponse(
            url=url,
            status=status,
            headers=fields,
            body=body,
            body_path=None,
            length=len(body),
            declared_length=len(body),
            request_time=now,
            response_time=now,
        )


@dataclass
class Rig:
    components: routes.Components
    fetch: FakeFetch
    clock: Clock
    hits: list[Served]
    client: httpx.AsyncClient

    def sign(self, url: str = URL) -> str:
        return self.components.signer.sign(url)

    async def metric(self, line: str) -> bool:
        return line in (await self.client.get("/metrics")).text


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    settings = Settings(
        key=SecretStr(KEY),
        base_url=BASE,
        cache_dir=tmp_path / "cache",
        purge_token=SecretStr(TOKEN),
        access_log=False,
    )
    plan = Plan.of(settings)
    built = await open_components(plan)
    clock = Clock()
    fetch = FakeFetch(clock)
    signer = Signer(settings.signing_keys(), BASE, clock=clock)
    proxy = Proxy(
        signer=signer,
        policy=plan.policy,
        storage=built.tiers.storage,
        fetch=measured(fetch, built.metrics),
        validators=plan.validators,
        freshness=plan.freshness,
        forward_headers=settings.forward_headers,
        purges=built.purges,
        clock=clock,
    )
    components = replace(built, proxy=proxy, signer=signer)
    hits: list[Served] = []
    app = routes.router(components, on_hit=lambda scope, served: hits.append(served))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        yield Rig(components, fetch, clock, hits, client)
    await proxy.aclose()
    await built.proxy.aclose()
    await built.upstream.aclose()
    await built.tiers.storage.aclose()


def png(max_age: int = 600) -> tuple[int, dict[str, str], bytes]:
    return 200, {"content-type": "image/png", "cache-control": f"max-age={max_age}"}, PNG


# -- the proxy route ---------------------------------------------------------------------------------------------


async def test_miss_then_hit(rig: Rig) -> None:
    rig.fetch.answers[URL] = png()
    url = rig.sign()
    miss = await rig.client.get(url, headers={"accept": "image/webp,*/*"})
    assert (miss.status_code, miss.headers["x-moxy-cache"], miss.content) == (200, "MISS", PNG)
    assert rig.hits == [], "a miss is not a hit to learn"
    rig.clock.now += 30
    hit = await rig.client.get(url, headers={"accept": "image/webp,*/*"})
    assert (hit.status_code, hit.headers["x-moxy-cache"], hit.content) == (200, "HIT", PNG)
    assert hit.headers["age"] == "30"
    assert hit.headers["cache-status"] == "moxy; hit; ttl=570"
    assert hit.headers["cache-control"] == "public, max-age=600, stale-while-revalidate=60, stale-if-error=604800"
    assert "vary" not in hit.headers, "the upstream sent no Vary: one copy for every client, at a CDN too"
    assert hit.headers["etag"] == f'"{hashlib.sha256(PNG).hexdigest()[:32]}"'
    assert hit.headers["x-content-type-options"] == "nosniff"
    assert len(rig.fetch.calls) == 1
    assert [served.cache.value for served in rig.hits] == ["HIT"]
    assert await rig.metric('moxy_requests_total{cache="HIT",status="200"} 1.0')
    assert await rig.metric('moxy_requests_total{cache="MISS",status="200"} 1.0')


async def test_head_range_and_conditional_hits_are_not_learned_as_plain_hits(rig: Rig) -> None:
    rig.fetch.answers[URL] = png()
    url = rig.sign()
    etag = (await rig.client.get(url)).headers["etag"]
    head = await rig.client.head(url)
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", str(len(PNG)))
    assert (await rig.client.get(url, headers={"range": "bytes=0-3"})).content == PNG[:4]
    assert (await rig.client.get(url, headers={"if-none-match": etag})).status_code == 304
    assert rig.hits == [], "HEAD, 206 and 304 are not the memo's plain 200"


@pytest.mark.parametrize(
    ("mangle", "status", "error"),
    [
        (
            lambda url: url[: len(BASE) + 1] + ("B" if url[len(BASE) + 1] == "A" else "A") + url[len(BASE) + 2 :],
            403,
            "BadSignature",
        ),
        (lambda url: BASE + "/x", 400, "MalformedURL"),
    ],
)
async def test_request_errors_are_not_cached(rig: Rig, mangle: Any, status: int, error: str) -> None:
    response = await rig.client.get(mangle(rig.sign()))
    assert response.status_code == status
    assert response.json()["error"] == error
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-moxy-cache"] == "BYPASS"
    assert rig.fetch.calls == []


@pytest.mark.parametrize(
    ("answer", "status", "reason"),
    [
        ((500, {"content-type": "text/plain"}, b"oops"), 502, "upstream-status-500"),
        ((404, {"content-type": "text/plain"}, b"gone"), 404, "upstream-status-404"),
        (UpstreamTimeout("read-timeout"), 504, "read-timeout"),
        (UpstreamError("connect-failed"), 502, "connect-failed"),
        ((200, {"content-type": "text/html"}, b"<html>"), 502, "content-type-not-allowed"),
    ],
)
async def test_upstream_errors_are_short_lived_json(rig: Rig, answer: Any, status: int, reason: str) -> None:
    rig.fetch.answers[URL] = answer
    response = await rig.client.get(rig.sign())
    assert response.status_code == status
    assert response.json()["reason"].startswith(reason.split("-not-")[0])
    assert response.headers["cache-control"] == "public, max-age=10"
    assert response.headers["vary"] == "Accept"
    assert await rig.metric(f'moxy_requests_total{{cache="MISS",status="{status}"}} 1.0')


async def test_a_fault_of_moxys_own_code_is_a_json_500(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    class Broken(Proxy):
        async def handle(self, request: ProxyRequest) -> Any:
            raise ZeroDivisionError("a bug")

    broken = object.__new__(Broken)
    app = routes.router(replace(rig.components, proxy=broken))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        response = await client.get(rig.sign())
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 500
    assert response.json() == {"error": "MoxyError", "reason": INTERNAL_ERROR}
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    assert "moxy_internal_errors_total 1.0" in metrics
    logged = capsys.readouterr().err
    assert '"event":"internal-error"' in logged and "ZeroDivisionError" in logged


async def test_access_lines_name_the_client(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    logging = replace(rig.components, settings=rig.components.settings.model_copy(update={"access_log": True}))
    rig.fetch.answers[URL] = png()
    app = routes.router(logging)
    transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        assert (await client.get(rig.sign())).status_code == 200
        assert (await client.delete(rig.sign())).status_code == 405
    lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines() if '"method"' in line]
    assert [(line["status"], line["client"]) for line in lines] == [(200, "192.0.2.7"), (405, "192.0.2.7")]


# -- purge -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN, f"Bearer{TOKEN}"])
async def test_purge_needs_the_token(rig: Rig, authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization is not None else {}
    response = await rig.client.post("/purge", content=orjson.dumps({"url": URL}), headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"link": "x"}', b'{"url": 5}'])
async def test_purge_needs_a_url_in_its_body(rig: Rig, body: bytes) -> None:
    response = await rig.client.post("/purge", content=body, headers={"authorization": f"bearer {TOKEN}"})
    assert response.status_code == 400
    assert response.json()["error"] == "BadRequest"


async def test_purge_refuses_a_body_past_its_bound_before_reading_it_whole(rig: Rig) -> None:
    body = b'{"url": "' + b"x" * (routes.MAX_PURGE_BODY_BYTES + 1) + b'"}'
    response = await rig.client.post("/purge", content=body, headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 413
    assert response.json()["error"] == "PayloadTooLarge"
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_purge_removes_the_entry(rig: Rig) -> None:
    rig.fetch.answers[URL] = png()
    url = rig.sign()
    assert (await rig.client.get(url)).headers["x-moxy-cache"] == "MISS"
    rig.clock.now += 1
    purged = await rig.client.post(
        "/purge",
        content=orjson.dumps({"url": url}),
        # httpx sent Accept: */*, so the entry is that variant; this names it for deletion at once.
        headers={"authorization": f"Bearer {TOKEN}", "x-moxy-purge-accept": "*/*"},
    )
    assert purged.status_code == 200
    assert purged.json() == {"removed": 1, "surrogate_key": hashlib.sha256(URL.encode()).hexdigest()[:24]}
    rig.clock.now += 1
    assert (await rig.client.get(url)).headers["x-moxy-cache"] == "MISS"
    assert len(rig.fetch.calls) == 2


async def test_purge_counts_every_accept_variant(rig: Rig) -> None:
    status, headers, body = png()
    rig.fetch.answers[URL] = status, {**headers, "vary": "Accept"}, body
    url = rig.sign()
    browsers = [
        "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8",  # Chromium
        "image/webp,*/*",  # an older Firefox
        "*/*",  # curl
    ]
    for accept in browsers:
        assert (await rig.client.get(url, headers={"accept": accept})).headers["x-moxy-cache"] == "MISS"
    rig.clock.now += 1
    purged = await rig.client.post(
        "/purge", content=orjson.dumps({"url": url}), headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert purged.json()["removed"] == 3, "every variant gone, and counted"
    rig.clock.now += 1
    for accept in browsers:
        assert (await rig.client.get(url, headers={"accept": accept})).headers["x-moxy-cache"] == "MISS"


async def test_without_a_token_there_is_no_purge_endpoint(rig: Rig) -> None:
    settings = rig.components.settings.model_copy(update={"purge_token": None})
    app = routes.router(replace(rig.components, settings=settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        response = await client.post("/purge", content=b'{"url": "x"}', headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 405  # the proxy route's path, which takes GET and HEAD only


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
async def test_other_methods_get_a_json_405_like_every_other_error(rig: Rig, method: str) -> None:
    response = await rig.client.request(method, rig.sign())
    assert response.status_code == 405
    assert response.json() == {"error": "MethodNotAllowed", "reason": "Moxy answers GET and HEAD"}
    assert response.headers["allow"] == "GET, HEAD"
    assert response.headers["cache-control"] == "no-store"
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value
    assert await rig.metric('moxy_requests_total{cache="BYPASS",status="405"} 1.0')
    assert rig.fetch.calls == []


# -- health, readiness, metrics --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_operational_answers_carry_the_security_headers(rig: Rig, path: str) -> None:
    response = await rig.client.get(path)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value


async def test_healthz(rig: Rig) -> None:
    response = await rig.client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert response.headers["cache-control"] == "no-store"


async def test_readyz_while_starting() -> None:
    app = Starlette(routes=routes.waiting())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        ready = await client.get("/readyz")
        alive = await client.get("/healthz")
    assert (ready.status_code, ready.json()) == (503, {"status": "starting"})
    assert alive.status_code == 200


async def test_readyz_when_ready_and_when_degraded(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    ready = await rig.client.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready", "degraded": []})
    disk = rig.components.tiers.disk
    assert disk is not None

    async def unwritable() -> bool:
        return False

    monkeypatch.setattr(disk, "probe", unwritable)
    degraded = await rig.client.get("/readyz")
    assert (degraded.status_code, degraded.json()) == (200, {"status": "ready", "degraded": ["cache-dir"]})


async def test_metrics_page(rig: Rig) -> None:
    rig.fetch.answers[URL] = png()
    await rig.client.get(rig.sign())
    page = await rig.client.get("/metrics")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert page.headers["cache-control"] == "no-store"
    assert "moxy_memory_cache_items 1.0" in page.text  # the tier gauges are fresh on every scrape
    assert "moxy_upstream_duration_seconds_count 1.0" in page.text

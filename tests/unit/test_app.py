"""The ASGI shell in process (httpx's ASGI transport, the app's own lifespan): a failure of Moxy's own code is still a
well-formed, uncacheable JSON answer with the security headers, counted in the metrics."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from moxy.app import create_app
from moxy.config import Settings
from moxy.proxy import Proxy
from moxy.signing import Signer
from moxy.telemetry import INTERNAL_ERROR
from tests.assets import KEY

pytestmark = pytest.mark.anyio


async def test_a_bug_in_the_flow_is_a_json_500_with_the_security_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken(self: Proxy, request: object) -> object:
        raise OverflowError("a bug")

    monkeypatch.setattr(Proxy, "handle", broken)
    settings = Settings(key=SecretStr(KEY), cache_dir=tmp_path / "cache", base_url="http://testserver")
    url = Signer([KEY], "http://testserver").sign("https://images.example/cat.png")
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.router.lifespan_context(app.router), httpx.AsyncClient(transport=transport) as client:
        response = await client.get(url)
        metrics = (await client.get("http://testserver/metrics")).text
    assert response.status_code == 500
    assert response.json() == {"error": "MoxyError", "reason": INTERNAL_ERROR}
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "deny"
    assert "moxy_internal_errors_total 1.0" in metrics
    assert 'moxy_requests_total{cache="BYPASS",status="500"} 1.0' in metrics
    logged = capsys.readouterr().err
    assert '"event":"internal-error"' in logged and "OverflowError" in logged
    assert '"status":500' in logged  # the access log has it too


@pytest.mark.parametrize(
    ("memory_bytes", "max_entry", "body_size", "promoted"),
    [
        (64 * 1024 * 1024, 2 * 1024 * 1024, 900 * 1024, True),  # the memory tier keeps it: read whole, moved up
        (64 * 1024 * 1024, 512 * 1024, 900 * 1024, False),  # too large for it: sent from its file
        (0, 2 * 1024 * 1024, 900 * 1024, False),  # no memory tier
    ],
)
async def test_a_disk_hit_the_memory_tier_would_keep_is_moved_up(
    tmp_path: Path, memory_bytes: int, max_entry: int, body_size: int, promoted: bool
) -> None:
    from moxy.app import Plan, open_components
    from moxy.cache import BodyFile
    from tests.entries import make_entry

    settings = Settings(
        key=SecretStr(KEY),
        cache_dir=tmp_path / "cache",
        memory_cache_bytes=memory_bytes,
        memory_max_entry_bytes=max_entry,
    )
    components = await open_components(Plan.of(settings))
    try:
        tiers = components.tiers
        assert tiers.disk is not None
        stored = make_entry("https://images.example/big.png", b"\x89PNG" + bytes(body_size), lifetime=600.0)
        await tiers.disk.put(stored)  # on disk only, as after a restart or when another worker fetched it
        found = await tiers.storage.get(stored.key)
        assert found is not None
        assert isinstance(found.body, bytes) is promoted
        assert isinstance(found.body, BodyFile) is not promoted
        if tiers.memory is not None:
            assert (await tiers.memory.get(stored.key) is not None) is promoted
    finally:
        await components.proxy.aclose()
        await components.upstream.aclose()
        await components.tiers.storage.aclose()


async def test_with_an_origin_secret_only_the_cdn_gets_answers(tmp_path: Path) -> None:
    secret = "origin-secret-0123456789"
    settings = Settings(
        key=SecretStr(KEY), cache_dir=tmp_path / "cache", base_url="http://testserver", origin_secret=SecretStr(secret)
    )
    url = Signer([KEY], "http://testserver").sign("https://images.example/cat.png")
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.router.lifespan_context(app.router), httpx.AsyncClient(transport=transport) as client:
        around = await client.get(url)  # straight to the origin, around the CDN
        wrong = await client.get("http://testserver/metrics", headers={"x-moxy-origin-secret": "guess"})
        head = await client.head(url)
        through = await client.get("http://testserver/metrics", headers={"x-moxy-origin-secret": secret})
        probes = [(await client.get(f"http://testserver{path}")).status_code for path in ("/healthz", "/readyz")]
    for refused in (around, wrong):
        assert refused.status_code == 403
        assert refused.json()["error"] == "Forbidden"
        assert refused.headers["cache-control"] == "no-store"
        assert refused.headers["x-content-type-options"] == "nosniff"
    assert head.status_code == 403 and head.content == b""
    assert through.status_code == 200 and 'moxy_requests_total{cache="BYPASS",status="403"} 3.0' in through.text
    assert probes == [200, 200]

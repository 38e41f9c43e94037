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

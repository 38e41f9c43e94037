"""The admin listener's side of the app (MOXY_ADMIN_PORT): requests moxy.server marks as the admin listener's get
/metrics, /purge and the probes and nothing else; on the main listener /metrics and /purge then do not exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from moxy.app import create_app
from moxy.config import Settings
from moxy.routes import ADMIN_LISTENER
from moxy.signing import Signer
from tests.assets import KEY

pytestmark = pytest.mark.anyio
TOKEN = "purge-token-0123456789"
BASE = "http://testserver"


def on_admin_listener(app: Any) -> Any:
    """`app` as it is reached through the admin listener: the scope carries the mark moxy.server sets."""

    async def marked(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), ADMIN_LISTENER: {}}}
        await app(scope, receive, send)

    return marked


@pytest.mark.parametrize("admin_port", [None, 9091])
async def test_metrics_and_purge_answer_on_one_listener_only(tmp_path: Path, admin_port: int | None) -> None:
    settings = Settings(
        key=SecretStr(KEY),
        cache_dir=tmp_path / "cache",
        base_url=BASE,
        purge_token=SecretStr(TOKEN),
        admin_port=admin_port,
        access_log=False,
    )
    app = create_app(settings)
    signed = Signer([KEY], BASE).sign("https://images.example/cat.png").removeprefix(BASE)
    purge = {"json": {"url": "https://images.example/cat.png"}, "headers": {"authorization": f"Bearer {TOKEN}"}}
    main = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)
    admin = httpx.AsyncClient(transport=httpx.ASGITransport(app=on_admin_listener(app)), base_url=BASE)
    async with app.router.router.lifespan_context(app.router), main, admin:
        main_metrics = await main.get("/metrics")
        main_purge = await main.post("/purge", **purge)  # type: ignore[arg-type]
        main_probes = [(await main.get(path)).status_code for path in ("/healthz", "/readyz")]
        if admin_port is None:
            assert (main_metrics.status_code, main_purge.status_code) == (200, 200)
        else:
            assert (main_metrics.status_code, main_purge.status_code) == (404, 404)
            assert main_purge.json() == {"error": "NotFound", "reason": "no such endpoint"}
            assert main_metrics.headers["cache-control"] == "no-store"
            assert (await main.head("/metrics")).status_code == 404
            assert (await admin.get("/metrics")).status_code == 200
            assert (await admin.post("/purge", **purge)).json()["removed"] == 0  # type: ignore[arg-type]
            assert [(await admin.get(path)).status_code for path in ("/healthz", "/readyz")] == [200, 200]
            # No proxy route and no other endpoint there: 404, also for a method an endpoint does not take.
            # A trailing slash is another path, not a redirect (whose Location would come from the Host header).
            trailing = [("POST", "/purge/"), ("GET", "/metrics/"), ("GET", "/healthz/")]
            for method, path in [("GET", signed), ("GET", "/"), ("GET", "/purge"), ("POST", "/metrics"), *trailing]:
                answer = await admin.request(method, path)
                assert answer.status_code == 404, (method, path)
                assert answer.headers["cache-control"] == "no-store"
        assert main_probes == [200, 200]

"""The CORS layer (moxy.cors) around a small ASGI app: which answers carry which fields, and preflights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from moxy.cors import Cors

pytestmark = pytest.mark.anyio

PAGE = "https://www.example.com"


async def _inner(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"content-type", b"font/woff2"), (b"access-control-allow-origin", b"https://upstream.example")]
    if scope["path"] == "/varies":
        headers.append((b"vary", b"Accept"))
    status = 405 if scope["method"] not in ("GET", "HEAD") else 200
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else b"wOF2"})


def _client(origins: Sequence[str]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=Cors(_inner, origins)), base_url="http://moxy.test")


async def test_any_origin_is_the_same_answer_for_every_page() -> None:
    async with _client(["*"]) as client:
        for headers in ({"origin": PAGE}, {"origin": "https://other.example"}, {}):
            answer = await client.get("/font", headers=headers)
            assert answer.headers.get_list("access-control-allow-origin") == ["*"]
            assert answer.headers["timing-allow-origin"] == "*"
            assert "X-Moxy-Cache" in answer.headers["access-control-expose-headers"]
            assert "vary" not in answer.headers, "the answer does not depend on Origin"


async def test_a_list_names_the_page_and_varies_on_origin() -> None:
    async with _client([PAGE, "http://localhost:3000"]) as client:
        allowed = await client.get("/font", headers={"origin": "HTTPS://WWW.EXAMPLE.COM"})
        assert allowed.headers.get_list("access-control-allow-origin") == ["HTTPS://WWW.EXAMPLE.COM"]
        assert allowed.headers["vary"] == "Origin"
        other = await client.get("/font", headers={"origin": "https://evil.example"})
        # The upstream's own field is dropped too: only Moxy's configuration decides who may read.
        assert "access-control-allow-origin" not in other.headers
        assert other.headers["vary"] == "Origin", "a CDN must not hand this answer to an allowed page"
        none = await client.get("/font")
        assert "access-control-allow-origin" not in none.headers and none.headers["vary"] == "Origin"
        varies = await client.get("/varies", headers={"origin": PAGE})
        assert varies.headers["vary"] == "Accept, Origin"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/purge"])
async def test_operational_endpoints_say_nothing(path: str) -> None:
    async with _client(["*"]) as client:
        answer = await client.get(path, headers={"origin": PAGE})
        assert answer.headers["access-control-allow-origin"] == "https://upstream.example", "left as the app said"


async def test_preflights_for_get_and_head_from_an_allowed_page() -> None:
    async with _client([PAGE]) as client:
        asked = {
            "origin": PAGE,
            "access-control-request-method": "GET",
            "access-control-request-headers": "Range, if-none-match",
        }
        answer = await client.options("/font", headers=asked)
        assert answer.status_code == 204 and answer.content == b""
        assert answer.headers["access-control-allow-origin"] == PAGE
        assert answer.headers["access-control-allow-methods"] == "GET, HEAD"
        assert answer.headers["access-control-allow-headers"] == "range, if-none-match"
        assert int(answer.headers["access-control-max-age"]) > 0
        # Refused preflights go on to the app, which has no OPTIONS: no CORS fields, so the browser refuses.
        for refused in (
            {**asked, "origin": "https://evil.example"},
            {**asked, "access-control-request-method": "POST"},
            {**asked, "access-control-request-headers": "x-custom"},
        ):
            answer = await client.options("/font", headers=refused)
            assert answer.status_code == 405 and "access-control-allow-methods" not in answer.headers


async def test_other_methods_are_left_alone() -> None:
    async with _client(["*"]) as client:
        answer = await client.post("/font", headers={"origin": PAGE})
        assert answer.status_code == 405
        assert answer.headers["access-control-allow-origin"] == "https://upstream.example"

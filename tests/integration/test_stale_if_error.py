"""The founding story end to end: a bad upstream answer never replaces the good copy."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import httpx
import orjson
import pytest

from tests.assets import PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = pytest.mark.integration
StartMoxy = Callable[..., MoxyServer]
NEGATIVE_TTL = 1

WORDPRESS_ERROR = {
    "code": "rest_no_route",
    "message": "No route was found matching the URL and request method.",
    "data": {"status": 404},
}


def _story(origin: Origin, moxy: MoxyServer, path: str, good: Reply, bad: Reply, healed: Reply) -> None:
    origin.route(path, good)
    first = moxy.get(origin.url(path))
    assert first.status_code == 200 and first.headers["x-moxy-cache"] == "MISS"
    assert moxy.get(origin.url(path)).headers["x-moxy-cache"] == "HIT"
    origin.route(path, bad)
    # Stale for sure: Date has whole seconds, so a copy can be up to ~1 s old when stored, never fresh past 2 s.
    time.sleep(2.1)
    started = time.monotonic()
    with httpx.Client(timeout=30) as client:
        for _ in range(100):
            answer = client.get(moxy.sign(origin.url(path)))
            assert answer.status_code == 200, answer.text
            assert answer.content == first.content
            assert answer.headers["x-moxy-cache"] == "STALE"
            time.sleep(0.01)
    elapsed = time.monotonic() - started
    # The negative cache keeps the broken upstream from being hammered: one try per MOXY_NEGATIVE_TTL (1 s) at
    # most, however long a loaded machine takes over the 100 requests; a handful, not 100.
    bad_hits = origin.hits(path) - 1
    assert 1 <= bad_hits <= math.floor(elapsed / NEGATIVE_TTL) + 1, (bad_hits, elapsed)
    assert bad_hits <= 10, bad_hits
    origin.route(path, healed)
    time.sleep(1.1)  # past MOXY_NEGATIVE_TTL
    answer = moxy.get(origin.url(path))
    assert answer.status_code == 200
    assert answer.content == healed.body
    assert answer.headers["x-moxy-cache"] == "MISS"


def test_json_that_turns_into_a_wordpress_error(origin: Origin, start_moxy: StartMoxy) -> None:
    moxy = start_moxy(ttl_min=0, stale_while_revalidate=0, negative_ttl=NEGATIVE_TTL)
    cc = {"Cache-Control": "max-age=2"}
    _story(
        origin,
        moxy,
        "/wp-json/feed",
        good=Reply.json({"items": [1, 2, 3]}, headers=cc),
        bad=Reply.json(WORDPRESS_ERROR, headers=cc),
        healed=Reply.json({"items": [4, 5]}, headers=cc),
    )


def test_image_that_turns_into_an_html_error_page(origin: Origin, start_moxy: StartMoxy) -> None:
    moxy = start_moxy(ttl_min=0, stale_while_revalidate=0, negative_ttl=NEGATIVE_TTL)
    headers = {"Content-Type": "image/png", "Cache-Control": "max-age=2"}
    _story(
        origin,
        moxy,
        "/logo.png",
        good=Reply(headers=headers, body=PNG),
        bad=Reply(headers=headers, body=b"<!DOCTYPE html><html><body>Database error</body></html>"),
        healed=Reply(headers=headers, body=PNG + b"v2"),
    )


def test_no_good_copy_gives_502_and_is_not_hammered(origin: Origin, start_moxy: StartMoxy) -> None:
    origin.route("/broken", Reply.json({"success": False, "data": "boom"}))
    moxy = start_moxy(negative_ttl=30)
    for _ in range(20):
        answer = moxy.get(origin.url("/broken"))
        assert answer.status_code == 502
        assert answer.json()["reason"] == "json-error-envelope"
        assert answer.headers["cache-control"] == "public, max-age=10"
    assert origin.hits("/broken") == 1


def test_upstream_404_passes_through(origin: Origin, start_moxy: StartMoxy) -> None:
    moxy = start_moxy()
    answer = moxy.get(origin.url("/missing.png"))
    assert answer.status_code == 404
    assert orjson.loads(answer.content)["error"] == "UpstreamError"

"""Upstream answers with a content coding: the wire's Content-Length counts coded bytes, so it is never held
against the decoded body (which validation checks for completeness)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.assets import PNG
from tests.integration import engines
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("upstream_engine")]
upstream_engine = engines.upstream_engine  # once per engine: the module proves the wire


@pytest.mark.parametrize("content_type, body", [("image/png", PNG), ("application/json", b'{"items": [1, 2, 3]}')])
def test_gzipped_answer_with_its_wire_length_is_served_whole(
    origin: Origin, start_moxy: Callable[..., MoxyServer], content_type: str, body: bytes
) -> None:
    moxy = start_moxy()
    origin.route("/asset", Reply.gzipped(body, headers={"Content-Type": content_type, "Cache-Control": "max-age=60"}))
    for expected in ("MISS", "HIT"):
        response = moxy.get(origin.url("/asset"))
        assert response.status_code == 200, response.text
        assert response.content == body
        assert response.headers["x-moxy-cache"] == expected
    assert origin.hits("/asset") == 1

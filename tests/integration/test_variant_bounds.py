"""A client cannot multiply upstream fetches or cached variants by varying Accept, nor grow Moxy's memory of
failures by it: Accept is reduced to a few classes before it is forwarded and keyed."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from moxy.cache.vary import ACCEPT_CLASSES
from tests.assets import PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = pytest.mark.integration


def test_distinct_accept_strings_make_a_few_variants(origin: Origin, start_moxy: Callable[..., MoxyServer]) -> None:
    moxy = start_moxy()
    origin.route("/pic.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=PNG))
    origin.route("/down.png", Reply(status=500, body=b"down"))
    good, down = moxy.sign(origin.url("/pic.png")), moxy.sign(origin.url("/down.png"))
    with httpx.Client(timeout=30) as client:
        for number in range(600):
            accept = f"image/x-{number}, image/webp;q=0.{number % 10}, */*;q=0.1"
            answer = client.get(good, headers={"Accept": accept})
            assert answer.status_code == 200 and answer.content == PNG
            assert client.get(down, headers={"Accept": accept}).status_code == 502
    # Two classes appear above (webp with q=0 and without); never more than there are classes.
    assert origin.hits("/pic.png") <= 2
    assert origin.hits("/down.png") <= 2, "each failure remembered per class, not per string"
    assert {request.headers.get("accept") for request in origin.requests} <= set(ACCEPT_CLASSES)

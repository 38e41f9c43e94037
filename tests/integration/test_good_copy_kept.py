"""Answers that look like success but are not the resource never replace a good copy (found by an attack run on a
build that had every other hardening fix): statuses that carry no representation, error reports in JSON shapes
beyond the classic envelopes, and an answer of another kind than the copy it would replace."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4
FEED = json.dumps({"posts": [{"id": 1, "title": "hello"}]}).encode()
FRESH_FOR_AN_HOUR = {"Cache-Control": "max-age=3600"}


def _json(document: object, content_type: str = "application/json") -> Reply:
    return Reply(headers={"Content-Type": content_type, **FRESH_FOR_AN_HOUR}, body=json.dumps(document).encode())


BAD_ANSWERS: dict[str, tuple[bytes, str, Reply]] = {
    "png-then-204": (PNG, "image/png", Reply(status=204, headers=FRESH_FOR_AN_HOUR)),
    "png-then-204-typed": (PNG, "image/png", Reply(status=204, headers={"Content-Type": "image/png"})),
    "png-then-202": (PNG, "image/png", Reply(status=202, headers={"Content-Type": "image/png"}, body=PNG[:10])),
    "png-then-json": (PNG, "image/png", _json({"id": 1})),
    "feed-then-problem": (
        FEED,
        "application/json",
        _json({"title": "Error", "status": 500}, "application/problem+json"),
    ),
    "feed-then-string-status": (
        FEED,
        "application/json",
        _json({"code": "x", "message": "y", "data": {"status": "500"}}),
    ),
    "feed-then-status-message": (FEED, "application/json", _json({"status": 500, "message": "db down"})),
    "feed-then-capital-error": (FEED, "application/json", _json({"Error": "x"})),
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_a_bad_answer_does_not_replace_the_good_copy(
    origin: Origin, start_moxy: Callable[..., MoxyServer], case: str
) -> None:
    good, content_type, bad = BAD_ANSWERS[case]
    # TTL_MIN=0 and max-age=0: the good copy is stale at once, so the bad answer is the one that would replace it.
    moxy = start_moxy(ttl_min=0)
    origin.route("/asset", Reply(headers={"Content-Type": content_type, "Cache-Control": "max-age=0"}, body=good))
    first = moxy.get(origin.url("/asset"))
    assert first.status_code == 200 and first.content == good
    origin.route("/asset", bad)
    for _ in range(3):  # and again: nothing bad was stored in between
        answer = moxy.get(origin.url("/asset"))
        assert answer.status_code == 200, answer.text
        assert answer.content == good
        assert answer.headers["x-moxy-cache"] == "STALE"
        assert answer.headers["content-type"].startswith(content_type)

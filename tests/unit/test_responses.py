"""moxy.responses: conditional requests (304), byte ranges (206/416), If-Range and the headers of a served entry.

A request header Moxy cannot read is ignored (the whole 200), never a 500. The last test drives the real app (its
lifespan included) through httpx's ASGI transport against a local origin, so the same holds for a whole request."""

from __future__ import annotations

from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import httpx
import orjson
import pytest
from pydantic import SecretStr
from starlette.requests import Request

from moxy.app import create_app
from moxy.config import Settings
from moxy.proxy import CacheResult, Served
from moxy.responses import error_response, parse_range, render
from moxy.signing import Signer
from tests.entries import make_entry
from tests.integration.origin import Origin, Reply

BODY = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
UPSTREAM_MODIFIED = "Tue, 03 Jun 2025 10:00:00 GMT"  # 1748944800
UPSTREAM_DATE = "Tue, 03 Jun 2025 12:00:00 GMT"
STORED_AT = 1748952000.5  # just after UPSTREAM_DATE
# The fault: a year no datetime can hold made the old date parser raise OverflowError, and the server answer 500.
OVERFLOWING_DATE = "Mon, 01 Jan 99999999999 00:00:00 GMT"
KEY = "responses-test-key-0123456789abcdef"


def _request(method: str = "GET", **headers: str) -> Request:
    raw = [
        (name.replace("_", "-").lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
    ]
    return Request({"type": "http", "method": method, "path": "/", "query_string": b"", "headers": raw})


def _served(*, last_modified: str | None = UPSTREAM_MODIFIED, reason: str | None = None) -> Served:
    headers = [("content-type", "image/png"), ("date", UPSTREAM_DATE)]
    if last_modified is not None:
        headers.append(("last-modified", last_modified))
    entry = make_entry(body=BODY, headers=tuple(headers), stored_at=STORED_AT)
    return Served(entry, BODY, CacheResult.HIT, age=5.0, reason=reason)


def _etag(served: Served) -> str:
    return f'"{served.entry.digest[:32]}"'


# -- If-Modified-Since and If-None-Match -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "since",
    [
        OVERFLOWING_DATE,
        "Mon, 01 Jan 10000 00:00:00 GMT",
        "Mon, 31 Feb 2025 00:00:00 GMT",
        "Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT",
        "not a date",
        "",
        "-1",
        "9" * 5000,
    ],
)
def test_unreadable_if_modified_since_is_ignored(since: str) -> None:
    # RFC 9110 §13.1.3: an If-Modified-Since that is not a valid HTTP-date is ignored: the full answer.
    response = render(_request(if_modified_since=since), _served())
    assert response.status_code == 200
    assert response.body == BODY


@pytest.mark.parametrize(
    ("since", "status"),
    [
        (UPSTREAM_MODIFIED, 304),
        ("Wed, 04 Jun 2025 00:00:00 GMT", 304),
        ("Tuesday, 03-Jun-25 10:00:00 GMT", 304),  # the obsolete forms are read too (RFC 9110 §5.6.7)
        ("Tue Jun  3 10:00:00 2025", 304),
        ("Tue, 03 Jun 2025 09:59:59 GMT", 200),
    ],
)
def test_if_modified_since(since: str, status: int) -> None:
    assert render(_request(if_modified_since=since), _served()).status_code == status


def test_if_modified_since_against_moxys_own_last_modified() -> None:
    served = _served(last_modified=None)
    sent = render(_request(), served).headers["last-modified"]
    assert sent == formatdate(STORED_AT, usegmt=True)
    assert render(_request(if_modified_since=sent), served).status_code == 304


@pytest.mark.parametrize(
    ("upstream", "sent"),
    [
        (UPSTREAM_MODIFIED, UPSTREAM_MODIFIED),
        ("Tuesday, 03-Jun-25 10:00:00 GMT", UPSTREAM_MODIFIED),  # RFC 9110 §5.6.7: senders use IMF-fixdate
        ("yesterday", formatdate(STORED_AT, usegmt=True)),  # unreadable: Moxy's own date instead
        (OVERFLOWING_DATE, formatdate(STORED_AT, usegmt=True)),
        ("Fri, 01 Jan 2100 00:00:00 GMT", formatdate(STORED_AT, usegmt=True)),  # §8.8.2.1: never in the future
    ],
)
def test_last_modified_sent_is_always_a_valid_past_date(upstream: str, sent: str) -> None:
    assert render(_request(), _served(last_modified=upstream)).headers["last-modified"] == sent


def test_if_none_match_decides_before_if_modified_since() -> None:
    served = _served()
    etag = _etag(served)
    for value in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        assert render(_request(if_none_match=value), served).status_code == 304, value
    # RFC 9110 §13.2.2: when If-None-Match is present, If-Modified-Since is not looked at.
    for value in ('"other"', "junk", "", ",,,"):
        response = render(_request(if_none_match=value, if_modified_since=UPSTREAM_MODIFIED), served)
        assert response.status_code == 200, value


# -- Range and If-Range ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "choice"),
    [
        (None, None),
        ("bytes=0-9", (0, 9)),
        ("BYTES=0-9", (0, 9)),  # RFC 9110 §14.1: the unit is case-insensitive
        ("bytes=10-", (10, 99)),
        ("bytes=-5", (95, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes=5-1000", (5, 99)),
        ("bytes=0-" + "9" * 5000, (0, 99)),  # past int()'s 4300-digit limit: read as "beyond the end"
        ("bytes=-" + "9" * 5000, (0, 99)),
        ("bytes=0000000000000000000000000007-8", (7, 8)),
        ("bytes=100-", "unsatisfiable"),
        ("bytes=" + "9" * 5000 + "-", "unsatisfiable"),
        ("bytes=-0", "unsatisfiable"),
        ("bytes=5-2", None),
        ("bytes=0-1,5-9", None),
        ("bytes=" + ",".join(["0-1"] * 1000), None),
        ("bytes=-", None),
        ("bytes=--5", None),
        ("bytes=-5-3", None),
        ("bytes=+1-2", None),
        ("bytes=1_0-20", None),
        ("bytes=\u0661-2", None),  # ARABIC-INDIC DIGIT ONE: int() reads it, HTTP does not
        ("bytes=0 - 9", None),
        ("bytes=0-9\x00", None),
        ("items=0-9", None),
        ("bytes 0-9", None),
    ],
)
def test_parse_range(value: str | None, choice: object) -> None:
    assert parse_range(value, 100) == choice


def test_every_range_of_an_empty_body_is_unsatisfiable() -> None:
    assert parse_range("bytes=0-", 0) == "unsatisfiable"
    assert parse_range("bytes=-5", 0) == "unsatisfiable"


def test_range_answers() -> None:
    served = _served()
    partial = render(_request(range="bytes=2-5"), served)
    assert (partial.status_code, partial.body) == (206, BODY[2:6])
    assert partial.headers["content-range"] == f"bytes 2-5/{len(BODY)}"
    assert partial.headers["content-length"] == "4"
    unsatisfiable = render(_request(range=f"bytes={len(BODY)}-"), served)
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["content-range"] == f"bytes */{len(BODY)}"
    malformed = render(_request(range="bytes=oops"), served)
    assert (malformed.status_code, malformed.body) == (200, BODY)
    head = render(_request("HEAD", range="bytes=2-5"), served)  # RFC 9110 §14.2: GET only
    assert (head.status_code, head.headers["content-length"]) == (200, str(len(BODY)))


@pytest.mark.parametrize(
    ("if_range", "last_modified", "status"),
    [
        ("ETAG", UPSTREAM_MODIFIED, 206),
        ("W/ETAG", UPSTREAM_MODIFIED, 200),  # RFC 9110 §13.1.5: strong comparison only
        ('"other"', UPSTREAM_MODIFIED, 200),
        (UPSTREAM_MODIFIED, UPSTREAM_MODIFIED, 206),  # a strong date: two hours older than the upstream's Date
        ("Tue, 03 Jun 2025 10:00:01 GMT", UPSTREAM_MODIFIED, 200),  # a date must match exactly
        (UPSTREAM_DATE, UPSTREAM_DATE, 200),  # Last-Modified equal to Date is a weak validator (§8.8.2.2)
        ("MOXY", None, 200),  # Moxy's own date is never strong
        (OVERFLOWING_DATE, UPSTREAM_MODIFIED, 200),
        ("", UPSTREAM_MODIFIED, 200),
        ("\x01junk", UPSTREAM_MODIFIED, 200),
    ],
)
def test_if_range(if_range: str, last_modified: str | None, status: int) -> None:
    served = _served(last_modified=last_modified)
    value = if_range.replace("ETAG", _etag(served)).replace("MOXY", formatdate(STORED_AT, usegmt=True))
    response = render(_request(range="bytes=0-3", if_range=value), served)
    assert response.status_code == status
    assert response.body == (BODY[:4] if status == 206 else BODY)


# -- Cache-Status detail ---------------------------------------------------------------------------------------------


def test_cache_status_detail_is_a_well_formed_string() -> None:
    # RFC 9211 §2.8 / RFC 8941 §3.3.3: a quote or backslash in the reason is escaped, anything unprintable dropped.
    served = _served(reason='custom:a"b\\c\r\nd')
    cache_status = render(_request(), served).headers["cache-status"]
    assert cache_status.endswith('; detail="custom:a\\"b\\\\cd"')


def test_error_cache_status_detail_is_a_well_formed_string() -> None:
    from moxy.errors import UpstreamError

    response = error_response(UpstreamError('bad "thing"\n'), cache="MISS")
    assert response.headers["cache-status"] == 'moxy; fwd=uri-miss; detail="bad \\"thing\\""'


@pytest.mark.parametrize(
    "reason", ["host intranet.example resolves to a private address", "denied host", "loopback address"]
)
def test_a_refused_destination_tells_the_client_nothing_about_why(reason: str) -> None:
    # An internal DNS oracle otherwise: which check refused says how a name resolves inside the network.
    from moxy.errors import DestinationRefused

    response = error_response(DestinationRefused(reason), cache="BYPASS")
    assert response.status_code == 403
    assert orjson.loads(response.body) == {"error": "DestinationRefused", "reason": "destination not allowed"}
    assert response.headers["cache-control"] == "no-store"
    assert "vary" not in response.headers


def test_upstream_errors_name_the_variant_they_were_fetched_for() -> None:
    # A CDN keeps these briefly; the upstream answered one forwarded Accept, so the edge must key on it too.
    from moxy.errors import BadSignature, UpstreamError, UpstreamTimeout

    for error in (
        UpstreamError("upstream-status-500"),
        UpstreamTimeout("read-timeout"),
        UpstreamError("x", status=404),
    ):
        response = error_response(error, cache="MISS", vary="Accept")
        assert response.headers["vary"] == "Accept"
        assert response.headers["cache-control"] == "public, max-age=10"
    assert "vary" not in error_response(BadSignature("bad"), cache="BYPASS", vary="Accept").headers


def test_a_head_error_says_the_length_the_get_would_have() -> None:
    from moxy.errors import BadSignature, UpstreamError

    for error in (BadSignature("bad"), UpstreamError("upstream-status-500")):
        get = error_response(error, cache="MISS")
        head = error_response(error, cache="MISS", head=True)
        assert head.body == b"" and get.body
        assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.body))
        assert dict(head.headers) == dict(get.headers)


# -- on the wire -----------------------------------------------------------------------------------------------------


@pytest.fixture
def origin() -> Iterator[Origin]:
    with Origin() as running:
        yield running


@pytest.mark.anyio
async def test_overflowing_if_modified_since_on_a_cached_entry_is_ignored_over_http(
    origin: Origin, tmp_path: Path
) -> None:
    origin.route("/pic.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=BODY))
    settings = Settings(
        key=SecretStr(KEY),
        base_url="http://testserver",
        cache_dir=tmp_path / "cache",
        allowed_networks=("127.0.0.0/8",),
        access_log=False,
    )
    url = Signer([KEY], "http://testserver").sign(origin.url("/pic.png"))
    app = create_app(settings)
    # Starlette's TestClient warns that its httpx backend is deprecated (an error here), so the lifespan is entered
    # directly and requests go through httpx's ASGI transport; raise_app_exceptions=False shows a crash as its 500.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.router.lifespan_context(app.router),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        miss = await client.get(url)
        assert (miss.status_code, miss.headers["x-moxy-cache"]) == (200, "MISS")
        answer = await client.get(url, headers={"If-Modified-Since": OVERFLOWING_DATE})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-moxy-cache"] == "HIT"
        assert answer.content == BODY
        # A date the entry has not changed since still gives its 304: the parser was fixed, not switched off.
        revalidated = await client.get(url, headers={"If-Modified-Since": miss.headers["last-modified"]})
        assert revalidated.status_code == 304
    assert origin.hits("/pic.png") == 1

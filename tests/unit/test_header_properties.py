"""Properties of every header parser Moxy has: any value, in any encoding, with control bytes or numbers of any size,
comes out as the parser's documented "ignore" value or a valid result, never as an exception (which the server turns
into a 500). And whatever a client puts in its request headers, `render` answers 200, 206, 304 or 416 with header
fields that can go on the wire (RFC 9110 §5.5).

Examples are derandomized and the database is off, so every run tries the same cases in a few seconds."""

from __future__ import annotations

import calendar
import math
import re
from collections.abc import Mapping
from datetime import datetime
from email.utils import formatdate

from hypothesis import HealthCheck, given, settings, strategies as st
from starlette.requests import Request

from moxy.cache.freshness import (
    DELTA_MAX,
    FreshnessRules,
    assess,
    is_storable,
    parse_cache_control,
    parse_http_date,
)
from moxy.cache.memory import MemoryStorage
from moxy.media import parse_content_type
from moxy.policy import DestinationPolicy
from moxy.proxy import CacheResult, Proxy, Served
from moxy.responses import parse_range, render
from moxy.signing import Signer
from moxy.validation import build_chain
from tests.assets import KEY
from tests.entries import make_entry
from tests.fakes.fetch import FakeFetch

PROPERTY = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEWER = settings(PROPERTY, max_examples=120)

EARLIEST = calendar.timegm((1, 1, 1, 0, 0, 0))  # Mon, 01 Jan 0001 00:00:00 GMT
LATEST = calendar.timegm((9999, 12, 31, 23, 59, 60))  # a leap second on the last day of year 9999

# RFC 9110 §5.6.2 token, and §5.5 field-value: visible or obs-text bytes, single SP/HTAB inside, none at the ends.
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")

# Pieces hostile values are made of: every kind of separator, numbers past any limit (int() refuses more than 4300
# digits), signs, non-ASCII digits int() would read, control bytes, and fragments of real syntax.
FRAGMENTS = [
    "bytes=",
    "BYTES=",
    "items=",
    "-",
    "--",
    ",",
    ";",
    "=",
    " ",
    "\t",
    "\x00",
    "\x01",
    "\x0b",
    "\x1f",
    "\x7f",
    "\r\n",
    "\xa0",
    "\xff",
    "\u0661",
    "\u00b2",
    "0",
    "1",
    "7",
    "-1",
    "+5",
    "1_0",
    "1e9",
    "nan",
    "inf",
    "9" * 19,
    "9" * 40,
    "9" * 5000,
    "0" * 5000 + "1",
    '"',
    "\\",
    "W/",
    "*",
    '"abc"',
    "max-age=",
    "s-maxage=",
    "stale-while-revalidate=",
    "stale-if-error=",
    "no-cache",
    "no-store",
    "private",
    "must-revalidate",
    "Mon, ",
    "Monday, ",
    "01 Jan ",
    "31 Feb ",
    "01-Jan-",
    "99999999999",
    "2025",
    "0000",
    " 00:00:00 GMT",
    " 24:61:61 GMT",
    "Sun, 06 Nov 1994 08:49:37 GMT",
    "Sunday, 06-Nov-94 08:49:37 GMT",
    "Sun Nov  6 08:49:37 1994",
    "image/png",
    "image/avif,image/webp,*/*;q=0.8",
    "text/html",
]

structured = st.lists(st.sampled_from(FRAGMENTS), max_size=8).map("".join)
latin1_text = st.text(st.characters(min_codepoint=0, max_codepoint=0xFF), max_size=60)
# Upstream engines decode header bytes as latin-1 or as UTF-8 with surrogateescape; both kinds of str arrive.
header_text = st.one_of(
    structured,
    latin1_text,
    st.text(max_size=30),
    st.binary(max_size=40).map(lambda raw: raw.decode("utf-8", "surrogateescape")),
)
# What an ASGI server hands over: bytes, read as latin-1 by Starlette.
header_bytes = st.one_of(
    st.binary(max_size=60),
    structured.map(lambda text: text.encode("utf-8")),
    latin1_text.map(lambda text: text.encode("latin-1")),
)


# -- HTTP-date (RFC 9110 §5.6.7) ---------------------------------------------------------------------------------------


@PROPERTY
@given(st.one_of(header_text, st.none()))
def test_parse_http_date_never_raises(value: str | None) -> None:
    parsed = parse_http_date(value)
    assert parsed is None or (isinstance(parsed, float) and EARLIEST <= parsed <= LATEST)


moments = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59))


@PROPERTY
@given(moments)
def test_parse_http_date_reads_every_form_of_every_moment(moment: datetime) -> None:
    expected = float(calendar.timegm(moment.replace(microsecond=0).timetuple()))
    imf = formatdate(expected, usegmt=True)
    asctime = moment.strftime("%a %b ") + f"{moment.day:2d} " + moment.strftime("%H:%M:%S ") + f"{moment.year:04d}"
    assert parse_http_date(imf) == expected
    assert parse_http_date(asctime) == expected
    if 1970 <= moment.year <= 2069:  # the two-digit year of RFC 850 is read as 1970-2069
        rfc850 = moment.strftime("%A, %d-%b-") + f"{moment.year % 100:02d}" + moment.strftime(" %H:%M:%S GMT")
        assert parse_http_date(rfc850) == expected


@PROPERTY
@given(moments, st.integers(0, 28), st.sampled_from(FRAGMENTS))
def test_a_damaged_date_is_none_or_a_real_moment(moment: datetime, position: int, junk: str) -> None:
    text = formatdate(calendar.timegm(moment.timetuple()), usegmt=True)
    damaged = text[:position] + junk + text[position:]
    parsed = parse_http_date(damaged)
    assert parsed is None or EARLIEST <= parsed <= LATEST
    if parsed is not None:
        # Whatever was accepted names a moment that formats back to a valid IMF-fixdate.
        assert parse_http_date(formatdate(parsed, usegmt=True)) == parsed


# -- Cache-Control, Age, Expires, Date, Last-Modified (upstream) -------------------------------------------------------

RULES = FreshnessRules(ttl_min=60, ttl_max=86400, ttl_default=3600, stale_while_revalidate=30, stale_if_error=600)
T = 1_700_000_000.0


@PROPERTY
@given(header_text)
def test_parse_cache_control_never_raises(value: str) -> None:
    directives = parse_cache_control(value)
    for name, argument in directives.items():
        assert name and name == name.lower()
        assert not any(char in name for char in ' \t=,"')
        assert argument is None or isinstance(argument, str)


freshness_headers = st.dictionaries(
    st.sampled_from(["cache-control", "date", "expires", "age", "last-modified", "vary"]), header_text, max_size=6
)


@PROPERTY
@given(freshness_headers, st.floats(0, 10_000), st.integers(100, 599))
def test_assess_and_is_storable_never_raise(headers: Mapping[str, str], delay: float, status: int) -> None:
    freshness = assess(headers, request_time=T - delay, response_time=T, rules=RULES)
    assert RULES.ttl_min <= freshness.lifetime <= RULES.ttl_max
    # The age is bounded by what the headers can claim: Age is capped at 2^31, Date can only lie so far.
    assert 0 <= freshness.age <= DELTA_MAX + delay + (T - EARLIEST)
    for window in (freshness.stale_while_revalidate, freshness.stale_if_error):
        assert math.isfinite(window) and 0 <= window <= DELTA_MAX
    assert isinstance(is_storable(status, headers), bool)


@PROPERTY
@given(st.integers(0, 10**12), st.integers(0, 5000), st.integers(0, 5000), st.sampled_from(["max-age", "s-maxage"]))
def test_any_delta_seconds_is_read_and_capped(number: int, zeros: int, scale: int, directive: str) -> None:
    # Leading zeros and trailing zeros past int()'s 4300-digit limit; the value is number * 10^scale.
    digits = "0" * zeros + str(number) + "0" * scale
    freshness = assess(
        {"cache-control": f"{directive}={digits}", "age": digits},
        request_time=T,
        response_time=T,
        rules=FreshnessRules(ttl_min=0, ttl_max=10**10, ttl_default=0, stale_while_revalidate=0, stale_if_error=0),
    )
    expected = min(number * 10**scale, DELTA_MAX)  # RFC 9111 §1.2.2: too large to represent is 2^31
    assert freshness.lifetime == expected
    assert freshness.age == expected


# -- Content-Type (upstream) and Accept (client, forwarded) ------------------------------------------------------------


@PROPERTY
@given(header_text)
def test_media_type_never_raises(value: str) -> None:
    essence, problem = parse_content_type(value)
    assert (essence == "") == bool(problem)
    assert essence == essence.lower()


FORWARDING = Proxy(
    signer=Signer([KEY], "http://moxy.test"),
    policy=DestinationPolicy(),
    storage=MemoryStorage(1 << 20, 1 << 16),
    fetch=FakeFetch(),  # no answer scripted: a fetch fails the test
    validators=build_chain(content_types=["image/*"], max_body_bytes=1 << 20),
    freshness=RULES,
)


@PROPERTY
@given(st.dictionaries(st.sampled_from(["accept", "cookie", "authorization"]), st.one_of(structured, latin1_text)))
def test_forwarded_accept_is_sendable_or_absent(headers: Mapping[str, str]) -> None:
    forwarded = FORWARDING.forwarded_headers(headers)
    assert set(forwarded) <= {"accept"}  # only the allowlist crosses; never a cookie or a credential
    for value in forwarded.values():
        assert value and FIELD_VALUE.fullmatch(value.encode("latin-1")), value


# -- Range (RFC 9110 §14.2) -----------------------------------------------------------------------------------------


@PROPERTY
@given(st.one_of(header_text, st.none()), st.integers(0, 10**6))
def test_parse_range_never_raises(value: str | None, length: int) -> None:
    choice = parse_range(value, length)
    if isinstance(choice, tuple):
        start, end = choice
        assert 0 <= start <= end < length
    else:
        assert choice in (None, "unsatisfiable")


positions = st.one_of(st.none(), st.integers(0, 300), st.integers(0, 10**40))


@PROPERTY
@given(positions, positions, st.integers(0, 200), st.sampled_from(["bytes", "Bytes"]))
def test_parse_range_agrees_with_the_rfc(first: int | None, last: int | None, length: int, unit: str) -> None:
    value = f"{unit}={'' if first is None else first}-{'' if last is None else last}"
    choice = parse_range(value, length)
    # An independent reading of RFC 9110 §14.1.1-§14.1.2 for one range-spec.
    if first is None and last is None:
        expected: object = None
    elif first is None:
        assert last is not None
        expected = "unsatisfiable" if last == 0 or length == 0 else (max(0, length - last), length - 1)
    elif last is not None and last < first:
        expected = None
    elif first >= length:
        expected = "unsatisfiable"
    else:
        expected = (first, length - 1 if last is None else min(last, length - 1))
    assert choice == expected, value


# -- render: any request headers -> 200 / 206 / 304 / 416 with sendable fields ----------------------------------------

REQUEST_HEADER_NAMES = ["range", "if-range", "if-none-match", "if-modified-since", "accept", "if-match", "x-junk"]
request_headers = st.lists(st.tuples(st.sampled_from(REQUEST_HEADER_NAMES), header_bytes), max_size=6)
stored_dates = st.one_of(
    st.none(),
    st.integers(EARLIEST, LATEST - 1).map(lambda when: formatdate(when, usegmt=True)),
    st.just("Mon, 01 Jan 99999999999 00:00:00 GMT"),
    latin1_text.filter(lambda text: FIELD_VALUE.fullmatch(text.encode("latin-1")) is not None),
)


@st.composite
def served_entries(draw: st.DrawFn) -> Served:
    body = draw(st.binary(max_size=64))
    headers = [("content-type", "image/png")]
    for name in ("last-modified", "date"):
        value = draw(stored_dates)
        if value is not None:
            headers.append((name, value))
    entry = make_entry(
        body=body,
        headers=tuple(headers),
        stored_at=draw(st.floats(0, 2**34)),
        lifetime=draw(st.floats(0, DELTA_MAX)),
        stale_while_revalidate=draw(st.floats(0, DELTA_MAX)),
        stale_if_error=draw(st.floats(0, DELTA_MAX)),
    )
    return Served(
        entry,
        body,
        draw(st.sampled_from(list(CacheResult))),
        age=draw(st.floats(0, 2 * DELTA_MAX)),
        stored=draw(st.booleans()),
        reason=draw(st.one_of(st.none(), header_text)),
    )


def _asgi_request(method: str, headers: list[tuple[str, bytes]]) -> Request:
    raw = [(name.encode("ascii"), value) for name, value in headers]
    return Request({"type": "http", "method": method, "path": "/", "query_string": b"", "headers": raw})


@FEWER
@given(served_entries(), request_headers, st.sampled_from(["GET", "HEAD"]))
def test_render_answers_every_request(served: Served, headers: list[tuple[str, bytes]], method: str) -> None:
    request = _asgi_request(method, headers)
    response = render(request, served)
    status = response.status_code
    assert status in (200, 206, 304, 416)
    for name, value in response.raw_headers:
        assert TOKEN.fullmatch(name), name
        assert FIELD_VALUE.fullmatch(value), (name, value)
    sent = dict(response.headers)
    body, length = served.body, served.entry.length
    assert isinstance(body, bytes)
    names = {name for name, _ in headers}
    if status == 304:
        assert names & {"if-none-match", "if-modified-since"}
        assert response.body == b""
    elif status == 416:
        assert method == "GET" and "range" in names
        assert sent["content-range"] == f"bytes */{length}"
    elif status == 206:
        assert method == "GET" and "range" in names
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", sent["content-range"])
        assert match is not None
        start, end, total = map(int, match.groups())
        assert total == length and 0 <= start <= end < length
        assert response.body == body[start : end + 1]
        assert int(sent["content-length"]) == end + 1 - start
    else:
        assert "content-range" not in sent
        assert int(sent["content-length"]) == length
        assert response.body == (b"" if method == "HEAD" else body)
    assert parse_http_date(sent.get("last-modified")) is not None

"""Freshness facts for a shared cache, after the public http-tests/cache-tests suite, with an explicit `now`.

Unless a test says otherwise the rules neither clamp nor add windows, so the table shows the RFC arithmetic."""

from __future__ import annotations

import dataclasses
from email.utils import formatdate

import pytest
from hypothesis import given, strategies as st

from moxy.cache.entry import Entry
from moxy.cache.freshness import (
    DELTA_MAX,
    Decision,
    Freshness,
    FreshnessRules,
    assess,
    current_age,
    decide,
    is_storable,
    parse_cache_control,
    parse_http_date,
    usable_on_error,
)
from tests.entries import make_entry

T = 1_700_000_000.0  # response time of every table row
RFC = FreshnessRules(ttl_min=0, ttl_max=10**10, ttl_default=300, stale_while_revalidate=0, stale_if_error=0)
CONFIGURED = dataclasses.replace(RFC, stale_while_revalidate=60, stale_if_error=3600)


def date(offset: float) -> str:
    return formatdate(T + offset, usegmt=True)


def fresh(headers: dict[str, str], *, rules: FreshnessRules = RFC, request_time: float = T) -> Freshness:
    return assess(headers, request_time=request_time, response_time=T, rules=rules)


def entry_of(freshness: Freshness, stored_at: float = T) -> Entry:
    return make_entry(
        "https://x/",
        headers=(),
        stored_at=stored_at,
        age=freshness.age,
        lifetime=freshness.lifetime,
        stale_while_revalidate=freshness.stale_while_revalidate,
        stale_if_error=freshness.stale_if_error,
        must_revalidate=freshness.must_revalidate,
        no_cache=freshness.no_cache,
    )


# -- freshness lifetime: RFC 9111 §4.2.1, §4.2.2, §5.3 ------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "lifetime"),
    [
        pytest.param({"cache-control": "max-age=100, s-maxage=200"}, 200, id="s-maxage beats max-age"),
        pytest.param({"cache-control": "s-maxage=50, max-age=100"}, 50, id="s-maxage beats larger max-age"),
        pytest.param(
            {"cache-control": "max-age=100", "date": date(0), "expires": date(1000)}, 100, id="max-age beats Expires"
        ),
        pytest.param({"cache-control": "max-age=100", "expires": "0"}, 100, id="max-age beats invalid Expires"),
        pytest.param({"date": date(0), "expires": date(500)}, 500, id="Expires minus Date"),
        pytest.param({"date": date(-100), "expires": date(100)}, 200, id="Expires counted from Date, not now"),
        pytest.param({"expires": date(500)}, 500, id="Expires without Date uses receipt time"),
        pytest.param({"date": date(0), "expires": date(-10)}, 0, id="Expires in the past is stale"),
        pytest.param({"date": date(0), "expires": "0"}, 0, id="invalid Expires is stale"),
        pytest.param({"date": date(0), "expires": "next tuesday"}, 0, id="garbage Expires is stale"),
        pytest.param(
            {"date": date(0), "last-modified": date(-10_000)}, 1000, id="heuristic 10% of Date - Last-Modified"
        ),
        pytest.param({"date": date(0), "last-modified": date(100)}, 0, id="Last-Modified in the future gives 0"),
        pytest.param(
            {"cache-control": "max-age=10", "last-modified": date(-10_000)}, 10, id="explicit beats heuristic"
        ),
        pytest.param({}, 300, id="nothing at all: ttl_default"),
        pytest.param({"cache-control": "public"}, 300, id="no freshness directive: ttl_default"),
        pytest.param({"cache-control": "s-maxage=0, max-age=100"}, 0, id="s-maxage=0"),
        pytest.param({"cache-control": "max-age=0"}, 0, id="max-age=0"),
        pytest.param({"cache-control": "MAX-AGE=100"}, 100, id="directive names are case-insensitive"),
        pytest.param({"cache-control": 'max-age="100"'}, 100, id="quoted max-age tolerated"),
        pytest.param({"cache-control": "max-age=abc"}, 0, id="invalid max-age is stale"),
        pytest.param({"cache-control": "max-age=-1"}, 0, id="negative max-age is stale"),
        pytest.param({"cache-control": "max-age=1.5"}, 0, id="fractional max-age is stale"),
        pytest.param({"cache-control": "max-age=100, max-age=100"}, 100, id="identical duplicates are fine"),
        pytest.param({"cache-control": "max-age=100, max-age=1000"}, 0, id="conflicting duplicates are stale"),
        pytest.param({"cache-control": "max-age=99999999999999"}, DELTA_MAX, id="huge max-age is 2^31"),
        pytest.param({"cache-control": "max-age=" + "9" * 5000}, DELTA_MAX, id="past int() digit limit is 2^31"),
        pytest.param({"cache-control": "max-age=" + "0" * 5000 + "100"}, 100, id="leading zeros do not count"),
        pytest.param({"cache-control": "max-age=\u0661\u0660"}, 0, id="non-ASCII digits are invalid"),
        pytest.param({"expires": "Mon, 01 Jan 99999999999 00:00:00 GMT"}, 0, id="overflowing Expires is stale"),
        pytest.param({"date": "Mon, 01 Jan 99999999999 00:00:00 GMT", "expires": date(100)}, 100, id="bad Date"),
        pytest.param({"cache-control": 'foo="a, max-age=5", max-age=100'}, 100, id="comma inside quotes"),
    ],
)
def test_lifetime(headers, lifetime):
    assert fresh(headers).lifetime == lifetime


# -- age: RFC 9111 §4.2.3 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "request_time", "age"),
    [
        pytest.param({"date": date(0)}, T, 0, id="fresh from the origin"),
        pytest.param({"date": date(-30)}, T, 30, id="apparent age from Date"),
        pytest.param({"date": date(0), "age": "50"}, T, 50, id="upstream Age counted"),
        pytest.param({"date": date(-30), "age": "10"}, T, 30, id="larger of apparent age and Age"),
        pytest.param({"date": date(0), "age": "10"}, T - 5, 15, id="response delay added to Age"),
        pytest.param({"date": date(100)}, T, 0, id="Date in the future: apparent age 0"),
        pytest.param({"age": "abc"}, T, 0, id="invalid Age ignored"),
        pytest.param({"age": "20, 30"}, T, 20, id="first of repeated Age"),
        pytest.param({"age": "9" * 5000}, T, DELTA_MAX, id="Age past int() digit limit is 2^31"),
        pytest.param({}, T - 2, 2, id="no Date: response delay only"),
    ],
)
def test_corrected_initial_age(headers, request_time, age):
    assert fresh(headers, request_time=request_time).age == age


def test_upstream_age_shortens_the_fresh_time():
    entry = entry_of(fresh({"cache-control": "max-age=100", "age": "90", "date": date(0)}))
    assert decide(entry, T + 9) is Decision.FRESH
    assert decide(entry, T + 10) is Decision.STALE
    assert current_age(entry, T + 9) == 99


def test_expires_in_the_past_is_stale_at_once():
    entry = entry_of(fresh({"date": date(0), "expires": date(-1)}))
    assert decide(entry, T) is Decision.STALE


def test_current_age_never_goes_backwards():
    entry = entry_of(fresh({"age": "5"}))
    assert current_age(entry, T - 100) == 5


# -- storable: RFC 9111 §3 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "storable"),
    [
        (200, {}, True),
        (200, {"cache-control": "public, max-age=60"}, True),
        (204, {}, False),  # no content: nothing to serve for the URL
        (203, {}, True),
        (203, {}, True),
        (200, {"cache-control": "no-store"}, False),
        (200, {"cache-control": "No-Store"}, False),
        (200, {"cache-control": "max-age=60, no-store"}, False),
        (200, {"cache-control": "private"}, False),
        (200, {"cache-control": 'private="set-cookie"'}, False),
        (200, {"cache-control": "s-maxage=60, private"}, False),
        (200, {"cache-control": "no-cache"}, True),
        (200, {"vary": "*"}, False),
        (200, {"vary": "accept, *"}, False),
        (200, {"vary": "accept"}, True),
        (206, {}, False),
        (304, {}, False),
        (404, {"cache-control": "max-age=60"}, False),
        (500, {}, False),
    ],
)
def test_is_storable(status, headers, storable):
    assert is_storable(status, headers) is storable


def test_no_cache_is_stored_but_revalidated_on_every_use():
    freshness = fresh({"cache-control": "no-cache, max-age=1000"}, rules=CONFIGURED)
    assert freshness.no_cache is True
    assert freshness.lifetime == 1000
    entry = entry_of(freshness)
    assert decide(entry, T) is Decision.STALE
    assert usable_on_error(entry, T) is False


def test_no_cache_may_stand_in_on_error_only_when_the_operator_overrides():
    rules = dataclasses.replace(CONFIGURED, honour_must_revalidate=False)
    entry = entry_of(fresh({"cache-control": "no-cache"}, rules=rules))
    assert decide(entry, T) is Decision.STALE
    assert usable_on_error(entry, T + 300 + 3599) is True


# -- clamps: the operator's override of the upstream --------------------------------------------------------


CLAMPED = dataclasses.replace(RFC, ttl_min=60, ttl_max=1000)


@pytest.mark.parametrize(
    ("headers", "lifetime"),
    [
        ({"cache-control": "max-age=0"}, 60),
        ({"cache-control": "max-age=10"}, 60),
        ({"cache-control": "s-maxage=0"}, 60),
        ({"cache-control": "max-age=500"}, 500),
        ({"cache-control": "max-age=5000"}, 1000),
        ({"date": date(0), "expires": date(-10)}, 60),
        ({"date": date(0), "last-modified": date(-(10**9))}, 1000),
        ({}, 300),
    ],
)
def test_lifetime_is_clamped(headers, lifetime):
    assert fresh(headers, rules=CLAMPED).lifetime == lifetime


def test_default_is_clamped_too():
    rules = dataclasses.replace(RFC, ttl_min=600, ttl_max=1000, ttl_default=300)
    assert fresh({}, rules=rules).lifetime == 600


# -- stale windows: RFC 5861 and must-revalidate ------------------------------------------------------------


@pytest.mark.parametrize(
    ("cache_control", "rules", "swr", "sie", "must_revalidate"),
    [
        pytest.param("max-age=100", CONFIGURED, 60, 3600, False, id="configured defaults"),
        pytest.param("max-age=100", RFC, 0, 0, False, id="no windows configured"),
        pytest.param("max-age=100, stale-while-revalidate=30", CONFIGURED, 30, 3600, False, id="upstream SWR"),
        pytest.param("max-age=100, stale-if-error=86400", CONFIGURED, 60, 86400, False, id="upstream SIE"),
        pytest.param("max-age=100, stale-if-error=0", CONFIGURED, 60, 0, False, id="upstream SIE=0"),
        pytest.param("max-age=100, stale-while-revalidate=x", CONFIGURED, 60, 3600, False, id="invalid SWR ignored"),
        pytest.param("max-age=100, must-revalidate", CONFIGURED, 0, 0, True, id="must-revalidate zeroes"),
        pytest.param("max-age=100, proxy-revalidate", CONFIGURED, 0, 0, True, id="proxy-revalidate zeroes"),
        pytest.param(
            "max-age=100, must-revalidate, stale-if-error=99", CONFIGURED, 0, 0, True, id="most restrictive wins"
        ),
        pytest.param("s-maxage=100", CONFIGURED, 0, 0, True, id="s-maxage carries proxy-revalidate"),
        pytest.param("max-age=100, no-cache", CONFIGURED, 0, 0, False, id="no-cache zeroes"),
        pytest.param(
            "max-age=100, must-revalidate",
            dataclasses.replace(CONFIGURED, honour_must_revalidate=False),
            60,
            3600,
            False,
            id="operator override",
        ),
    ],
)
def test_windows(cache_control, rules, swr, sie, must_revalidate):
    freshness = fresh({"cache-control": cache_control}, rules=rules)
    assert (freshness.stale_while_revalidate, freshness.stale_if_error) == (swr, sie)
    assert freshness.must_revalidate is must_revalidate


@pytest.mark.parametrize(
    ("elapsed", "decision", "on_error"),
    [
        (0, Decision.FRESH, True),
        (99.9, Decision.FRESH, True),
        (100, Decision.STALE_WHILE_REVALIDATE, True),
        (159.9, Decision.STALE_WHILE_REVALIDATE, True),
        (160, Decision.STALE, True),
        (3699.9, Decision.STALE, True),
        (3700, Decision.STALE, False),
    ],
)
def test_decide_and_stale_if_error_over_time(elapsed, decision, on_error):
    entry = entry_of(fresh({"cache-control": "max-age=100"}, rules=CONFIGURED))
    assert decide(entry, T + elapsed) is decision
    assert usable_on_error(entry, T + elapsed) is on_error


def test_must_revalidate_never_serves_stale():
    entry = entry_of(fresh({"cache-control": "max-age=100, must-revalidate"}, rules=CONFIGURED))
    assert decide(entry, T + 99) is Decision.FRESH
    assert decide(entry, T + 100) is Decision.STALE
    assert usable_on_error(entry, T + 100) is False


def test_decide_respects_must_revalidate_even_with_a_window():
    entry = dataclasses.replace(
        entry_of(fresh({"cache-control": "max-age=100"}, rules=CONFIGURED)), must_revalidate=True
    )
    assert decide(entry, T + 110) is Decision.STALE


def test_resident_time_counts_from_the_refresh():
    # a 304 refresh (new stored_at, new age) restarts the clock
    entry = entry_of(fresh({"cache-control": "max-age=100"}), stored_at=T + 1000)
    assert decide(entry, T + 1050) is Decision.FRESH


# -- parsers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (None, {}),
        ("", {}),
        ("public", {"public": None}),
        ("Public, MAX-AGE=60", {"public": None, "max-age": "60"}),
        ('no-cache="set-cookie, x", max-age=5', {"no-cache": "set-cookie, x", "max-age": "5"}),
        (r'ext="a \"quoted\" word"', {"ext": 'a "quoted" word'}),
        ("max-age=5, max-age=10", {"max-age": "5"}),
        ("  max-age = 5 ,,, no-store ", {"max-age": "5", "no-store": None}),
        ("max-age=5 junk, no-store", {"no-store": None}),
        ("=5, private", {"private": None}),
    ],
)
def test_parse_cache_control(value, parsed):
    assert parse_cache_control(value) == parsed


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Sun, 06 Nov 1994 08:49:37 GMT", 784111777.0),
        ("Sunday, 06-Nov-94 08:49:37 GMT", 784111777.0),
        ("Sun Nov  6 08:49:37 1994", 784111777.0),
        ("Thursday, 01-Jan-15 00:00:00 GMT", 1420070400.0),
        ("Sun, 06 Nov 1994 08:49:37 UTC", None),
        ("Sun, 06 Foo 1994 08:49:37 GMT", None),
        ("Sun, 32 Nov 1994 08:49:37 GMT", None),
        (" Sun, 06 Nov 1994 08:49:37 GMT\t", 784111777.0),  # OWS around the value (RFC 9110 §5.6.3)
        ("Sun, 06 Nov 1994 08:49:37 GMT\x0b", None),  # a control byte is no whitespace
        ("Sun, 06 Nov 1994 08:49:37 gmt", None),  # RFC 9110 §5.6.7: HTTP-date is case-sensitive
        ("Sat, 29 Feb 2020 00:00:00 GMT", 1582934400.0),
        ("Sun, 29 Feb 2021 00:00:00 GMT", None),  # no such day: not normalised into 1 March
        ("Mon, 31 Jun 2025 00:00:00 GMT", None),
        ("Sun, 06 Nov 1994 24:00:00 GMT", None),
        ("Mon, 01 Jan 0000 00:00:00 GMT", None),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 253402300799.0),
        ("Mon, 01 Jan 99999999999 00:00:00 GMT", None),  # the year that overflowed email.utils
        ("Mon, 01 Jan 10000 00:00:00 GMT", None),
        ("Mon, 01 Jan -2025 00:00:00 GMT", None),
        ("Sun, \u0660\u0666 Nov 1994 08:49:37 GMT", None),  # ARABIC-INDIC digits: int() reads them, HTTP does not
        ("Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT", None),
        ("0", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_http_date(value, expected):
    assert parse_http_date(value) == expected


header_values = st.text(max_size=40) | st.sampled_from(
    ["max-age=10", "s-maxage=0", "no-cache", "must-revalidate", "stale-if-error=5", date(-50), "0", "-1", "10"]
)


@given(
    st.dictionaries(st.sampled_from(["cache-control", "date", "expires", "age", "last-modified"]), header_values),
    st.floats(min_value=0, max_value=100),
)
def test_assess_stays_within_the_operator_bounds(headers, delay):
    freshness = assess(headers, request_time=T - delay, response_time=T, rules=dataclasses.replace(CLAMPED))
    assert 60 <= freshness.lifetime <= 1000
    assert freshness.age >= 0
    assert freshness.stale_while_revalidate >= 0 and freshness.stale_if_error >= 0

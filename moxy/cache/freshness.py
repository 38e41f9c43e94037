"""Shared-cache freshness (RFC 9111) and stale windows (RFC 5861) as arithmetic over headers and an explicit `now`.

Pure: no clock reads, no I/O. Headers arrive as a mapping with lowercase names, repeated fields joined by ", "."""

from __future__ import annotations

import calendar
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from moxy.cache.entry import Entry

__all__ = [
    "Decision",
    "Freshness",
    "FreshnessRules",
    "assess",
    "current_age",
    "decide",
    "is_storable",
    "parse_cache_control",
    "parse_http_date",
    "usable_on_error",
]

# RFC 9111 §1.2.2: a delta-seconds too large to represent is taken as 2^31.
DELTA_MAX = 2147483648


@dataclass(frozen=True, slots=True)
class FreshnessRules:
    """The operator's bounds. `ttl_min`/`ttl_max` clamp every lifetime, the upstream's included."""

    ttl_min: float
    ttl_max: float
    ttl_default: float
    stale_while_revalidate: float
    stale_if_error: float
    honour_must_revalidate: bool = True


@dataclass(frozen=True, slots=True)
class Freshness:
    """The result of assess(): what an Entry stores about its freshness."""

    lifetime: float
    age: float
    stale_while_revalidate: float
    stale_if_error: float
    must_revalidate: bool
    no_cache: bool


class Decision(Enum):
    FRESH = "fresh"
    STALE_WHILE_REVALIDATE = "stale-while-revalidate"  # serve now, refresh in the background
    STALE = "stale"  # fetch or revalidate before serving


# A directive: token name, optionally "=" and a token or a quoted-string (RFC 9110 §5.6.2, §5.6.4).
_DIRECTIVE = re.compile(
    r"""\s*([^\s=,"]+)\s*(?:=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*)))?\s*(?:,|$)""",
    re.DOTALL,
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def _directives(value: str | None) -> list[tuple[str, str | None]]:
    """Every directive in order, duplicates included. Junk between commas is skipped, not fatal."""
    if not value:
        return []
    found: list[tuple[str, str | None]] = []
    position = 0
    while position < len(value):
        match = _DIRECTIVE.match(value, position)
        if match is None or match.end() == position:
            # Unparseable segment: skip to the next comma and carry on (tolerant reader).
            comma = value.find(",", position)
            if comma < 0:
                break
            position = comma + 1
            continue
        name, quoted, token = match.groups()
        argument = _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else token
        found.append((name.lower(), argument))
        position = match.end()
    return found


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """Cache-Control directives by lowercase name; the argument unquoted, None when absent.

    On duplicates the first occurrence wins here (RFC 9111 §4.2.1 allows it). assess() is stricter for
    the freshness directives: conflicting duplicates of max-age or s-maxage make the response stale."""
    parsed: dict[str, str | None] = {}
    for name, argument in _directives(value):
        parsed.setdefault(name, argument)
    return parsed


def _delta_seconds(argument: str | None) -> int | None:
    """RFC 9111 §1.2.2 delta-seconds, or None when invalid (ASCII digits only: no sign, no fraction, no space)."""
    if argument is None or not argument.isascii() or not argument.isdigit():
        return None
    # §1.2.2: a value too large to represent is taken as 2^31. Checking the length first also keeps int() away from
    # digit strings past Python's conversion limit (4300 digits), where it raises instead of answering.
    significant = argument.lstrip("0")
    if len(significant) > len(str(DELTA_MAX)):
        return DELTA_MAX
    return min(int(significant or "0"), DELTA_MAX)


_MONTHS = {name: number for number, name in enumerate(calendar.month_abbr) if name}
# RFC 9110 §5.6.7 grammar, case-sensitive, ASCII digits only (re.ASCII: \d would also take other scripts' digits).
_IMF_FIXDATE = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d{2}) ([A-Z][a-z]{2}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) GMT", re.ASCII
)
_RFC850 = re.compile(
    r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), (\d{2})-([A-Z][a-z]{2})-(\d{2}) "
    r"(\d{2}):(\d{2}):(\d{2}) GMT",
    re.ASCII,
)
_ASCTIME = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) ([A-Z][a-z]{2}) ([ \d]\d) (\d{2}):(\d{2}):(\d{2}) (\d{4})", re.ASCII
)
# RFC 9110 §5.6.3: the whitespace a field value may carry around it.
_OWS = " \t"


# The same few dates are read over and over (an entry's Date and Last-Modified on every answer, a second's Date on
# every miss): the parse is pure, so its answers are kept. Inputs longer than any date are not (see below).
@functools.lru_cache(maxsize=4096)
def _parse_http_date_cached(value: str) -> float | None:
    return _parse_http_date(value)


def parse_http_date(value: str | None) -> float | None:
    """An HTTP-date as unix time, or None for anything else; never raises (the grammar: `_parse_http_date`)."""
    if value is None:
        return None
    # A real HTTP-date is 29 characters (IMF-fixdate) or a few more: longer text never enters the cache.
    return _parse_http_date_cached(value) if len(value) <= 64 else _parse_http_date(value)


def _parse_http_date(value: str | None) -> float | None:
    """An HTTP-date (RFC 9110 §5.6.7: IMF-fixdate, and the obsolete RFC 850 and asctime forms) as unix time.

    The one date parser of Moxy, for request and upstream fields alike. It never raises: None when the value is
    absent, does not follow the grammar, or names no real moment (31 February, hour 24, year 0000). The grammar
    caps the year at four digits, so no year can overflow. Two-digit RFC 850 years are read as 1970-2069."""
    if value is None:
        return None
    text = value.strip(_OWS)
    if match := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hour, minute, second = match.groups()
    elif match := _RFC850.fullmatch(text):
        day, month, short_year, hour, minute, second = match.groups()
        year = str(int(short_year) + (1900 if int(short_year) >= 70 else 2000))
    elif match := _ASCTIME.fullmatch(text):
        month, day, hour, minute, second, year = match.groups()
    else:
        return None
    month_number = _MONTHS.get(month)
    if month_number is None:
        return None
    numbers = (int(year), month_number, int(day.strip()), int(hour), int(minute), int(second))
    year_number, _, day_number, hour_number, minute_number, second_number = numbers
    if year_number < 1 or not 1 <= day_number <= calendar.monthrange(year_number, month_number)[1]:
        return None
    # Second 60 is a leap second (RFC 5322 §3.3); timegm carries it into the next minute.
    if hour_number > 23 or minute_number > 59 or second_number > 60:
        return None
    return float(calendar.timegm((*numbers, 0, 0, 0)))


def is_storable(status: int, headers: Mapping[str, str]) -> bool:
    """Whether a shared cache may store this 2xx answer (RFC 9111 §3).

    no-store and private (qualified or not: Moxy does not strip named fields) forbid it; `Vary: *`
    can never be matched again (§4.1), so storing it is pointless; only 200 and 203 carry the resource itself
    (206 is a fragment, 204 and 205 carry nothing, 201/202/207 describe an operation)."""
    if status not in (200, 203):
        return False
    directives = parse_cache_control(headers.get("cache-control"))
    if "no-store" in directives or "private" in directives:
        return False
    return all(part.strip() != "*" for part in headers.get("vary", "").split(","))


def _freshness_directive(all_directives: list[tuple[str, str | None]], name: str) -> tuple[bool, int | None]:
    """(present, seconds). RFC 9111 §4.2.1: invalid or conflicting duplicate values are taken as stale (0)."""
    values = [argument for found, argument in all_directives if found == name]
    if not values:
        return False, None
    parsed = {_delta_seconds(argument) for argument in values}
    if None in parsed or len(parsed) > 1:
        return True, 0
    return True, parsed.pop()


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def assess(
    headers: Mapping[str, str], *, request_time: float, response_time: float, rules: FreshnessRules
) -> Freshness:
    """Freshness lifetime, corrected initial age and stale windows of a response.

    - lifetime: s-maxage > max-age > Expires - Date (RFC 9111 §4.2.1); without them 10 % of Date - Last-Modified
      (§4.2.2); rules.ttl_default when the upstream says nothing. Then clamped to [ttl_min, ttl_max]: the clamp
      is the operator's override of the upstream, so max-age=0 becomes ttl_min too. no-cache responses keep
      no_cache=True and are revalidated before every use whatever their lifetime.
    - age: the corrected initial age of §4.2.3, counting the upstream's Age and the response delay.
    - windows: RFC 5861 stale-while-revalidate / stale-if-error from the upstream, else the configured defaults.
      must-revalidate, proxy-revalidate and s-maxage (which carries proxy-revalidate for shared caches,
      §5.2.2.10) and no-cache forbid serving stale (§4.2.4): both windows become 0 unless the operator turned
      honour_must_revalidate off."""
    all_directives = _directives(headers.get("cache-control"))
    directives = dict(reversed(all_directives))  # first occurrence wins for flags and windows

    date_value = parse_http_date(headers.get("date"))
    if date_value is None:
        # RFC 9110 §6.6.1: a recipient with a clock takes the receipt time when Date is missing or invalid.
        date_value = response_time
    age_text = headers.get("age", "").split(",")[0].strip()
    age_value = _delta_seconds(age_text) or 0

    # RFC 9111 §4.2.3.
    apparent_age = max(0.0, response_time - date_value)
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = age_value + response_delay
    corrected_initial_age = max(apparent_age, corrected_age_value)

    has_s_maxage, s_maxage = _freshness_directive(all_directives, "s-maxage")
    has_max_age, max_age = _freshness_directive(all_directives, "max-age")
    lifetime: float
    if has_s_maxage:
        lifetime = s_maxage or 0
    elif has_max_age:
        lifetime = max_age or 0
    elif "expires" in headers:
        # RFC 9111 §5.3: an invalid Expires (such as "0") means "already expired".
        expires = parse_http_date(headers["expires"])
        lifetime = max(0.0, expires - date_value) if expires is not None else 0.0
    elif (last_modified := parse_http_date(headers.get("last-modified"))) is not None:
        # RFC 9111 §4.2.2: a typical heuristic is 10 % of the time since the last modification.
        lifetime = max(0.0, date_value - last_modified) * 0.1
    else:
        lifetime = rules.ttl_default
    lifetime = _clamp(lifetime, rules.ttl_min, rules.ttl_max)

    no_cache = "no-cache" in directives
    revalidate = "must-revalidate" in directives or "proxy-revalidate" in directives or has_s_maxage
    forbid_stale = rules.honour_must_revalidate and (revalidate or no_cache)

    def window(name: str, default: float) -> float:
        if forbid_stale:
            return 0.0
        if name in directives:
            seconds = _delta_seconds(directives[name])
            # An invalid window from the upstream grants nothing extra; keep the operator's default.
            return float(seconds) if seconds is not None else default
        return default

    return Freshness(
        lifetime=lifetime,
        age=corrected_initial_age,
        stale_while_revalidate=window("stale-while-revalidate", rules.stale_while_revalidate),
        stale_if_error=window("stale-if-error", rules.stale_if_error),
        must_revalidate=revalidate and rules.honour_must_revalidate,
        no_cache=no_cache,
    )


def current_age(entry: Entry, now: float) -> float:
    """RFC 9111 §4.2.3: corrected initial age plus the time resident in the cache."""
    return entry.age + max(0.0, now - entry.stored_at)


def decide(entry: Entry, now: float) -> Decision:
    """FRESH: serve. STALE_WHILE_REVALIDATE: serve and refresh in the background. STALE: refresh first."""
    if entry.no_cache:
        # RFC 9111 §5.2.2.4: stored, but never used without a successful validation.
        return Decision.STALE
    age = current_age(entry, now)
    if age < entry.lifetime:
        return Decision.FRESH
    if not entry.must_revalidate and age < entry.lifetime + entry.stale_while_revalidate:
        return Decision.STALE_WHILE_REVALIDATE
    return Decision.STALE


def usable_on_error(entry: Entry, now: float) -> bool:
    """Whether the copy may stand in for a failed upstream (RFC 5861 §4 stale-if-error window).

    A no-cache copy with no stale-if-error window was never usable without validation, so it is not usable here."""
    if entry.no_cache and entry.stale_if_error <= 0:
        return False
    return current_age(entry, now) < entry.lifetime + entry.stale_if_error

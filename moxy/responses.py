"""Outcome -> HTTP response: the headers a CDN can trust, conditional requests (304), byte ranges (206/416),
HEAD, and the one table from Moxy's errors to statuses. The only place the headers describing an entry are
rendered (hit_headers); the hit memo sends what it returns too."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import Literal, TypeAlias

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from moxy.body import OpenBody
from moxy.cache import Entry
from moxy.cache.freshness import parse_http_date
from moxy.cache.vary import vary_header
from moxy.errors import (
    BadSignature,
    DestinationRefused,
    ExpiredURL,
    MalformedURL,
    MoxyError,
    UpstreamError,
    UpstreamTimeout,
)
from moxy.proxy import CacheResult, Served

__all__ = [
    "SECURITY_HEADERS",
    "Answer",
    "EntryFields",
    "RangeChoice",
    "answer",
    "content_length",
    "entry_fields",
    "error_answer",
    "error_response",
    "error_status",
    "hit_headers",
    "parse_range",
    "render",
    "send_body",
    "surrogate_key",
]

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox",
    "x-frame-options": "deny",
    "referrer-policy": "no-referrer",
}
# Stored headers that Moxy replaces with its own view (cache-control, age) or recomputes.
NOT_SENT = frozenset({"cache-control", "expires", "date", "age", "etag", "content-length"})
# A body leaves in slices of SEND_SLICE bytes. The server buffers what a client has not read yet, and a slice is
# handed over only once that buffer has drained: a client that reads slowly (or not at all) holds about one slice
# and the server's high-water mark, not the whole body. Files are read FILE_READ_BYTES at a time (one thread hop
# for most images). A client that takes nothing for a while is dropped by the server (moxy/server.py).
SEND_SLICE = 64 * 1024
# The ASGI extension through which a server takes a file-backed body without Python copying it (moxy/sending.py
# implements it for `moxy serve`); without it, file bodies go through the read-and-slice loop.
ZERO_COPY = "http.response.zerocopysend"
FILE_READ_BYTES = 256 * 1024
UPSTREAM_ERROR_MAX_AGE = 10
_UPSTREAM_ERROR_CACHE_CONTROL = b"public, max-age=%d" % UPSTREAM_ERROR_MAX_AGE
_SECURITY_FIELDS = tuple((name.encode("latin-1"), value.encode("latin-1")) for name, value in SECURITY_HEADERS.items())
_JSON_TYPE = (b"content-type", b"application/json")
REFUSED_REASON = "destination not allowed"
# RFC 9110 §5.6.3: the only whitespace a field value may carry around it (str.strip() would also eat control bytes).
_OWS = " \t"

RangeChoice: TypeAlias = tuple[int, int] | Literal["unsatisfiable"] | None


def error_status(error: MoxyError) -> int:
    """The one table from Moxy's errors to HTTP statuses."""
    if isinstance(error, MalformedURL):
        return 400
    if isinstance(error, BadSignature | DestinationRefused):
        return 403
    if isinstance(error, ExpiredURL):
        return 410
    if isinstance(error, UpstreamTimeout):
        return 504
    if isinstance(error, UpstreamError):
        return error.status if error.status in (404, 410) else 502
    return 500


def error_answer(error: MoxyError, *, cache: str, head: bool = False, vary: str = "") -> Answer:
    """The JSON answer for a Moxy error: its status from error_status, cacheable briefly only when the upstream
    caused it."""
    status = error_status(error)
    kind = type(error).__name__
    reason = getattr(error, "reason", str(error))
    if isinstance(error, DestinationRefused):
        # Which check refused (a private address, a denied name, a loopback spelling) would tell anyone who can
        # get URLs signed how internal names resolve; the access log keeps the detail, the client gets this.
        reason = REFUSED_REASON
    body = orjson.dumps({"error": kind, "reason": reason})
    headers = list(_SECURITY_FIELDS)
    if status in (400, 403, 410, 500):
        # Errors the request caused (or a fault of Moxy's own) must never be cached for everyone.
        headers.append((b"cache-control", b"no-store"))
    else:
        # Upstream errors are kept briefly; the upstream saw the forwarded headers, so they name the variant.
        headers.append((b"cache-control", _UPSTREAM_ERROR_CACHE_CONTROL))
        if vary:
            headers.append((b"vary", vary.encode("latin-1")))
    headers.append((b"x-moxy-cache", cache.encode("latin-1")))
    cache_status = f"moxy; fwd=uri-miss; detail={_sf_string(reason)}" if status >= 500 else "moxy"
    # A HEAD answer carries the length the GET would have (RFC 9110 §9.3.2), without the body.
    headers += [(b"cache-status", cache_status.encode("latin-1")), content_length(len(body)), _JSON_TYPE]
    return Answer(status, headers, b"", 0, -1) if head else Answer(status, headers, body, 0, len(body) - 1)


def error_response(error: MoxyError, *, cache: str, head: bool = False, vary: str = "") -> Response:
    """error_answer as a Starlette Response (for callers that hold a framework Request)."""
    return error_answer(error, cache=cache, head=head, vary=vary).as_response()


def surrogate_key(url: str) -> str:
    """The CDN purge key of an upstream URL: the same for all its variants, and no URL in the clear."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _sf_string(text: str) -> str:
    """`text` as an RFC 8941 §3.3.3 sf-string (the form of a Cache-Status detail, RFC 9211 §2.8): printable ASCII
    only, quote and backslash escaped, so no reason text can end the parameter or the field."""
    printable = "".join(char for char in text if " " <= char <= "~")
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _modified(entry: Entry) -> tuple[float, bool]:
    """(when the representation last changed, whether that date is a strong validator).

    The upstream's Last-Modified when it is a valid HTTP-date no later than when Moxy took the copy (RFC 9110
    §8.8.2.1: a date in the future is replaced by the origination date), else the second Moxy stored it. Only an
    upstream date at least one second older than the upstream's Date (or the store time) is strong (§8.8.2.2);
    Moxy's own date never is, since a refresh within the same second could bring other bytes."""
    upstream = parse_http_date(entry.header("last-modified"))
    if upstream is None or upstream > entry.stored_at:
        return float(math.floor(entry.stored_at)), False
    dated = parse_http_date(entry.header("date"))
    return upstream, (dated if dated is not None else entry.stored_at) - upstream >= 1


def _last_modified(entry: Entry) -> str:
    """The Last-Modified clients revalidate against, always in IMF-fixdate form (RFC 9110 §5.6.7)."""
    return _imf_fixdate(int(_modified(entry)[0]))


@functools.lru_cache(maxsize=4096)
def _imf_fixdate(seconds: int) -> str:
    # Formatting a date is a noticeable share of a miss; entries of one upstream mostly share a handful of dates.
    return formatdate(seconds, usegmt=True)


def _etag(digest: str) -> str:
    return f'"{digest[:32]}"'


@dataclass(frozen=True, slots=True)
class EntryFields:
    """The header fields describing one entry, prepared once: everything but the parts that change with time.

    `fields` are the fixed fields in the order they are sent (Content-Type last); Age and the ttl of Cache-Status
    are added for each answer by hit_headers(). The hit memo keeps one of these per prepared answer."""

    fields: tuple[tuple[bytes, bytes], ...]
    lifetime: float
    cache_status: bytes  # up to and including "ttl="
    detail: bytes  # the Cache-Status detail parameter, or b""


def _media_type(entry: Entry) -> str:
    """The Content-Type sent: the stored one (text/* with its charset, utf-8 when it names none), else bytes."""
    value = entry.header("content-type") or "application/octet-stream"
    if value.startswith("text/") and "charset=" not in value.lower():
        value += "; charset=utf-8"
    return value


# RFC 9211 §2: how each result is said in Cache-Status.
_CACHE_STATUS = {
    CacheResult.HIT: "hit",
    CacheResult.STALE: "hit",
    CacheResult.REVALIDATED: "fwd=stale",
    CacheResult.MISS: "fwd=uri-miss",
    CacheResult.BYPASS: "fwd=bypass",
}


def entry_fields(entry: Entry, cache: CacheResult, *, stored: bool = True, reason: str | None = None) -> EntryFields:
    """The fixed header fields of an answer from `entry` (see EntryFields)."""
    headers = {name: value for name, value in entry.headers if name not in NOT_SENT and name != "content-type"}
    headers.update(SECURITY_HEADERS)
    headers["etag"] = _etag(entry.digest)
    headers["last-modified"] = _last_modified(entry)
    # The full lifetime with Age, never the remaining lifetime: a CDN subtracts Age itself (RFC 9111 §4.2.3), so
    # sending the remaining lifetime as well would count the age twice.
    headers["cache-control"] = (
        f"public, max-age={int(entry.lifetime)}, stale-while-revalidate={int(entry.stale_while_revalidate)}, "
        f"stale-if-error={int(entry.stale_if_error)}"
        if stored
        else "private, no-store"
    )
    headers["accept-ranges"] = "bytes"
    headers["surrogate-key"] = surrogate_key(entry.url)
    if entry.vary:
        # Only what this entry depends on: with no Vary upstream, one copy serves every client, at a CDN too.
        headers["vary"] = vary_header(entry.vary)
    headers["x-moxy-cache"] = cache.value
    headers["content-type"] = _media_type(entry)
    return EntryFields(
        fields=tuple((name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()),
        lifetime=entry.lifetime,
        cache_status=f"moxy; {_CACHE_STATUS[cache]}; ttl=".encode("latin-1"),
        detail=f"; detail={_sf_string(reason)}".encode("latin-1") if reason else b"",
    )


def hit_headers(prepared: EntryFields, age: float) -> list[tuple[bytes, bytes]]:
    """Every header field describing an entry, at `age` seconds (RFC 9111 §4.2.3 current age): the one rendering
    of Age, Cache-Control, ETag, Last-Modified, Vary and Cache-Status, for the full flow and the hit memo alike."""
    return [
        *prepared.fields,
        (b"age", b"%d" % max(0, int(age))),
        (b"cache-status", prepared.cache_status + b"%d" % int(prepared.lifetime - age) + prepared.detail),
    ]


def content_length(size: int) -> tuple[bytes, bytes]:
    return b"content-length", b"%d" % max(0, size)


def _not_modified(headers: Mapping[str, str], served: Served) -> bool:
    """RFC 9110 §13.2.2: If-None-Match, when present, decides alone; otherwise If-Modified-Since.

    A value that does not parse means "no condition": the request is answered in full, never refused."""
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        # §13.1.2: weak comparison, so W/"x" matches Moxy's strong "x"; "*" matches any current representation.
        etag = _etag(served.entry.digest)
        candidates = {tag.strip(_OWS).removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in candidates or etag in candidates
    # §13.1.3: an If-Modified-Since that is not a valid HTTP-date is ignored.
    since = parse_http_date(headers.get("if-modified-since"))
    return since is not None and _modified(served.entry)[0] <= since


def _if_range_holds(value: str, entry: Entry) -> bool:
    """RFC 9110 §13.1.5: an entity-tag matches by strong comparison only (a weak tag never does); an HTTP-date
    matches only when it equals a strong Last-Modified exactly. Anything else sends the whole representation."""
    validator = value.strip(_OWS)
    if validator.startswith(('"', "W/")):
        return validator == _etag(entry.digest)
    date = parse_http_date(validator)
    modified, strong = _modified(entry)
    return strong and date == modified


_RANGE_PROBLEM = b'{"error":"RangeNotSatisfiable","reason":"the range starts past the end of the body"}'
_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")
# A byte position with more significant digits than this lies past any body Moxy can hold; capping it keeps int()
# away from digit strings past Python's conversion limit (4300 digits), where it raises instead of answering.
_POSITION_DIGITS = 18
_BEYOND = 10**_POSITION_DIGITS


def _position(digits: str) -> int:
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= _POSITION_DIGITS else _BEYOND


def parse_range(value: str | None, length: int) -> RangeChoice:
    """A Range field (RFC 9110 §14.2) against a representation of `length` bytes.

    (first, last) inclusive for one satisfiable byte range; "unsatisfiable" for a valid range that lies past the
    end (416, §15.5.17); None to send the whole representation: no Range, another unit, a malformed value, or
    several ranges (a full 200 is always a correct answer to a Range, §14.2). Never raises."""
    if value is None:
        return None
    unit, equals, ranges = value.strip(_OWS).partition("=")
    if not equals or unit.lower() != "bytes":  # §14.1: range units are compared case-insensitively
        return None
    match = _RANGE_SPEC.fullmatch(ranges.strip(_OWS))
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = _position(last)
        # §14.1.1: a suffix-range of length zero, or any range of an empty representation, is unsatisfiable.
        if suffix == 0 or length == 0:
            return "unsatisfiable"
        return max(0, length - suffix), length - 1
    start = _position(first)
    end = _position(last) if last else None
    if end is not None and end < start:
        return None  # §14.1.1: an invalid range-spec makes the whole field invalid, and so ignored
    if start >= length:
        return "unsatisfiable"
    return start, length - 1 if end is None else min(end, length - 1)


def _byte_range(method: str, headers: Mapping[str, str], served: Served, length: int) -> RangeChoice:
    if method != "GET":
        return None  # RFC 9110 §14.2: Range is ignored for every other method, HEAD included
    if_range = headers.get("if-range")
    if if_range is not None and not _if_range_holds(if_range, served.entry):
        return None
    return parse_range(headers.get("range"), length)


async def send_body(send: Send, body: bytes | memoryview, *, more_after: bool = False) -> None:
    """Send `body` in slices; each `send` returns once the server's buffer has room for it."""
    if len(body) <= SEND_SLICE:
        await send({"type": "http.response.body", "body": bytes(body), "more_body": more_after})
        return
    view = memoryview(body)
    for start in range(0, len(view), SEND_SLICE):
        last = start + SEND_SLICE >= len(view) and not more_after
        await send(
            {"type": "http.response.body", "body": bytes(view[start : start + SEND_SLICE]), "more_body": not last}
        )


@dataclass(slots=True)
class Answer:
    """One answer of the proxy route, ready to go out as ASGI messages: no framework object is built for it.

    The body is bytes [start, end] of `body` (end < start: none): in memory, or in a file (OpenBody), which is
    sent through the server's zero-copy extension when it has one, else read FILE_READ_BYTES at a time; either
    way it leaves in slices (see SEND_SLICE). Holding its own sending loop (instead of a streaming generator)
    means nothing is left suspended when the client goes away: the open file is released with the answer."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes | OpenBody = b""
    start: int = 0
    end: int = -1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        body, position, end = self.body, self.start, self.end
        if isinstance(body, bytes):
            if position == 0 and end + 1 == len(body) and len(body) <= SEND_SLICE:
                await send({"type": "http.response.body", "body": body, "more_body": False})
            else:
                await send_body(send, memoryview(body)[position : end + 1])
            return
        if end < position:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if ZERO_COPY in scope.get("extensions", {}):
            # The server moves the bytes from the file to the socket itself (moxy/sending.py): no read into
            # Python and no copy loop here, and it waits for a slow client as the slices below would.
            await send(
                {
                    "type": ZERO_COPY,
                    "file": body.fd,
                    "offset": body.offset + position,
                    "count": end + 1 - position,
                    "more_body": False,
                }
            )
            return
        while position <= end:
            size = min(FILE_READ_BYTES, end + 1 - position)
            chunk = await asyncio.to_thread(body.read, position, size)
            if len(chunk) != size:
                return  # the file shrank under us (it cannot, by design): end the answer short, never pad it
            position += size
            await send_body(send, chunk, more_after=position <= end)

    def as_response(self) -> Response:
        """This answer as a Starlette Response, which sends it exactly as calling it does."""
        return _AnswerResponse(self)


class _AnswerResponse(Response):
    def __init__(self, answer: Answer) -> None:
        # No arguments to the base: it would add Content-Length and Content-Type fields of its own.
        super().__init__()
        self.answer = answer
        self.status_code = answer.status
        self.raw_headers = answer.headers
        self.body = answer.body[answer.start : answer.end + 1] if isinstance(answer.body, bytes) else b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.answer(scope, receive, send)


def answer(method: str, headers: Mapping[str, str], served: Served) -> Answer:
    """The answer to a GET or HEAD (`method`, request `headers`) from a served entry: 200, 206, 304 or 416."""
    fields = entry_fields(served.entry, served.cache, stored=served.stored, reason=served.reason)
    sent = hit_headers(fields, served.age)
    if _not_modified(headers, served):
        return Answer(304, [field for field in sent if field[0] != b"content-type"])
    length = served.entry.length
    chosen = _byte_range(method, headers, served, length)
    status, start, end = 200, 0, length - 1
    if chosen == "unsatisfiable":
        # The request's fault, like a 400: a small JSON error that no cache keeps (RFC 9110 §15.5.17 wants the
        # Content-Range that names the real length). The entry's own caching fields do not describe this answer.
        kept = {b"content-type", b"cache-control", b"content-length", b"age", b"etag", b"last-modified"}
        sent = [field for field in sent if field[0] not in kept]
        problem = b"" if method == "HEAD" else _RANGE_PROBLEM
        sent += [
            _JSON_TYPE,
            (b"cache-control", b"no-store"),
            (b"content-range", b"bytes */%d" % length),
            content_length(len(_RANGE_PROBLEM)),
        ]
        return Answer(416, sent, problem, 0, len(problem) - 1)
    if isinstance(chosen, tuple):
        status, (start, end) = 206, chosen
        sent.append((b"content-range", b"bytes %d-%d/%d" % (start, end, length)))
    sent.append(content_length(end + 1 - start))
    if method == "HEAD" or length == 0:
        return Answer(status, sent)
    return Answer(status, sent, served.body, start, end)


def render(request: Request, served: Served) -> Response:
    """answer() for a Starlette Request, as a Response."""
    return answer(request.method, request.headers, served).as_response()

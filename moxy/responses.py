"""Outcome -> HTTP response: the headers a CDN can trust, conditional requests (304), byte ranges (206/416),
HEAD, and the one table from Moxy's errors to statuses (DESIGN section 6)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from moxy.cache import Entry
from moxy.errors import (
    BadSignature,
    DestinationRefused,
    ExpiredURL,
    MalformedURL,
    MoxyError,
    UpstreamError,
    UpstreamTimeout,
)
from moxy.proxy import OpenBody, Served

__all__ = ["SECURITY_HEADERS", "error_response", "error_status", "render", "surrogate_key"]

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox",
    "x-frame-options": "deny",
    "referrer-policy": "no-referrer",
}
# Stored headers that Moxy replaces with its own view (cache-control, age) or recomputes.
NOT_SENT = frozenset({"cache-control", "expires", "date", "age", "etag", "content-length"})
STREAM_CHUNK = 1024 * 1024
WHOLE_READ_BYTES = 4 * 1024 * 1024
UPSTREAM_ERROR_MAX_AGE = 10


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


def error_response(error: MoxyError, *, cache: str, head: bool = False) -> Response:
    status = error_status(error)
    kind = type(error).__name__
    reason = getattr(error, "reason", str(error))
    body = orjson.dumps({"error": kind, "reason": reason})
    headers = dict(SECURITY_HEADERS)
    # Errors the request caused must never be cached for everyone; upstream errors only briefly.
    headers["cache-control"] = "no-store" if status in (400, 403, 410) else f"public, max-age={UPSTREAM_ERROR_MAX_AGE}"
    headers["x-moxy-cache"] = cache
    headers["cache-status"] = f'moxy; fwd=uri-miss; detail="{reason}"' if status >= 500 else "moxy"
    return Response(b"" if head else body, status_code=status, headers=headers, media_type="application/json")


def surrogate_key(url: str) -> str:
    """The CDN purge key of an upstream URL: the same for all its variants, and no URL in the clear."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _last_modified(entry: Entry) -> str:
    """The upstream's Last-Modified, else when Moxy stored the copy: the date clients revalidate against."""
    return entry.header("last-modified") or formatdate(entry.stored_at, usegmt=True)


def _etag(digest: str) -> str:
    return f'"{digest[:32]}"'


def _entry_headers(served: Served, vary: str) -> dict[str, str]:
    entry = served.entry
    headers = {name: value for name, value in entry.headers if name not in NOT_SENT}
    headers.update(SECURITY_HEADERS)
    headers["etag"] = _etag(entry.digest)
    headers["last-modified"] = _last_modified(entry)
    # DESIGN section 6: the full lifetime with Age, never the remaining lifetime (a CDN subtracts Age itself).
    headers["cache-control"] = (
        f"public, max-age={int(entry.lifetime)}, stale-while-revalidate={int(entry.stale_while_revalidate)}, "
        f"stale-if-error={int(entry.stale_if_error)}"
    )
    if not served.stored:
        headers["cache-control"] = "private, no-store"
    headers["age"] = str(max(0, int(served.age)))
    headers["accept-ranges"] = "bytes"
    headers["surrogate-key"] = surrogate_key(entry.url)
    if vary:
        headers["vary"] = vary
    result = served.cache.value
    headers["x-moxy-cache"] = result
    status = {"HIT": "hit", "STALE": "hit", "REVALIDATED": "fwd=stale", "MISS": "fwd=uri-miss", "BYPASS": "fwd=bypass"}
    detail = f'; detail="{served.reason}"' if served.reason else ""
    headers["cache-status"] = f"moxy; {status[result]}; ttl={int(entry.lifetime - served.age)}{detail}"
    return headers


def _not_modified(request: Request, served: Served) -> bool:
    etag = _etag(served.entry.digest)
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        candidates = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
        return "*" in candidates or etag in candidates
    since = request.headers.get("if-modified-since")
    modified = _last_modified(served.entry)
    if since and modified:
        try:
            return parsedate_to_datetime(modified) <= parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False
    return False


def _byte_range(request: Request, served: Served, length: int) -> tuple[int, int] | None | str:
    """(start, end inclusive) for a satisfiable single range, "unsatisfiable", or None to send the whole body."""
    header = request.headers.get("range")
    if request.method != "GET":
        return None  # RFC 9110 §14.2: Range is ignored for every other method, HEAD included
    if not header or not header.startswith("bytes=") or "," in header:
        return None  # absent, malformed or multi-range: the full 200 is a correct answer
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != _etag(served.entry.digest):
        return None
    first, _, last = header[6:].strip().partition("-")
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            start, end = max(0, length - suffix), length - 1
        else:
            start = int(first)
            end = int(last) if last else length - 1
            if start > end and last:
                return None
            end = min(end, length - 1)
    except ValueError:
        return None
    if start >= length or length == 0:
        return "unsatisfiable"
    return start, end


async def _file_chunks(body: OpenBody, start: int, end: int) -> AsyncIterator[bytes]:
    position = start
    while position <= end:
        chunk = await asyncio.to_thread(body.read, position, min(STREAM_CHUNK, end + 1 - position))
        if not chunk:
            break
        position += len(chunk)
        yield chunk


class _FileRangeResponse(Response):
    """A body from a file small enough to read in one go: one thread hop and one send, instead of a stream
    of small reads (the disk-hit path for typical images)."""

    def __init__(self, body: OpenBody, start: int, end: int, **kwargs: Any) -> None:
        super().__init__(b"", **kwargs)
        self.file_body, self.start, self.end = body, start, end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content = await asyncio.to_thread(self.file_body.read, self.start, self.end + 1 - self.start)
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": content})


def render(request: Request, served: Served, vary: str) -> Response:
    headers = _entry_headers(served, vary)
    media_type = headers.pop("content-type", "application/octet-stream")
    head = request.method == "HEAD"
    if _not_modified(request, served):
        return Response(status_code=304, headers={k: v for k, v in headers.items() if k != "content-type"})
    length = served.entry.length
    chosen = _byte_range(request, served, length)
    status, start, end = 200, 0, length - 1
    if chosen == "unsatisfiable":
        headers["content-range"] = f"bytes */{length}"
        return Response(status_code=416, headers=headers)
    if isinstance(chosen, tuple):
        status, (start, end) = 206, chosen
        headers["content-range"] = f"bytes {start}-{end}/{length}"
    headers["content-length"] = str(max(0, end + 1 - start))
    body = served.body
    if head or length == 0:
        return Response(b"", status_code=status, headers=headers, media_type=media_type)
    if isinstance(body, bytes):
        content = body if status == 200 else body[start : end + 1]
        return Response(content, status_code=status, headers=headers, media_type=media_type)
    if end + 1 - start <= WHOLE_READ_BYTES:
        return _FileRangeResponse(body, start, end, status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(_file_chunks(body, start, end), status_code=status, headers=headers, media_type=media_type)

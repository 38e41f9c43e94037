"""Cross-origin reads of Moxy's answers (MOXY_CORS_ORIGINS): a plain ASGI layer in front of the proxy.

A page may show an image from anywhere, but a font, a JSON feed or an image drawn to a canvas is read by the page,
and a browser lets it only when the answer names the page's origin (the Fetch standard's CORS protocol). Every
answer Moxy gives an allowed origin says so, cached copies and errors alike, and a preflight for GET or HEAD is
answered here. With `*` the answer is the same for every page; with a list it depends on the request's Origin,
so it carries `Vary: Origin` and a CDN keeps one copy per origin.

Only the answers of the proxy are concerned: the operational endpoints (health, readiness, metrics, purge) are
not for pages, and say nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

__all__ = ["Cors"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_OPERATIONAL = frozenset({"/healthz", "/readyz", "/metrics", "/purge"})
# What a page's script may read besides the CORS-safelisted response headers: how the answer was cached, and the
# validators and ranges a client needs to make its own conditional and partial requests.
_EXPOSED = b"Age, Cache-Status, X-Moxy-Cache, ETag, Content-Range, Accept-Ranges"
# Request headers a preflight may ask for: those that change which answer of one entry comes back.
_ALLOWED_REQUEST_HEADERS = frozenset({"range", "if-none-match", "if-modified-since", "if-range", "accept"})
_ALLOWED_METHODS = frozenset({"GET", "HEAD"})
# A day: browsers cap it lower anyway (Chromium at two hours), and the answer to a preflight never changes
# while the configuration does not.
_PREFLIGHT_MAX_AGE = b"86400"
# The upstream's own CORS fields describe its origin, not Moxy's: with CORS configured here they are replaced.
_REPLACED = frozenset({b"access-control-allow-origin", b"timing-allow-origin", b"access-control-expose-headers"})


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return bytes(value)
    return None


class Cors:
    """Adds the CORS fields to the proxy's answers for the configured origins (`*` or a list)."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        self.any_origin = "*" in origins
        # Origins as browsers send them are ASCII (RFC 6454 §6.2: host in punycode) and compared case-insensitively.
        self.origins = frozenset(origin.lower().encode("ascii") for origin in origins if origin != "*")

    def allowed(self, origin: bytes | None) -> bytes | None:
        """The Access-Control-Allow-Origin value for a request from `origin`, or None."""
        if self.any_origin:
            return b"*"
        if origin is not None and origin.lower() in self.origins:
            return origin
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPERATIONAL:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        origin = _header(scope, b"origin")
        if method == "OPTIONS" and origin is not None and await self._preflight(scope, origin, send):
            return
        if method not in _ALLOWED_METHODS:
            await self.app(scope, receive, send)
            return
        fields = self._fields(self.allowed(origin))

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [pair for pair in message["headers"] if pair[0].lower() not in _REPLACED]
                message = {**message, "headers": _with_vary(headers, not self.any_origin) + fields}
            await send(message)

        await self.app(scope, receive, with_cors)

    def _fields(self, allowed: bytes | None) -> list[tuple[bytes, bytes]]:
        if allowed is None:
            return []
        return [
            (b"access-control-allow-origin", allowed),
            (b"timing-allow-origin", allowed),
            (b"access-control-expose-headers", _EXPOSED),
        ]

    async def _preflight(self, scope: Scope, origin: bytes, send: Send) -> bool:
        """Answer a CORS preflight for GET or HEAD from an allowed origin; False leaves the request to the app."""
        requested = (_header(scope, b"access-control-request-method") or b"").decode("latin-1").strip()
        allowed = self.allowed(origin)
        if allowed is None or requested not in _ALLOWED_METHODS:
            return False
        asked = (_header(scope, b"access-control-request-headers") or b"").decode("latin-1")
        names = [name.strip().lower() for name in asked.split(",") if name.strip()]
        if any(name not in _ALLOWED_REQUEST_HEADERS for name in names):
            return False
        headers = [
            (b"access-control-allow-origin", allowed),
            (b"access-control-allow-methods", b"GET, HEAD"),
            (b"access-control-max-age", _PREFLIGHT_MAX_AGE),
            (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
            (b"cache-control", b"no-store"),
            (b"content-length", b"0"),
        ]
        if names:
            headers.append((b"access-control-allow-headers", ", ".join(names).encode("latin-1")))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return True


def _with_vary(headers: list[tuple[bytes, bytes]], by_origin: bool) -> list[tuple[bytes, bytes]]:
    """`headers` with Origin added to Vary when the answer depends on it."""
    if not by_origin:
        return headers
    for position, (name, value) in enumerate(headers):
        if name.lower() == b"vary":
            if b"origin" not in {token.strip().lower() for token in value.split(b",")}:
                headers[position] = (name, value + b", Origin")
            return headers
    headers.append((b"vary", b"Origin"))
    return headers

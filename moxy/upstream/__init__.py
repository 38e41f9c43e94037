"""The upstream fetcher: redirects, the destination policy on every hop, header hygiene and the body size cap,
over an HTTP engine it is given. Imports no HTTP library itself; the built-in engines are `moxy.upstream.aiohttp` (the
default) and `moxy.upstream.h1`.

Every hop of a fetch (the first URL and each redirect) passes the destination policy, is resolved by the injected
resolver, and is handed to the engine with exactly the addresses the policy accepted: no DNS lookup happens after
the check. Without an injected `Engine`, the one named by `engine_name` (MOXY_UPSTREAM_ENGINE) is built lazily
inside the running loop; `bench/upstream_client.py` measures each against the bare clients.

Failures are raised as `UpstreamError(reason)` / `UpstreamTimeout(reason)` with one of the short, stable reason
codes below (they become metrics labels); statuses, including 304 and 4xx/5xx, are returned, not raised."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urljoin, urlsplit

from moxy.body import MEMORY_BODY_BYTES, Spool
from moxy.errors import MoxyError, UpstreamError, UpstreamTimeout
from moxy.fields import OWS, valid_field_name, valid_field_value
from moxy.hosts import HostBusy, HostGate, HostUnavailable
from moxy.upstream.aiohttp import AiohttpEngine
from moxy.upstream.egress import ForwardProxy
from moxy.upstream.h1 import H1Engine

if TYPE_CHECKING:
    from moxy.policy import DestinationPolicy

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "REASONS",
    "Engine",
    "Resolver",
    "Upstream",
    "UpstreamResponse",
    "Wire",
    "default_resolver",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> IP address strings. Injected so tests (and the policy) decide what a name means."""

# The reason codes this module raises; stable, because dashboards and alerts key on them.
REASONS: frozenset[str] = frozenset(
    {
        "dns-failed",  # the name did not resolve (or resolved to nothing)
        "dns-timeout",  # resolving took longer than connect_timeout
        "connect-failed",  # refused, unreachable, reset while connecting
        "connect-timeout",
        "tls-error",  # handshake or certificate verification failed
        "read-timeout",  # no byte for read_timeout seconds (headers or body)
        "total-timeout",  # the whole fetch (redirects and body included) took longer than total_timeout
        "disconnected",  # the upstream closed the connection before a complete response head
        "protocol-error",  # not HTTP/1.1 we can parse (bad status line, oversized headers, ...)
        "truncated",  # body shorter than its Content-Length (or longer, when the surplus is seen), cut mid-body
        "bad-chunking",  # malformed chunked transfer coding
        "bad-encoding",  # the Content-Encoding could not be decoded
        "too-large",  # body over max_body_bytes, or a decompression bomb (the connection is closed, not drained)
        "spool-failed",  # the cache folder took no spool write and the body is too big to hold in memory instead
        "too-many-redirects",
        "bad-redirect",  # Location is not an absolute or relative http(s) URL
        "transport-error",  # anything else the HTTP engine raised
        "host-busy",  # every slot of this upstream host stayed taken for the whole queue wait
        "host-unavailable",  # the host failed too often in a row; its circuit breaker is open for a cool-down
        "proxy-failed",  # the forward proxy (MOXY_UPSTREAM_PROXY) could not be reached
        "proxy-refused",  # it would not forward: 407 (credentials), or a CONNECT answered with an error
    }
)
# Failures that say the host itself is in trouble (no answer at all), which feed its circuit breaker. An error
# status, a refused body or a redirect problem is an answer: the host is alive and fast enough.
HOST_FAILURES: frozenset[str] = frozenset(
    {"connect-failed", "connect-timeout", "tls-error", "read-timeout", "total-timeout", "disconnected", "truncated"}
)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Bodies of answers the proxy will not store (4xx/5xx, a 3xx that is not followed) are only read this far:
# the proxy needs the status, not megabytes of an error page.
ERROR_BODY_BYTES = 64 * 1024

# RFC 9110 §7.6.1: hop-by-hop fields, plus the names a Connection field lists (handled in _clean_response_headers).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
# The body handed over is decoded, so the wire's framing and coding fields no longer describe it.
DROPPED_RESPONSE = HOP_BY_HOP | {"set-cookie", "set-cookie2", "content-encoding", "content-length"}
# Credentials never cross, whatever the caller passed: an upstream must never see a client's cookies or tokens.
# Host and framing are the engine's business.
DROPPED_REQUEST = HOP_BY_HOP | {
    "cookie",
    "cookie2",
    "authorization",
    "proxy-authorization",
    "host",
    "content-length",
    "accept-encoding",
    "user-agent",
    "via",
    "expect",
}


def _accept_encoding() -> str:
    # Offer only codings the engine can decode here: aiohttp decodes brotli only when a brotli package is installed.
    codings = ["gzip", "deflate"]
    if importlib.util.find_spec("brotli") is not None or importlib.util.find_spec("brotlicffi") is not None:
        codings.append("br")
    return ", ".join(codings)


ACCEPT_ENCODING = _accept_encoding()


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """The final answer of a fetch, redirects followed. Exactly one of `body` / `body_path` is set, unless the
    answer has no body at all (HEAD, 204, 304), in which case `body` is b""."""

    url: str
    status: int
    headers: dict[str, str]
    body: bytes | None
    body_path: str | None
    length: int
    declared_length: int | None  # the Content-Length, when it counts the bytes of `body` (no content coding)
    request_time: float
    response_time: float


async def default_resolver(host: str, port: int) -> list[str]:
    """Resolve with the loop's getaddrinfo (a thread), returning each distinct address once, in order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for _family, _type, _proto, _canonname, sockaddr in infos:
        seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


# -- the engine seam ------------------------------------------------------------------------------------------


class Wire(Protocol):
    """One response whose head has arrived and whose body is still on the wire."""

    status: int
    raw_headers: list[tuple[str, str]]

    def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body, decoded from its Content-Encoding, in pieces; nothing for HEAD, 1xx, 204 and 304. Failures are
        raised as UpstreamError / UpstreamTimeout with a code from REASONS."""
        ...

    async def abort(self) -> None:
        """Close the connection without reading further (never returned to the pool)."""
        ...


class Engine(Protocol):
    """What speaks HTTP on the wire: one of ENGINES in production, fakes in the tests."""

    async def send(self, method: str, url: str, headers: list[tuple[str, str]], pinned: list[IPAddress]) -> Wire:
        """Send one request and return once its head has arrived. Connects only to `pinned` (the checked
        addresses: no DNS lookup of its own), sends exactly `headers` plus Host and framing, follows no redirect.
        Failures are raised as UpstreamError / UpstreamTimeout with a code from REASONS."""
        ...

    async def aclose(self) -> None: ...


# The built-in engines, by the name MOXY_UPSTREAM_ENGINE gives: `aiohttp` (moxy/upstream/aiohttp.py) and `h1`
# (moxy/upstream/h1.py, HTTP/1.1 on httptools: about half the fetcher's CPU per request and a third of the engine's
# own, bench/upstream_client.py). Both run the same wire tests (tests/integration/engines.py); aiohttp stays the
# default until h1 also keeps the bound on what an endless body pulls past the cap under load (test_hostile_upstream).
ENGINES: dict[str, type[AiohttpEngine] | type[H1Engine]] = {"aiohttp": AiohttpEngine, "h1": H1Engine}
DEFAULT_ENGINE = "aiohttp"


# -- headers ---------------------------------------------------------------------------------------------------------


def _request_headers(given: Mapping[str, str], user_agent: str, via: str) -> list[tuple[str, str]]:
    headers = [(name, value) for name, value in given.items() if name.lower() not in DROPPED_REQUEST]
    headers += [("User-Agent", user_agent), ("Via", via), ("Accept-Encoding", ACCEPT_ENCODING)]
    return headers


def _response_headers(raw: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Lowercase names, repeats joined with ", " (RFC 9110 §5.3), hop-by-hop and wire-only fields removed, and
    every field whose name or value breaks the RFC 9110 grammar dropped: it could never be sent on, and a stored
    one would turn every later answer for the URL into an empty reply. A field dropped here is absent for every
    later step; a missing Content-Type, say, then fails validation like any answer without one."""
    listed: set[str] = set()
    for name, value in raw:
        if name.lower() == "connection":
            # RFC 9110 §7.6.1: the fields a Connection header names are hop-by-hop too.
            listed.update(token.strip(OWS).lower() for token in value.split(",") if token.strip(OWS))
    headers: dict[str, str] = {}
    poisoned: set[str] = set()
    for name, value in raw:
        key = name.lower()
        if key in DROPPED_RESPONSE or key in listed or key.startswith("proxy-"):
            continue
        value = value.strip(OWS)
        if not valid_field_name(key) or not valid_field_value(value):
            # One bad line spoils the field: joining the good repeats alone would change what it says.
            poisoned.add(key)
            continue
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    for key in poisoned:
        headers.pop(key, None)
    if "vary" in poisoned or "vary" in listed:
        # An answer whose Vary cannot be read might depend on anything the client sent: taken as `Vary: *`, it is
        # passed on but never stored nor shared, rather than cached as one copy for every client.
        headers["vary"] = "*"
    return headers


def _declared_length(raw: Sequence[tuple[str, str]]) -> int | None:
    values = {value.strip(OWS) for name, value in raw if name.lower() == "content-length"}
    if len(values) != 1:
        return None
    value = values.pop()
    # RFC 9110 §8.6: ASCII digits only (str.isdigit() also takes "²" and "١"); a length past 10^18 is not one
    # any engine would frame, and int() on thousands of digits is itself slow.
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        return None
    return int(value)


def _content_coded(raw: Sequence[tuple[str, str]]) -> bool:
    for name, value in raw:
        if name.lower() == "content-encoding" and value.strip().lower() not in ("", "identity"):
            return True
    return False


def _location(raw: Sequence[tuple[str, str]]) -> str | None:
    for name, value in raw:
        if name.lower() == "location":
            return value.strip(OWS)
    return None


def _with_authority(url: str, authority: str) -> str:
    """`url` with its authority replaced, all else byte for byte. WHATWG URL parsing canonicalises the host the
    same way (`2130706433` -> `127.0.0.1`, IDN -> punycode), so this is the URL a browser would request; and the
    engine then connects by exactly the name the policy judged."""
    scheme_end = url.index("://") + 3
    end = len(url)
    for stop in "/?#":
        found = url.find(stop, scheme_end)
        if found != -1:
            end = min(end, found)
    return url[:scheme_end] + authority + url[end:]


# -- the fetcher -----------------------------------------------------------------------------------------------------


class Upstream:
    """One per worker: the fetch rules over one engine. `engine` is used as given (and closed by `aclose()`, after
    which a fetch uses it again); without one, the pooled engine named by `engine_name` (DEFAULT_ENGINE if none) is
    created lazily inside the running loop, and again after each `aclose()`."""

    def __init__(
        self,
        *,
        policy: DestinationPolicy,
        connect_timeout: float,
        read_timeout: float,
        total_timeout: float,
        max_body_bytes: int,
        max_redirects: int,
        user_agent: str,
        via: str = "1.1 moxy",
        spool_dir: Path,
        memory_body_bytes: int = MEMORY_BODY_BYTES,
        resolver: Resolver | None = None,
        engine: Engine | None = None,
        engine_name: str | None = None,
        host_concurrency: int = 64,
        host_queue_timeout: float = 5.0,
        breaker_failures: int = 5,
        breaker_cooldown: float = 10.0,
        ca_file: Path | None = None,
        proxy: ForwardProxy | None = None,
        on_spool_failure: Callable[[OSError], None] | None = None,
    ) -> None:
        self.policy = policy
        # MOXY_UPSTREAM_PROXY: the built-in engines send every request through it (moxy.upstream.egress). Its own
        # address is the operator's choice and exempt from the policy; every target is checked here all the same,
        # before anything is sent (`_check`).
        self.proxy = proxy
        # The system's trust store, plus the operator's extra CAs (MOXY_UPSTREAM_CA_FILE): added, never replacing
        # it, so public upstreams keep working next to an internal CA. Built once (loading the system store takes
        # tens of ms), and only for a built-in engine: an injected engine does its own TLS, if any.
        self.ssl_context: ssl.SSLContext | None = None
        if engine is None:
            self.ssl_context = ssl.create_default_context()
            if ca_file is not None:
                self.ssl_context.load_verify_locations(cafile=ca_file)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout
        self.max_body_bytes = max_body_bytes
        self.max_redirects = max_redirects
        self.user_agent = user_agent
        self.via = via
        self.spool_dir = Path(spool_dir)
        self.memory_body_bytes = memory_body_bytes
        self.resolver: Resolver = resolver if resolver is not None else default_resolver
        self._given_engine = engine
        # Read when the engine is built (DEFAULT_ENGINE at that moment when none is named).
        if engine_name is not None and engine_name not in ENGINES:
            raise ValueError(f"unknown upstream engine {engine_name!r}; one of {', '.join(ENGINES)}")
        self.engine_name = engine_name
        self._on_spool_failure = on_spool_failure
        # The pool itself is unbounded: a shared bound is what let slow hosts starve the others. Each host gets a
        # fair share instead, and the total is bounded by the requests the server admits (one fetch per key).
        self.gate = HostGate(
            per_host=host_concurrency,
            wait_timeout=host_queue_timeout,
            failure_threshold=breaker_failures,
            cooldown=breaker_cooldown,
            clock=time.monotonic,
        )
        self._engine: Engine | None = None

    def _get_engine(self) -> Engine:
        if self._engine is None:
            if self._given_engine is not None:
                self._engine = self._given_engine
            else:
                assert self.ssl_context is not None  # built in __init__ whenever no engine is injected
                self._engine = ENGINES[self.engine_name or DEFAULT_ENGINE](
                    connect_timeout=self.connect_timeout,
                    read_timeout=self.read_timeout,
                    limit=0,
                    limit_per_host=0,
                    ssl_context=self.ssl_context,
                    proxy=self.proxy,
                )
        return self._engine

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.aclose()

    async def fetch(self, url: str, headers: Mapping[str, str], *, method: str = "GET") -> UpstreamResponse:
        """Fetch `url`, following redirects under the policy. `headers` are the forwarded client headers plus
        any conditional ones; credentials among them are dropped. Raises DestinationRefused before connecting,
        UpstreamTimeout / UpstreamError with a code from REASONS."""
        timeout = asyncio.timeout(self.total_timeout)
        hop: list[str] = []  # the authority being fetched, so a total timeout is held against the right host
        try:
            async with timeout:
                return await self._fetch(url, headers, method.upper(), hop)
        except TimeoutError as exc:
            if timeout.expired():
                if hop:
                    self.gate.failed(hop[-1])
                raise UpstreamTimeout("total-timeout") from exc
            raise UpstreamTimeout("read-timeout") from exc

    async def _fetch(self, url: str, given: Mapping[str, str], method: str, hop: list[str]) -> UpstreamResponse:
        headers = _request_headers(given, self.user_agent, self.via)
        engine = self._get_engine()
        redirects = 0
        while True:
            url, pinned, authority = await self._check(url)
            hop.append(authority)
            try:
                async with self.gate.slot(authority):
                    answer = await self._hop(engine, method, url, headers, pinned)
            except HostBusy as exc:
                raise UpstreamTimeout("host-busy") from exc
            except HostUnavailable as exc:
                raise UpstreamError("host-unavailable") from exc
            except UpstreamError as exc:
                if exc.reason in HOST_FAILURES:
                    self.gate.failed(authority)
                raise
            self.gate.succeeded(authority)
            if isinstance(answer, UpstreamResponse):
                return answer
            location, status = answer
            redirects += 1
            if redirects > self.max_redirects:
                raise UpstreamError("too-many-redirects", status=status)
            url = self._follow(url, location)

    async def _hop(
        self, engine: Engine, method: str, url: str, headers: list[tuple[str, str]], pinned: list[IPAddress]
    ) -> UpstreamResponse | tuple[str, int]:
        """One request: the final answer, or the Location and status of a redirect to follow."""
        request_time = time.time()
        wire = await engine.send(method, url, headers, pinned)
        response_time = time.time()
        location = _location(wire.raw_headers) if wire.status in REDIRECT_STATUSES else None
        if location is None:
            return await self._read(url, wire, method, request_time, response_time)
        # A redirect body is never needed; dropping the connection is cheaper than draining an unknown size.
        await wire.abort()
        return location, wire.status

    @staticmethod
    def _follow(current: str, location: str) -> str:
        # RFC 9110 §10.2.2: Location may be relative; it resolves against the URL that answered. A URI reference
        # holds no whitespace or control characters (RFC 3986 §2); urllib would silently drop some of them, so the
        # URL followed would not be the one the upstream sent.
        if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in location):
            raise UpstreamError("bad-redirect")
        try:
            target = urljoin(current, location)
            parts = urlsplit(target)
        except ValueError as exc:
            raise UpstreamError("bad-redirect") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError("bad-redirect")
        # The fragment is the client's business (RFC 9110 §10.2.2) and never goes on the wire.
        return target.split("#", 1)[0]

    async def _check(self, url: str) -> tuple[str, list[IPAddress], str]:
        """Policy, then resolution, then policy on the addresses: what comes back is all we may connect to,
        with the URL whose authority is rewritten to the policy's normalised form (the one that was checked),
        and that authority."""
        target = self.policy.check_url(url)
        url = _with_authority(url, target.authority)
        if target.address is not None:
            return url, self.policy.choose_addresses(target, []), target.authority
        try:
            async with asyncio.timeout(self.connect_timeout):
                resolved = await self.resolver(target.host, target.port)
        except TimeoutError as exc:
            raise UpstreamTimeout("dns-timeout") from exc
        except MoxyError:
            raise
        except (OSError, UnicodeError) as exc:
            raise UpstreamError("dns-failed") from exc
        if not resolved:
            raise UpstreamError("dns-failed")
        return url, self.policy.choose_addresses(target, resolved), target.authority

    async def _read(
        self, url: str, wire: Wire, method: str, request_time: float, response_time: float
    ) -> UpstreamResponse:
        raw = wire.raw_headers
        declared = _declared_length(raw)
        coded = _content_coded(raw)
        status = wire.status
        no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        storable = 200 <= status < 300
        limit = self.max_body_bytes if storable else min(self.max_body_bytes, ERROR_BODY_BYTES)
        # An error page sample (<= ERROR_BODY_BYTES) is small enough to stay in memory whatever the threshold.
        spool = Spool(self.spool_dir, self.memory_body_bytes if storable else ERROR_BODY_BYTES, self._on_spool_failure)
        complete = False
        try:
            if storable and declared is not None and not coded and not no_body and declared > limit:
                # Without a content coding the wire length is the body length: refuse before reading a byte.
                raise UpstreamError("too-large", status=status)
            # Engines know HEAD/204/304 carry no body, so this loop is empty for them and releases the connection.
            async with contextlib.aclosing(wire.chunks()) as chunks:
                async for chunk in chunks:
                    if spool.length + len(chunk) > limit:
                        if storable:
                            raise UpstreamError("too-large", status=status)
                        # An error page is only kept as a sample; its tail is not worth the bandwidth.
                        await spool.add(chunk[: limit - spool.length])
                        await wire.abort()
                        break
                    await spool.add(chunk)
                else:
                    if declared is not None and not coded and not no_body and spool.length != declared:
                        raise UpstreamError("truncated", status=status)
            body, body_path = await spool.finish()
            complete = True
        finally:
            if not complete:
                await wire.abort()
                await spool.discard()
        return UpstreamResponse(
            url=url,
            status=status,
            headers=_response_headers(raw),
            body=body,
            body_path=body_path,
            length=spool.length,
            # With a content coding the wire length describes the coded bytes, not the decoded body handed over.
            declared_length=None if coded else declared,
            request_time=request_time,
            response_time=response_time,
        )

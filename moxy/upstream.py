"""The upstream fetcher: the only room that speaks HTTP to the outside world (httpx and aiohttp live here only).

Every hop of a fetch (the first URL and each redirect) passes the destination policy, is resolved by the injected
resolver, and is connected to exactly the addresses the policy accepted: no DNS lookup happens after the check.
The engine underneath is aiohttp (about 15x faster than httpx's pool on the miss path, see PERF.md); an injected
httpx transport replaces it, which is how the unit tests drive the fetcher without sockets.

Failures are raised as `UpstreamError(reason)` / `UpstreamTimeout(reason)` with one of the short, stable reason
codes below (they become metrics labels); statuses, including 304 and 4xx/5xx, are returned, not raised."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib.util
import ipaddress
import os
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
import httpx
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

from moxy.errors import MoxyError, UpstreamError, UpstreamTimeout
from moxy.fields import OWS, valid_field_name, valid_field_value
from moxy.hosts import HostBusy, HostGate, HostUnavailable

if TYPE_CHECKING:
    from moxy.policy import DestinationPolicy

__all__ = [
    "REASONS",
    "Resolver",
    "Upstream",
    "UpstreamResponse",
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
# Spooled bodies are written in batches of this size, each in a worker thread, so the loop never blocks on disk.
SPOOL_WRITE_BYTES = 1024 * 1024

# RFC 9110 §7.6.1: hop-by-hop fields, plus the names a Connection field lists (handled in _clean_response_headers).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
# The body handed over is decoded, so the wire's framing and coding fields no longer describe it.
DROPPED_RESPONSE = HOP_BY_HOP | {"set-cookie", "set-cookie2", "content-encoding", "content-length"}
# Credentials never cross (DESIGN §3.4), whatever the caller passed; Host/framing are the engine's business.
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
    # Offer only codings both engines can decode here: brotli is optional for aiohttp and httpx alike.
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


# -- engines -------------------------------------------------------------------------------------------------------


class _Wire(Protocol):
    """One response whose head has arrived and whose body is still on the wire."""

    status: int
    raw_headers: list[tuple[str, str]]

    def chunks(self) -> AsyncGenerator[bytes, None]:
        """Decoded body chunks; engine errors are already mapped to UpstreamError."""
        ...

    async def abort(self) -> None:
        """Close the connection without reading further (never returned to the pool)."""
        ...


class _Engine(Protocol):
    async def send(self, method: str, url: str, headers: list[tuple[str, str]], pinned: list[IPAddress]) -> _Wire: ...

    async def aclose(self) -> None: ...


# The addresses the policy accepted for the hop being connected right now. A context variable, not an attribute,
# so concurrent fetches on one session never see each other's pins (aiohttp resolves inside the caller's task).
_PINNED: contextvars.ContextVar[tuple[IPAddress, ...] | None] = contextvars.ContextVar(
    "moxy_upstream_pinned", default=None
)


class _PinnedResolver(AbstractResolver):
    """aiohttp resolver that answers only with the checked addresses of the current hop and never asks DNS."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        pinned = _PINNED.get()
        if pinned is None:
            # Fail closed: a lookup we did not check must never turn into a connection.
            raise OSError(f"no checked address for {host!r}")
        return [
            {
                "hostname": host,
                "host": str(address),
                "port": port,
                "family": socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in pinned
        ]

    async def close(self) -> None:
        return None


def _aiohttp_reason(exc: BaseException, *, in_body: bool) -> UpstreamError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout("connect-timeout")
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return UpstreamTimeout("read-timeout")
    if isinstance(exc, aiohttp.ClientPayloadError):
        cause = exc.__cause__
        if isinstance(cause, aiohttp.http_exceptions.DecompressSizeError):
            return UpstreamError("too-large")  # a decompression bomb, stopped by aiohttp's own per-chunk limit
        if isinstance(cause, aiohttp.http_exceptions.ContentEncodingError):
            return UpstreamError("bad-encoding")
        if isinstance(cause, aiohttp.http_exceptions.TransferEncodingError) and "Not enough data" not in str(cause):
            return UpstreamError("bad-chunking")
        return UpstreamError("truncated")
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch):
        return UpstreamError("tls-error")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError("connect-failed")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | ConnectionError):
        return UpstreamError("truncated" if in_body else "disconnected")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamError("protocol-error")
    return UpstreamError("transport-error")


class _AiohttpWire:
    __slots__ = ("protocol", "raw_headers", "response", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.raw_headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response.raw_headers]
        # Kept because aiohttp hands the connection back to its pool the moment the body ends.
        connection = response.connection
        self.protocol = connection.protocol if connection is not None else None

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        content = self.response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                yield chunk
        except (aiohttp.ClientError, OSError) as exc:
            raise _aiohttp_reason(exc, in_body=True) from exc
        # Bytes past the declared Content-Length fail to parse as a next message after the body has ended
        # cleanly; that parse failure is the only sign the upstream sent more than it announced (a length lie).
        # Only a parse failure counts: a server that closes after a complete body (HTTP/1.0 style, or
        # `Connection: close`) leaves a disconnect error here too, and that answer is whole.
        if self.protocol is not None and isinstance(
            self.protocol.exception(), aiohttp.http_exceptions.HttpProcessingError
        ):
            raise UpstreamError("protocol-error")

    async def abort(self) -> None:
        self.response.close()


class _AiohttpEngine:
    """aiohttp underneath, one pooled session, DNS replaced by the pinned resolver."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        limit: int,
        limit_per_host: int,
        ssl_context: ssl.SSLContext,
    ) -> None:
        connector = aiohttp.TCPConnector(
            resolver=_PinnedResolver(),
            # The name checked against the certificate (and sent as SNI) is the URL's host, never the pinned address.
            ssl=ssl_context,
            use_dns_cache=False,  # a cache would answer from an earlier hop's check
            limit=limit,
            limit_per_host=limit_per_host,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout),
            cookie_jar=aiohttp.DummyCookieJar(),  # cookies never cross, not even between upstreams
            auto_decompress=True,
            trust_env=False,  # no proxy from the environment may sit between us and the checked address
            skip_auto_headers=("Accept",),  # send only what the caller forwarded: it is part of the cache key
            raise_for_status=False,
        )

    async def send(self, method: str, url: str, headers: list[tuple[str, str]], pinned: list[IPAddress]) -> _Wire:
        # encoded=True sends the signed URL as it is, instead of yarl's re-quoting (which could change its meaning).
        target = yarl.URL(url, encoded=True) if url.isascii() else yarl.URL(url)
        # Set around exactly one request (aiohttp follows no redirects here), so the pin cannot leak to another URL.
        token = _PINNED.set(tuple(pinned))
        try:
            response = await self._session.request(
                method, target, headers=headers, allow_redirects=False, read_until_eof=True
            )
        except (aiohttp.ClientError, OSError) as exc:
            raise _aiohttp_reason(exc, in_body=False) from exc
        finally:
            _PINNED.reset(token)
        return _AiohttpWire(response)

    async def aclose(self) -> None:
        await self._session.close()


def _httpx_reason(exc: httpx.TransportError, *, in_body: bool) -> UpstreamError:
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamTimeout("connect-timeout")
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout("read-timeout")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamError("connect-failed")
    if isinstance(exc, httpx.DecodingError):
        return UpstreamError("bad-encoding")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return UpstreamError("truncated" if in_body else "disconnected")
    return UpstreamError("transport-error")


class _HttpxWire:
    __slots__ = ("raw_headers", "response", "status")

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status = response.status_code
        self.raw_headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response.headers.raw]

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self.response.aiter_bytes():
                yield chunk
        except httpx.DecodingError as exc:
            raise UpstreamError("bad-encoding") from exc
        except httpx.TransportError as exc:
            raise _httpx_reason(exc, in_body=True) from exc
        finally:
            await self.response.aclose()

    async def abort(self) -> None:
        await self.response.aclose()


class _HttpxEngine:
    """httpx over an injected transport (tests: httpx.MockTransport). Pinning is the transport's business."""

    def __init__(self, transport: httpx.AsyncBaseTransport, *, connect_timeout: float, read_timeout: float) -> None:
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=None),
        )
        # httpx adds Accept/Accept-Encoding/User-Agent/Connection defaults; send only what fetch() decided.
        self._client.headers.clear()

    async def send(self, method: str, url: str, headers: list[tuple[str, str]], pinned: list[IPAddress]) -> _Wire:
        request = self._client.build_request(method, url, headers=headers)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _httpx_reason(exc, in_body=False) from exc
        except httpx.InvalidURL as exc:
            # httpx parses a redirect's Location even when it does not follow it.
            raise UpstreamError("bad-redirect") from exc
        return _HttpxWire(response)

    async def aclose(self) -> None:
        await self._client.aclose()


# -- the body --------------------------------------------------------------------------------------------------------


class _BodySink:
    """Holds a streaming body in memory up to `memory_limit`, then in a spool file written from a worker thread.

    The spool folder lives in the cache folder and, like the disk tier, is an optimisation: when it takes no
    writes (full, read-only, failing), the body is brought back into memory and kept there up to
    `FALLBACK_BYTES`, so the answer is still served. A body past that bound is refused as
    UpstreamError("spool-failed") (a 502, or the stale copy when there is one), never a 500: holding up to
    `max_body_bytes` (50 MiB by default) per concurrent miss in memory is how a full disk would become an
    out-of-memory kill of every request of the worker. `on_failure` hears of each spool failure."""

    # 8x the usual in-memory threshold: nearly every image and font fits, and a few dozen concurrent large misses
    # during a disk fault stay within a few hundred MiB.
    FALLBACK_BYTES = 16 * 1024 * 1024

    def __init__(self, spool_dir: Path, memory_limit: int, on_failure: Callable[[OSError], None] | None = None) -> None:
        self._spool_dir = spool_dir
        self._memory_limit = memory_limit
        self._on_failure = on_failure
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.length = 0
        self._file: tempfile._TemporaryFileWrapper[bytes] | None = None
        self._spooled = 0  # bytes known to be in the spool file
        self.spool_error: OSError | None = None  # set once spooling failed: the body stays in memory from then on

    async def add(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        self.length += len(chunk)
        if self._file is None and self.spool_error is None and self.length > self._memory_limit:
            try:
                # Created inline (one quick syscall, no await): a cancellation can then never orphan the file.
                # Unbuffered, so a failed write leaves exactly `_spooled` bytes to read back.
                self._file = tempfile.NamedTemporaryFile(
                    dir=self._spool_dir, prefix="moxy-spool-", delete=False, buffering=0
                )
            except OSError as exc:
                await self._stop_spooling(exc, b"")
        if self._file is not None and self._pending_bytes >= SPOOL_WRITE_BYTES:
            await self._write_pending()
        if self.spool_error is not None and self.length > self.FALLBACK_BYTES:
            raise UpstreamError("spool-failed") from self.spool_error

    async def _write_pending(self) -> None:
        assert self._file is not None
        data, self._pending, self._pending_bytes = b"".join(self._pending), [], 0
        before = self._spooled
        try:
            await asyncio.to_thread(self._write_all, self._file, data)
        except OSError as exc:
            await self._stop_spooling(exc, data[self._spooled - before :])

    def _write_all(self, file: tempfile._TemporaryFileWrapper[bytes], data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = file.write(view)  # raw file: may write part of it
            self._spooled += written
            view = view[written:]

    async def _stop_spooling(self, exc: OSError, unwritten: bytes) -> None:
        """Spooling failed: the body so far goes back into memory (within bound) and the spool file away."""
        self.spool_error = exc
        if self._on_failure is not None:
            self._on_failure(exc)
        if self.length > self.FALLBACK_BYTES:
            raise UpstreamError("spool-failed") from exc  # the caller's discard() removes the file
        head = b""
        if self._file is not None:
            try:
                head = await asyncio.to_thread(_read_spooled, self._file.name, self._spooled)
            except OSError as read_error:
                raise UpstreamError("spool-failed") from read_error
            file, self._file = self._file, None
            await asyncio.to_thread(_close_and_unlink, file)
        self._pending = [head, unwritten, *self._pending]
        self._pending_bytes = sum(len(part) for part in self._pending)

    async def finish(self) -> tuple[bytes | None, str | None]:
        if self._file is not None:
            await self._write_pending()
        if self._file is not None:
            try:
                await asyncio.to_thread(self._file.close)
            except OSError as exc:
                await self._stop_spooling(exc, b"")
        if self._file is None:
            return b"".join(self._pending), None
        return None, self._file.name

    async def discard(self) -> None:
        self._pending.clear()
        if self._file is not None:
            file, self._file = self._file, None
            await asyncio.to_thread(_close_and_unlink, file)


def _read_spooled(path: str, length: int) -> bytes:
    parts: list[bytes] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < length:
            chunk = os.pread(fd, length - offset, offset)
            if not chunk:
                raise OSError(f"spool file {path} shorter than the {length} bytes written to it")
            parts.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    return b"".join(parts)


def _close_and_unlink(file: tempfile._TemporaryFileWrapper[bytes]) -> None:
    # The file goes even when closing it fails (a deferred write error); on a folder that turned read-only the
    # unlink fails too, and the start-up sweep of temp files removes it later.
    try:
        file.close()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.unlink(file.name)


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
    """One per worker: a pooled HTTP client (created lazily inside the running loop) plus the fetch rules."""

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
        memory_body_bytes: int = 2 * 1024 * 1024,
        resolver: Resolver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        host_concurrency: int = 64,
        host_queue_timeout: float = 5.0,
        breaker_failures: int = 5,
        breaker_cooldown: float = 10.0,
        ca_file: Path | None = None,
        on_spool_failure: Callable[[OSError], None] | None = None,
    ) -> None:
        self.policy = policy
        # The system's trust store, plus the operator's extra CAs (MOXY_UPSTREAM_CA_FILE): added, never replacing
        # it, so public upstreams keep working next to an internal CA. Built once (loading the system store takes
        # tens of ms), and only for the real engine: an injected transport does its own TLS, if any.
        self.ssl_context: ssl.SSLContext | None = None
        if transport is None:
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
        self._transport = transport
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
        self._engine: _Engine | None = None

    def _get_engine(self) -> _Engine:
        if self._engine is None:
            if self._transport is not None:
                self._engine = _HttpxEngine(
                    self._transport, connect_timeout=self.connect_timeout, read_timeout=self.read_timeout
                )
            else:
                assert self.ssl_context is not None  # built in __init__ whenever no transport is injected
                self._engine = _AiohttpEngine(
                    connect_timeout=self.connect_timeout,
                    read_timeout=self.read_timeout,
                    limit=0,
                    limit_per_host=0,
                    ssl_context=self.ssl_context,
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
        self, engine: _Engine, method: str, url: str, headers: list[tuple[str, str]], pinned: list[IPAddress]
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
        self, url: str, wire: _Wire, method: str, request_time: float, response_time: float
    ) -> UpstreamResponse:
        raw = wire.raw_headers
        declared = _declared_length(raw)
        coded = _content_coded(raw)
        status = wire.status
        no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        storable = 200 <= status < 300
        limit = self.max_body_bytes if storable else min(self.max_body_bytes, ERROR_BODY_BYTES)
        # An error page sample (<= ERROR_BODY_BYTES) is small enough to stay in memory whatever the threshold.
        sink = _BodySink(
            self.spool_dir, self.memory_body_bytes if storable else ERROR_BODY_BYTES, self._on_spool_failure
        )
        complete = False
        try:
            if storable and declared is not None and not coded and not no_body and declared > limit:
                # Without a content coding the wire length is the body length: refuse before reading a byte.
                raise UpstreamError("too-large", status=status)
            # Engines know HEAD/204/304 carry no body, so this loop is empty for them and releases the connection.
            async with contextlib.aclosing(wire.chunks()) as chunks:
                async for chunk in chunks:
                    if sink.length + len(chunk) > limit:
                        if storable:
                            raise UpstreamError("too-large", status=status)
                        # An error page is only kept as a sample; its tail is not worth the bandwidth.
                        await sink.add(chunk[: limit - sink.length])
                        await wire.abort()
                        break
                    await sink.add(chunk)
                else:
                    if declared is not None and not coded and not no_body and sink.length != declared:
                        raise UpstreamError("truncated", status=status)
            body, body_path = await sink.finish()
            complete = True
        finally:
            if not complete:
                await wire.abort()
                await sink.discard()
        return UpstreamResponse(
            url=url,
            status=status,
            headers=_response_headers(raw),
            body=body,
            body_path=body_path,
            length=sink.length,
            # With a content coding the wire length describes the coded bytes, not the decoded body handed over.
            declared_length=None if coded else declared,
            request_time=request_time,
            response_time=response_time,
        )

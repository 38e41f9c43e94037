"""The lean engine of the fetcher: HTTP/1.1 on a bare asyncio Protocol and httptools' response parser (llhttp, the
parser uvicorn already ships). The only module that imports httptools; only `moxy.upstream` imports it.

Same contract as `moxy.upstream.aiohttp.AiohttpEngine`: exactly one request per `send` (no redirects), connections
only to the pinned addresses of that hop (or through the forward proxy, as moxy.upstream.egress says), TLS named and
verified by the URL's host, the body decoded from its Content-Encoding in bounded pieces, and every failure an
`UpstreamError` with a code from `moxy.upstream.REASONS`. It exists because the client is a large share of a miss's
CPU (docs/performance.md, "Where the time goes")."""

from __future__ import annotations

import asyncio
import collections
import functools
import importlib
import socket
import ssl
import zlib
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httptools

from moxy.errors import UpstreamError, UpstreamTimeout
from moxy.upstream.egress import ForwardProxy, connect_request

if TYPE_CHECKING:
    from moxy.policy import IPAddress

__all__ = ["H1Engine"]

# Bounds of a response head, as the aiohttp engine has them (its parser's defaults): a status line or a field name
# or value past 8190 bytes, or more than 128 fields, is a protocol error. The head as a whole is bounded by what
# those allow, so a head that never ends costs at most this much memory before it is refused.
MAX_LINE = 8190
MAX_FIELD = 8190
MAX_FIELDS = 128
MAX_HEAD_BYTES = MAX_FIELDS * MAX_FIELD
# Reading pauses while this much undelivered body sits in memory: a slow consumer (spooling to disk) holds the
# upstream back through TCP instead of buffering its body here. The aiohttp engine's point (twice its 64 KiB read
# buffer): the kernel grows a socket's receive window by what the reader takes in one go, so a larger value lets a
# body refused at the cap pull more from the upstream before the close lands.
BODY_HIGH_WATER = 128 * 1024
# The most one decoding step may produce, whatever the ratio of the coding (a decompression bomb yields bounded
# pieces, so the fetcher's body cap stops it after a few of them): the aiohttp engine's per-step bound.
DECODE_PIECE = 256 * 1024
# An idle pooled connection is not used after this long (the aiohttp engine's default keep-alive): servers close
# idle connections after their own timeout, and a request written into that close would be lost.
KEEPALIVE_SECONDS = 15.0
DEFAULT_PORTS = {"http": 80, "https": 443}
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})  # RFC 9110 §9.2.2
# The kernel's receive buffer of an upstream socket. Left to autotuning, Linux grows it by how much the reader
# drains at once, up to net.ipv4.tcp_rmem's maximum (32 MiB on the CI machine): a fast reader held up by a busy loop
# drains a lot at once, and a body refused at the body cap then pulls tens of MiB more from the upstream, held in
# kernel memory, before the close lands (tests/integration/test_hostile_upstream.py, the endless bodies; this
# narrowed, but has not closed, what that test still sees for this engine under load). A fixed 4 MiB still carries
# about 40 MB/s over a 100 ms link. Where the system would clamp it smaller (net.core.rmem_max), autotuning is left on
# instead: a small fixed buffer would slow long links.
RECEIVE_BUFFER = 4 * 1024 * 1024

PoolKey = tuple[str, str, int, str, str | None]  # scheme, host, port, connected address, TLS server name
# The "connected address" of a plain-http connection to the forward proxy, which resolves the target itself.
VIA_PROXY = "proxy"
# A CONNECT answer is a status line and a few fields; one larger than this is no proxy we can talk to.
MAX_CONNECT_HEAD = 16 * 1024
HostKey = tuple[str, str, int]  # scheme, host, port: what limit_per_host counts


def _receive_buffer() -> int | None:
    """RECEIVE_BUFFER if the system grants it whole, else None (leave autotuning on)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        granted = probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return RECEIVE_BUFFER if granted >= RECEIVE_BUFFER else None


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing; the reason is already in the connection's `error`."""


# -- request --------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _target(url: str) -> tuple[str, str, int, str, str]:
    """scheme, host (for connecting and SNI), port, request target, Host field value."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise UpstreamError("transport-error") from exc
    if scheme not in DEFAULT_PORTS or not host:
        raise UpstreamError("transport-error")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise UpstreamError("transport-error") from exc
    if port is None:
        port = DEFAULT_PORTS[scheme]
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if not target.isascii():
        # The signed URL goes out as it is; only what HTTP cannot carry (non-ASCII) is percent-encoded as UTF-8,
        # the way the aiohttp engine's URL type does it. Existing escapes ("%") stay.
        target = quote(target, safe="!#$%&'()*+,-./:;=?@[]^_`{|}~")
    authority = f"[{host}]" if ":" in host else host
    if port != DEFAULT_PORTS[scheme]:
        authority += f":{port}"
    return scheme, host, port, target, authority


def _request(method: str, target: str, authority: str, headers: list[tuple[str, str]]) -> bytes:
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers])
    # Each field adds exactly one CR and one LF: any other is a line break smuggled inside a name or value, which
    # would split the request on the wire.
    if fields.count("\r") != len(headers) or fields.count("\n") != len(headers) or "\0" in fields:
        raise UpstreamError("transport-error")
    text = f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n{fields}\r\n"
    try:
        return text.encode("latin-1")  # header values arrive decoded as latin-1: this gives back the client's bytes
    except UnicodeEncodeError:
        return text.encode("utf-8")


# -- content codings ------------------------------------------------------------------------------------------------


class _Decoder:
    """Decodes one Content-Encoding in pieces of at most DECODE_PIECE bytes; failures are `bad-encoding`."""

    def decode(self, data: bytes) -> Iterator[bytes]:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class _ZlibDecoder(_Decoder):
    __slots__ = ("_fed", "_gzip", "_obj")

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._obj: Any = None
        self._fed = False

    def decode(self, data: bytes) -> Iterator[bytes]:
        try:
            if self._obj is None:
                if self._gzip:
                    wbits = 16 + zlib.MAX_WBITS
                else:
                    # RFC 9110 §8.4.1.2 says zlib-wrapped, but servers also send raw deflate: the first byte tells.
                    wbits = zlib.MAX_WBITS if data[0] & 0x0F == 8 else -zlib.MAX_WBITS
                self._obj = zlib.decompressobj(wbits)
            self._fed = True
            obj = self._obj
            out = obj.decompress(data, DECODE_PIECE)
            while True:
                if out:
                    yield out
                if obj.eof:
                    rest = obj.unused_data
                    if not (rest and self._gzip):
                        return
                    # RFC 1952 §2.2: a gzip file is a series of members.
                    obj = self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    out = obj.decompress(rest, DECODE_PIECE)
                elif obj.unconsumed_tail:
                    out = obj.decompress(obj.unconsumed_tail, DECODE_PIECE)
                elif len(out) == DECODE_PIECE:
                    out = obj.decompress(b"", DECODE_PIECE)  # cut at the bound: zlib may hold more output
                else:
                    return
        except zlib.error as exc:
            raise UpstreamError("bad-encoding") from exc

    def finish(self) -> None:
        # A coded body that stops before its stream ends is not the whole body.
        if self._fed and not self._obj.eof:
            raise UpstreamError("bad-encoding")


class _BrotliDecoder(_Decoder):
    __slots__ = ("_fed", "_obj", "_process")

    def __init__(self, module: Any) -> None:
        self._obj = module.Decompressor()
        # Brotli names the bounded call `process`, brotlicffi `decompress`; both take the output bound second.
        self._process: Callable[[bytes, int], bytes] = getattr(self._obj, "process", None) or self._obj.decompress
        self._fed = False

    def decode(self, data: bytes) -> Iterator[bytes]:
        self._fed = True
        try:
            out = self._process(data, DECODE_PIECE)
            while out:
                yield out
                if self._obj.is_finished():
                    return
                out = self._process(b"", DECODE_PIECE)  # input held back by the bound is decoded on request
        except Exception as exc:  # the brotli modules raise their own error classes (or plain ones)
            raise UpstreamError("bad-encoding") from exc

    def finish(self) -> None:
        if self._fed and not self._obj.is_finished():
            raise UpstreamError("bad-encoding")


def _brotli_module() -> Any:
    # The same two modules moxy.upstream's _accept_encoding looks for before it offers br.
    for name in ("brotli", "brotlicffi"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _decoder(headers: list[tuple[str, str]]) -> _Decoder | None:
    for name, value in headers:
        if name.lower() == "content-encoding":
            # The first field decides, as in the aiohttp engine; a coding it does not know is handed over as is
            # (moxy.upstream sees the field and treats the body as coded).
            coding = value.strip().lower()
            if coding == "gzip" or coding == "deflate":
                return _ZlibDecoder(gzip=coding == "gzip")
            if coding == "br":
                module = _brotli_module()
                if module is None:
                    raise UpstreamError("bad-encoding")  # br was not offered; it cannot be decoded here
                return _BrotliDecoder(module)
            return None
    return None


# -- one connection -------------------------------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the state of the one request in flight on it. The parser runs in
    `data_received`; the body is queued raw and decoded by the consumer, so a callback never does unbounded work."""

    def __init__(self, engine: H1Engine, key: PoolKey, host_key: HostKey, read_timeout: float) -> None:
        self.engine = engine
        self.loop = engine._loop
        self.key = key
        self.host_key = host_key
        self.read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # As lenient as the aiohttp engine's parser is with answers (real servers send these): control bytes in
        # field values (moxy.upstream drops such fields), obs-fold, a bare LF as line end, spaces after a chunk size.
        # Framing stays strict: a Content-Length next to chunking, or two lengths, is refused.
        self.parser.set_dangerous_leniencies(
            lenient_headers=True, lenient_optional_cr_before_lf=True, lenient_spaces_after_chunk_size=True
        )
        self.closed = False
        self.idle_since = 0.0
        self.active = False
        self._reset(head_only=False)

    def _reset(self, head_only: bool) -> None:
        self.head_only = head_only
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.head_done = False
        self.head_bytes = 0
        self.status_bytes = 0
        self.interim = False
        self.complete = False
        self.reusable = False
        self.until_close = False
        self.chunked = False
        self.body: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.last_read = 0.0
        self.wait_since = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # -- the request's side

    def begin(self, head_only: bool, request: bytes) -> None:
        self._reset(head_only)
        self.active = True
        now = self.loop.time()
        self.last_read = now
        self.timer = self.loop.call_at(now + self.read_timeout, self._check_idle)
        assert self.transport is not None
        self.transport.write(request)

    def end(self) -> None:
        self.active = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.waiter = None
        self.body = []
        self.buffered = 0

    def wait(self) -> asyncio.Future[None]:
        waiter = self.loop.create_future()
        self.waiter = waiter
        self.wait_since = self.loop.time()
        return waiter

    def take(self) -> bytes:
        body = self.body
        data = body[0] if len(body) == 1 else b"".join(body)
        self.body = []
        self.buffered = 0
        if self.paused and not self.closed and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                # abort, not close: nothing more is read or sent, and a TLS close would wait for the peer.
                self.transport.abort()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self.reusable = False
        self.close()
        self._wake()

    def _check_idle(self) -> None:
        # One timer per request, checked against the last read: cheaper than a timer per read.
        self.timer = None
        if not self.active or self.closed:
            return
        now = self.loop.time()
        if self.waiter is None:
            # The consumer is busy with what it has: the upstream is not idle on our account.
            self.timer = self.loop.call_at(now + self.read_timeout, self._check_idle)
            return
        due = max(self.last_read, self.wait_since) + self.read_timeout
        if now + 0.001 >= due:
            self._fail(UpstreamTimeout("read-timeout"))
        else:
            self.timer = self.loop.call_at(due, self._check_idle)

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # Bytes nobody asked for on an idle connection: whatever follows on it cannot be trusted.
            self.close()
            return
        if self.closed:
            return
        self.last_read = self.loop.time()
        head_seen = self.head_done
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("protocol-error"))  # a 101 nobody asked for
            return
        except (httptools.HttpParserError, _Stop):
            if self.error is None:
                # An error in a later read of a chunked body is its chunking; in the read that brought the head it
                # is reported as a broken answer, as the aiohttp engine does (it never hands that head over).
                body_error = head_seen and self.chunked and not self.complete
                self.error = UpstreamError("bad-chunking" if body_error else "protocol-error")
            self._fail(self.error)
            return
        if not self.head_done:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._fail(UpstreamError("protocol-error"))
            return
        if self.buffered > BODY_HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost decides what the end means

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.active:
            self.engine._forget(self)
            return
        if not self.complete and self.error is None:
            if not self.head_done:
                self.error = UpstreamError("disconnected")
            elif self.until_close and exc is None:
                self.complete = True  # RFC 9112 §6.3: without length or chunking, the close ends the body
            else:
                self.error = UpstreamError("truncated")
        self.reusable = False
        self._wake()

    # -- httptools callbacks (run inside feed_data)

    def _refuse(self, reason: str) -> None:
        self.error = UpstreamError(reason)
        raise _Stop

    def on_message_begin(self) -> None:
        if self.complete or self.head_only and self.head_done:
            # A second answer to one request: bytes past the end of the first (a length lie).
            self._refuse("protocol-error")
        self.headers = []
        self.status_bytes = 0

    def on_status(self, status: bytes) -> None:
        self.status_bytes += len(status)
        if self.status_bytes > MAX_LINE:
            self._refuse("protocol-error")

    def on_header(self, name: bytes, value: bytes) -> None:
        # NUL is refused outright, as the aiohttp engine does: lenient parsing would let it through.
        if len(name) > MAX_FIELD or len(value) > MAX_FIELD or len(self.headers) >= MAX_FIELDS or b"\0" in value:
            self._refuse("protocol-error")
        # llhttp strips the whitespace before a value but not after it (RFC 9110 §5.5: it is not part of the value).
        self.headers.append((name.decode("latin-1"), value.rstrip(b" \t").decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            # RFC 9110 §15.2: an interim answer; the final one follows on the same connection.
            self.interim = True
            return
        self.status = status
        self.head_done = True
        self.reusable = self.parser.should_keep_alive()
        if self.head_only:
            # llhttp cannot be told that a HEAD answer has no body, so the body it would expect is never read and
            # the connection is not reused.
            self.complete = True
            self.reusable = False
            return
        length = False
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == "content-length":
                length = True
            elif lowered == "transfer-encoding":
                self.chunked = value.rsplit(",", 1)[-1].strip().lower() == "chunked"
        # RFC 9112 §6.3: no length and no chunking, and a status that has a body: the body ends with the connection.
        self.until_close = not self.chunked and not length and status not in (204, 304)

    def on_body(self, body: bytes) -> None:
        if not self.head_only:
            self.body.append(body)
            self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True


# -- the wire and the engine ----------------------------------------------------------------------------------------


class _H1Wire:
    """One response whose head has arrived; the body is read through `chunks()` (a `moxy.upstream.Wire`)."""

    __slots__ = ("_connection", "_engine", "_released", "raw_headers", "status")

    def __init__(self, engine: H1Engine, connection: _Connection) -> None:
        self._engine = engine
        self._connection = connection
        self._released = False
        self.status = connection.status
        self.raw_headers = connection.headers

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        connection = self._connection
        decoder: _Decoder | None = None
        coded = True  # until the first body bytes show whether a decoder is needed
        clean = False
        try:
            while True:
                if connection.body:
                    data = connection.take()
                    if coded:
                        decoder = _decoder(self.raw_headers)
                        coded = decoder is not None
                    if decoder is None:
                        yield data
                    else:
                        for piece in decoder.decode(data):
                            yield piece
                    continue
                if connection.error is not None:
                    raise connection.error
                if connection.complete:
                    break
                await connection.wait()
            if decoder is not None:
                decoder.finish()
            if connection.error is not None:
                raise connection.error  # bytes past the end arrived with the last of the body
            clean = True
        finally:
            self._release(clean and connection.reusable)

    async def abort(self) -> None:
        self._release(False)

    def _release(self, reuse: bool) -> None:
        if not self._released:
            self._released = True
            self._engine._release(self._connection, reuse)


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


class H1Engine:
    """HTTP/1.1 over asyncio and httptools, with a keep-alive pool (a `moxy.upstream.Engine`). Build it inside the
    running loop. `limit` / `limit_per_host` bound the connections in use at once (0: no bound), as in the
    aiohttp engine; idle pooled connections do not count."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        limit: int,
        limit_per_host: int,
        ssl_context: ssl.SSLContext,
        proxy: ForwardProxy | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._proxy = proxy
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._ssl_context = ssl_context
        self._receive_buffer = _receive_buffer()
        # The pool key holds the connected address and the TLS name too: a connection made for one hop's pin, or
        # verified for one name, is never handed to another.
        self._idle: dict[PoolKey, collections.deque[_Connection]] = {}
        self._busy: set[_Connection] = set()
        # Slots in use (connections in use or being made), in all and per host, for limit / limit_per_host.
        self._in_use = 0
        self._in_use_by_host: dict[HostKey, int] = {}
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    async def send(self, method: str, url: str, headers: list[tuple[str, str]], pinned: list[IPAddress]) -> _H1Wire:
        if self._closed:
            raise UpstreamError("transport-error")
        scheme, host, port, target, authority = _target(url)
        server_name = host if scheme == "https" else None
        if self._proxy is not None and scheme == "http":
            # Absolute form to the proxy, which resolves the name itself (moxy.upstream.egress says why).
            target = f"http://{authority}{target}"
            if self._proxy.authorization is not None:
                headers = [*headers, ("Proxy-Authorization", self._proxy.authorization)]
        request = _request(method, target, authority, headers)
        host_key = (scheme, host, port)
        try:
            wire = await self._exchange(method, request, scheme, host, port, server_name, pinned, host_key)
        except UpstreamError as exc:
            # RFC 9112 §9.3.1: a connection that closed before any answer may be retried once when the method is
            # idempotent; the aiohttp engine does the same (a server closing a kept-alive connection as it is
            # reused is the usual cause).
            if exc.reason != "disconnected" or method not in IDEMPOTENT_METHODS or self._closed:
                raise
            wire = await self._exchange(method, request, scheme, host, port, server_name, pinned, host_key)
        if self._proxy is not None and wire.status == 407:
            # The proxy's own answer to a request it would not forward: never the upstream's.
            await wire.abort()
            raise UpstreamError("proxy-refused", status=407)
        return wire

    async def _exchange(
        self,
        method: str,
        request: bytes,
        scheme: str,
        host: str,
        port: int,
        server_name: str | None,
        pinned: list[IPAddress],
        host_key: HostKey,
    ) -> _H1Wire:
        """One request on one connection (pooled or new), up to its head."""
        if self._limit or self._limit_per_host:
            await self._wait_for_slot(host_key)
        self._hold(host_key)  # a connection being made takes its slot already
        connection = self._take_idle(scheme, host, port, server_name, pinned)
        if connection is None:
            try:
                connection = await self._connect(scheme, host, port, server_name, pinned, host_key)
            except BaseException:
                self._free(host_key)
                raise
        self._busy.add(connection)
        try:
            connection.begin(method == "HEAD", request)
            while not connection.head_done and connection.error is None:
                await connection.wait()
            if connection.error is not None:
                raise connection.error
        except BaseException:
            self._release(connection, False)  # cancelled (total timeout) or failed mid-head: never reused
            raise
        return _H1Wire(self, connection)

    def _take_idle(
        self, scheme: str, host: str, port: int, server_name: str | None, pinned: list[IPAddress]
    ) -> _Connection | None:
        if not self._idle:
            return None
        now = self._loop.time()
        for address in self._addresses(scheme, pinned):
            idle = self._idle.get((scheme, host, port, address, server_name))
            while idle:
                # Oldest first, as the aiohttp engine's pool does: the connection released last (whose server may
                # be about to drop it) is the last one written to again.
                connection = idle.popleft()
                transport = connection.transport
                # A transport already closing has seen the server's FIN; its connection_lost has not run yet.
                if (
                    not connection.closed
                    and transport is not None
                    and not transport.is_closing()
                    and now - connection.idle_since < KEEPALIVE_SECONDS
                ):
                    return connection
                connection.close()
        return None

    async def _wait_for_slot(self, host_key: HostKey) -> None:
        while (self._limit and self._in_use >= self._limit) or (
            self._limit_per_host and self._in_use_by_host.get(host_key, 0) >= self._limit_per_host
        ):
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(
        self, scheme: str, host: str, port: int, server_name: str | None, pinned: list[IPAddress], host_key: HostKey
    ) -> _Connection:
        if not pinned:
            raise UpstreamError("connect-failed")
        failure: UpstreamError = UpstreamError("connect-failed")
        # In the policy's order, as the aiohttp engine tries resolved addresses.
        for address in self._addresses(scheme, pinned):
            key: PoolKey = (scheme, host, port, address, server_name)
            try:
                return await self._open(key, host_key, address, port, server_name)
            except UpstreamError as exc:
                # The proxy down or refusing our credentials: another address would not help.
                if exc.reason == "proxy-failed" or exc.status == 407:
                    raise
                failure = exc
        raise failure

    def _addresses(self, scheme: str, pinned: list[IPAddress]) -> list[str]:
        """What a connection for this hop is made to: each checked address (directly, or by a tunnel through the
        proxy), or the proxy itself for plain http through it."""
        if self._proxy is not None and scheme == "http":
            return [VIA_PROXY]
        return [str(address) for address in pinned]

    async def _socket(self, address: str, port: int) -> socket.socket:
        """A TCP socket connected to `address` (a checked IP literal), or through the proxy: to the proxy, with a
        tunnel to `address` when `port` is not None (plain http through the proxy opens none)."""
        if self._proxy is None:
            return await self._connected(address, port)
        try:
            found = await self._loop.getaddrinfo(self._proxy.host, self._proxy.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise UpstreamError("proxy-failed") from exc
        sock: socket.socket | None = None
        for *_, sockaddr in found:  # the operator's proxy: its address is exempt from the destination policy
            try:
                sock = await self._connected(str(sockaddr[0]), self._proxy.port)
                break
            except OSError:
                continue
        if sock is None:
            raise UpstreamError("proxy-failed")
        if address == VIA_PROXY:
            return sock
        try:
            await self._tunnel(sock, address, port, self._proxy)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _connected(self, address: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._receive_buffer is not None:
                # Before connecting: the window scale offered in the SYN follows from it.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)
            # A socket connected by hand to the given address: no name is looked up on the way.
            await self._loop.sock_connect(sock, (address, port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _tunnel(self, sock: socket.socket, address: str, port: int, proxy: ForwardProxy) -> None:
        """CONNECT to `address`:`port` through the proxy on `sock` (RFC 9110 §9.3.6): returns once it is open."""
        await self._loop.sock_sendall(sock, connect_request(address, port, proxy))
        head = b""
        while b"\r\n\r\n" not in head:
            data = await self._loop.sock_recv(sock, 4096)
            if not data:
                raise UpstreamError("proxy-failed")
            head += data
            if len(head) > MAX_CONNECT_HEAD:
                raise UpstreamError("proxy-refused")
        parts = head.partition(b"\r\n")[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise UpstreamError("proxy-refused")
        status = int(parts[1])
        # A 2xx opens the tunnel; anything after its head would be bytes of a conversation not yet begun.
        if not 200 <= status < 300 or not head.endswith(b"\r\n\r\n") or head.count(b"\r\n\r\n") != 1:
            raise UpstreamError("proxy-refused", status=status)

    async def _open(
        self, key: PoolKey, host_key: HostKey, address: str, port: int, server_name: str | None
    ) -> _Connection:
        read_timeout = self._read_timeout
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                sock = await self._socket(address, port)
                if server_name is None:
                    _, connection = await self._loop.create_connection(
                        lambda: _Connection(self, key, host_key, read_timeout), sock=sock
                    )
                else:
                    # The certificate is checked against (and SNI names) the URL's host, never the pinned address.
                    _, connection = await self._loop.create_connection(
                        lambda: _Connection(self, key, host_key, read_timeout),
                        sock=sock,
                        ssl=self._ssl_context,
                        server_hostname=server_name,
                        ssl_handshake_timeout=self._connect_timeout,
                    )
        except TimeoutError as exc:
            _close(sock)
            raise UpstreamTimeout("connect-timeout") from exc
        except (ssl.SSLError, ssl.CertificateError) as exc:
            _close(sock)
            raise UpstreamError("tls-error") from exc
        except OSError as exc:
            _close(sock)
            raise UpstreamError("connect-failed") from exc
        except BaseException:
            _close(sock)
            raise
        return connection

    def _hold(self, host_key: HostKey) -> None:
        self._in_use += 1
        self._in_use_by_host[host_key] = self._in_use_by_host.get(host_key, 0) + 1

    def _free(self, host_key: HostKey) -> None:
        self._in_use -= 1
        count = self._in_use_by_host[host_key] - 1
        if count > 0:
            self._in_use_by_host[host_key] = count
        else:
            del self._in_use_by_host[host_key]
        # Every waiter checks again: the slot freed may be for its host or not (limit_per_host).
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _forget(self, connection: _Connection) -> None:
        # An idle connection the server closed: out of the pool at once, not when its key is next asked for.
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]

    def _release(self, connection: _Connection, reuse: bool) -> None:
        if connection not in self._busy:
            return
        self._busy.discard(connection)
        connection.end()
        if reuse and not connection.closed and not self._closed:
            connection.idle_since = self._loop.time()
            idle = self._idle.get(connection.key)
            if idle is None:
                idle = self._idle[connection.key] = collections.deque()
            idle.append(connection)
        else:
            connection.close()
        self._free(connection.host_key)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        for connection in list(self._busy):
            connection.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.cancel()

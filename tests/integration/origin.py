"""A hostile HTTP/1.1 origin for integration tests, written on raw asyncio streams so it can misbehave byte by byte.

It runs on 127.0.0.1 (ephemeral port) in a background thread with its own event loop::

    with Origin() as origin:
        origin.route("/pic.png", Reply(headers={"Content-Type": "image/png"}, body=PNG))
        origin.route("/slow", Reply(delay_headers=5))
        origin.route("/huge", Reply(stream_size=200 * 1024 * 1024))       # generated, never held in memory
        origin.route("/cut", Reply(body=b"x" * 1000, close_after=100))    # 100 body bytes, then FIN
        origin.route("/rst", Reply(body=b"x" * 1000, reset_after=100))    # 100 body bytes, then RST
        origin.route("/lie", Reply(body=b"x" * 10, declared_length=20))   # Content-Length lies
        origin.route("/flip", lambda request: Reply(status=500) if ... else Reply(...))
        origin.route("/rst-head", Reply(head_cut=20))                     # 20 bytes of the head, then RST
        origin.route("/drip", Reply(body=b"x" * 100, chunk_size=1, chunk_delay=0.05))   # one byte per 50 ms
        origin.route("/bomb", Reply.gzip_bomb(64 * 1024 * 1024))          # ~64 KiB on the wire, 64 MiB decoded
        origin.route("/old", Reply.http10(body, with_length=False))       # HTTP/1.0, ends by closing
        origin.route("/ctl", Reply(headers=[("Content-Type", b"image/png\x01")]))  # header values may be bytes
        url = origin.url("/pic.png")
        ...
        assert origin.hits("/pic.png") == 1
        assert "cookie" not in origin.requests[-1].headers

Paths without a route answer 404. Counters (`connections`, `hits`, `body_bytes_sent`, `requests`, `tls_failures`)
are safe to read from the test thread. `Origin(host="127.0.0.2")` listens on another loopback address (a distinct
upstream host, for per-host limits); `Origin(tls=context)` speaks HTTPS, with the handshake inside the counted
connection, so a client that rejects the certificate still shows in `connections` (and in `tls_failures`).
`ConnectionCounter` is a listener that only counts and closes connections, for asserting that a refused destination
was never contacted.

As a pytest fixture::

    @pytest.fixture
    def origin() -> Iterator[Origin]:
        with Origin() as running:
            yield running
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import gzip
import hashlib
import http
import json
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

__all__ = [
    "ENDLESS",
    "ConnectionCounter",
    "HeaderValue",
    "Origin",
    "RecordedRequest",
    "Reply",
    "pattern",
    "pattern_sha256",
]

# The deterministic body of `stream_size` replies: byte i is i % 251 (a prime, so no power-of-two chunking lines up).
_PERIOD = 251
_PATTERN = bytes(i % _PERIOD for i in range(_PERIOD * 4096))  # ~1 MiB, sliced at any offset
# A stream_size no client will ever read to the end (1 TiB): an "endless" body that is still a bounded loop.
ENDLESS = 1 << 40

HeaderValue = str | bytes
"""A header value as the origin sends it: str is encoded as latin-1, bytes go on the wire untouched (for bytes that
are not latin-1 text, such as UTF-8, or any octet at all)."""


def _pattern_slice(offset: int, size: int) -> bytes:
    """`size` (<= ~1 MiB) bytes of the pattern starting at byte `offset`."""
    start = offset % _PERIOD
    return _PATTERN[start : start + size]


def pattern(size: int) -> bytes:
    """The first `size` bytes of the stream_size pattern (for small sizes; use pattern_sha256 for big ones)."""
    return b"".join(_iter_pattern(size, 1024 * 1024))


def pattern_sha256(size: int) -> str:
    """SHA-256 hex digest of the first `size` bytes of the pattern, computed without holding them."""
    digest = hashlib.sha256()
    for piece in _iter_pattern(size, 1024 * 1024):
        digest.update(piece)
    return digest.hexdigest()


def _iter_pattern(size: int, chunk: int) -> Iterator[bytes]:
    chunk = min(chunk, len(_PATTERN) - _PERIOD)
    offset = 0
    while offset < size:
        n = min(chunk, size - offset)
        yield _pattern_slice(offset, n)
        offset += n


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str  # the request target as sent, query included
    headers: dict[str, str]  # lowercase names, repeated fields joined with ", "
    connection: int  # 1-based number of the TCP connection that carried it (to assert reuse)


@dataclass(slots=True)
class Reply:
    """What the origin answers. Defaults: 200, Content-Length set from the body, connection kept alive.

    status, headers (dict or list of pairs, sent in order, repeated names allowed), body.
    delay_headers: seconds before the first byte of the answer. delay_body: seconds between head and body.
    chunk_delay: seconds between body chunks (a trickle: every read is quick, the whole is slow).
    chunked: Transfer-Encoding: chunked instead of Content-Length (chunks of chunk_size).
    declared_length: the Content-Length to claim instead of the truth (the connection is closed after the body).
    close_after / reset_after: send that many body bytes, then close (FIN) / reset (RST via SO_LINGER 0).
    stream_size: send that many pattern bytes (see `pattern`) generated on the fly instead of `body`.
    raw: bytes sent verbatim as the whole answer (after delay_headers), then the connection closes: for bad
         status lines, broken chunked framing and the like.
    version: the status line's protocol; with "HTTP/1.0" (or a `Connection: close` header) the connection is
         closed after the body, as an HTTP/1.0 server does.
    send_length: False sends no Content-Length (and no chunking): the body ends when the connection closes.
    head_cut: send only that many bytes of the head (status line and header fields), then reset the connection
         (0: reset before the status line).
    head_drip: seconds between the bytes of the head, sent one at a time (a slow-drip of the headers).
    reset_delay: seconds to wait before the reset of `reset_after`, so the bytes sent are delivered first (with
         reset_after equal to the body size: a reset after a complete body).
    honor_conditional: answer 304 when the request's If-None-Match matches the reply's ETag, or its
         If-Modified-Since is not older than the reply's Last-Modified (RFC 9110 §13.1.1, §13.1.3).
    """

    status: int = 200
    headers: Mapping[str, HeaderValue] | Sequence[tuple[str, HeaderValue]] = field(default_factory=dict)
    body: bytes = b""
    delay_headers: float = 0.0
    delay_body: float = 0.0
    chunk_delay: float = 0.0
    chunked: bool = False
    declared_length: int | None = None
    close_after: int | None = None
    reset_after: int | None = None
    stream_size: int | None = None
    chunk_size: int = 64 * 1024
    raw: bytes | None = None
    honor_conditional: bool = True
    version: str = "HTTP/1.1"
    send_length: bool = True
    head_cut: int | None = None
    head_drip: float = 0.0
    reset_delay: float = 0.0

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> Reply:
        return cls(status=status, headers={"Location": location}, body=b"redirecting")

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
        return cls(
            status=status,
            headers={"Content-Type": "application/json", **(headers or {})},
            body=json.dumps(obj).encode(),
        )

    @classmethod
    def gzipped(cls, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
        """`body` sent with Content-Encoding: gzip (Content-Length is the compressed size)."""
        return cls(status=status, headers={"Content-Encoding": "gzip", **(headers or {})}, body=gzip.compress(body))

    @classmethod
    def gzip_bomb(cls, decompressed: int, headers: Mapping[str, HeaderValue] | None = None) -> Reply:
        """`decompressed` zero bytes gzip-compressed (about 1000:1): small on the wire, huge once decoded."""
        return cls(
            headers={"Content-Type": "image/png", "Content-Encoding": "gzip", **(headers or {})},
            body=_zeros_gzipped(decompressed),
        )

    @classmethod
    def http10(cls, body: bytes = b"", *, with_length: bool, headers: Mapping[str, HeaderValue] | None = None) -> Reply:
        """An HTTP/1.0-style answer: `Connection: close`, Content-Length only `with_length`, closed after the body."""
        return cls(
            headers={"Connection": "close", **(headers or {})}, body=body, version="HTTP/1.0", send_length=with_length
        )

    def header_list(self) -> list[tuple[str, HeaderValue]]:
        return list(self.headers.items()) if isinstance(self.headers, Mapping) else list(self.headers)

    def header(self, name: str) -> str | None:
        for key, value in self.header_list():
            if key.lower() == name.lower():
                return value.decode("latin-1") if isinstance(value, bytes) else value
        return None

    def body_size(self) -> int:
        return self.stream_size if self.stream_size is not None else len(self.body)

    def body_chunks(self) -> Iterator[bytes]:
        if self.stream_size is not None:
            yield from _iter_pattern(self.stream_size, self.chunk_size)
            return
        for start in range(0, len(self.body), self.chunk_size):
            yield self.body[start : start + self.chunk_size]


Route = Reply | Callable[[RecordedRequest], Reply]


@functools.lru_cache(maxsize=8)
def _zeros_gzipped(size: int) -> bytes:
    # wbits 31: the gzip container. Built a MiB at a time so a large bomb never exists uncompressed here.
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1024 * 1024)
    parts = [compressor.compress(zeros[: min(len(zeros), size - done)]) for done in range(0, size, len(zeros))]
    parts.append(compressor.flush())
    return b"".join(parts)


def _encode(value: HeaderValue) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    # SO_LINGER on, timeout 0: close() sends RST instead of FIN and discards unsent data.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _not_modified(reply: Reply, request: RecordedRequest) -> bool:
    if not reply.honor_conditional or not 200 <= reply.status < 300:
        return False
    etag = reply.header("ETag")
    inm = request.headers.get("if-none-match")
    if inm is not None:
        # RFC 9110 §13.1.2: If-None-Match uses the weak comparison; it takes precedence over If-Modified-Since.
        if etag is None:
            return False
        tags = [tag.strip().removeprefix("W/") for tag in inm.split(",")]
        return "*" in tags or etag.strip().removeprefix("W/") in tags
    ims = request.headers.get("if-modified-since")
    modified = reply.header("Last-Modified")
    if ims is None or modified is None:
        return False
    try:
        return email.utils.parsedate_to_datetime(modified) <= email.utils.parsedate_to_datetime(ims)
    except (TypeError, ValueError):
        return False


class Origin:
    """The hostile origin (see the module docstring). Start/stop with `with` or start()/stop()."""

    def __init__(self, host: str = "127.0.0.1", *, tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.tls = tls
        self._tls_failures = 0
        self._routes: dict[str, Route] = {}
        self._lock = threading.Lock()
        self._connections = 0
        self._requests: list[RecordedRequest] = []
        self._sent: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> Origin:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._accept, self.host, 0))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="moxy-test-origin", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for _ in range(3):
                await asyncio.sleep(0)  # the aborted transports close their sockets in callbacks of the next turns
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> Origin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test API ----------------------------------------------------------------------------------------------

    def url(self, path: str = "/", host: str | None = None) -> str:
        """The URL of `path` here; `host` names this origin another way (e.g. "localhost" for a TLS name check)."""
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    def route(self, path: str, reply: Route) -> None:
        """Set or replace what `path` answers (exact match on the target, or on its path without the query)."""
        with self._lock:
            self._routes[path] = reply

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def tls_failures(self) -> int:
        """TLS handshakes that did not complete (the client refused the certificate, or hung up)."""
        with self._lock:
            return self._tls_failures

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def hits(self, path: str) -> int:
        """Requests received for `path` (matched like routes)."""
        with self._lock:
            return sum(1 for request in self._requests if path in (request.path, request.path.split("?", 1)[0]))

    def body_bytes_sent(self, path: str) -> int:
        """Body bytes handed to the socket for `path` (all requests): shows how early a client hung up."""
        with self._lock:
            return self._sent.get(path, 0)

    def reset_counts(self) -> None:
        with self._lock:
            self._connections = 0
            self._tls_failures = 0
            self._requests.clear()
            self._sent.clear()

    # -- server side (origin thread) ---------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self._connections += 1
            number = self._connections
        try:
            if self.tls is not None and not await self._handshake(writer):
                return
            while await self._serve_one(reader, writer, number):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away: that is the point of many tests
        except asyncio.CancelledError:
            # stop(): end normally, as Python 3.11's stream callback logs a cancelled handler as an error. Abort,
            # not close: a TLS close waits for the peer's close_notify, which would outlive the loop.
            writer.transport.abort()
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _handshake(self, writer: asyncio.StreamWriter) -> bool:
        assert self.tls is not None
        try:
            async with asyncio.timeout(10):
                await writer.start_tls(self.tls)
        except (ssl.SSLError, OSError, TimeoutError):
            with self._lock:
                self._tls_failures += 1
            return False
        return True

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> bool:
        """Serve one request; True when the connection may carry another."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(":")
            key, value = name.strip().lower(), value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if headers.get("content-length", "0").isdigit() and int(headers.get("content-length", "0")):
            await reader.readexactly(int(headers["content-length"]))
        request = RecordedRequest(method, target, headers, number)
        with self._lock:
            self._requests.append(request)
            route = self._routes.get(target) or self._routes.get(target.split("?", 1)[0])
        if route is None:
            reply = Reply(status=404, body=b"no route")
        else:
            reply = route(request) if callable(route) else route
        keep_alive = await self._send(writer, request, reply)
        return keep_alive and headers.get("connection", "").lower() != "close"

    async def _send(self, writer: asyncio.StreamWriter, request: RecordedRequest, reply: Reply) -> bool:
        if reply.delay_headers:
            await asyncio.sleep(reply.delay_headers)
        if reply.raw is not None:
            writer.write(reply.raw)
            await writer.drain()
            return False
        status = 304 if _not_modified(reply, request) else reply.status
        no_body = request.method == "HEAD" or status in (204, 304) or status < 200
        headers = reply.header_list()
        names = {name.lower() for name, _ in headers}
        if status == 304:
            # RFC 9110 §15.4.5: a 304 repeats the validators and caching fields, never the content framing.
            headers = [(n, v) for n, v in headers if n.lower() not in ("content-length", "transfer-encoding")]
        elif reply.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        elif "content-length" not in names and status != 204 and reply.send_length:
            declared = reply.declared_length if reply.declared_length is not None else reply.body_size()
            headers.append(("Content-Length", str(declared)))
        if "date" not in names:
            headers.append(("Date", email.utils.formatdate(time.time(), usegmt=True)))
        phrase = http.HTTPStatus(status).phrase if status in http.HTTPStatus._value2member_map_ else "Whatever"
        head = f"{reply.version} {status} {phrase}\r\n".encode("latin-1")
        head += b"".join(_encode(n) + b": " + _encode(v) + b"\r\n" for n, v in headers) + b"\r\n"
        if reply.head_cut is not None:
            writer.write(head[: reply.head_cut])
            await writer.drain()
            await asyncio.sleep(0.05)  # let the partial head leave before the reset discards the send buffer
            _reset(writer)
            return False
        if reply.head_drip:
            for position in range(len(head)):
                if position:
                    await asyncio.sleep(reply.head_drip)
                writer.write(head[position : position + 1])
                await writer.drain()
        else:
            writer.write(head)
            await writer.drain()
        # HTTP/1.0 and `Connection: close` answers end the connection after the body (RFC 9112 §9.6).
        closing = reply.version == "HTTP/1.0" or (reply.header("Connection") or "").lower() == "close"
        if no_body:
            if closing:
                writer.close()
            return not closing
        if reply.delay_body:
            await asyncio.sleep(reply.delay_body)
        stop_at = min(x for x in (reply.close_after, reply.reset_after, reply.body_size()) if x is not None)
        sent = 0
        path = request.path
        for chunk in reply.body_chunks():
            if sent >= stop_at:
                break
            chunk = chunk[: stop_at - sent]
            if reply.chunk_delay and sent:
                await asyncio.sleep(reply.chunk_delay)
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if reply.chunked else chunk)
            await writer.drain()
            sent += len(chunk)
            with self._lock:
                self._sent[path] = self._sent.get(path, 0) + len(chunk)
        if reply.reset_after is not None:
            if reply.reset_delay:
                await asyncio.sleep(reply.reset_delay)
            _reset(writer)
            return False
        if reply.close_after is not None:
            writer.close()
            return False
        if reply.chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        if closing or not (reply.send_length or reply.chunked):
            # Without a length the close is what ends the body; HTTP/1.0 and `Connection: close` end here too.
            writer.close()
            return False
        # After a lie about the length the connection is unusable for another message: close it.
        return reply.declared_length is None


class ConnectionCounter:
    """A listener on `host` (default 127.0.0.1) and, with `ipv6`, on ::1 with the same port (when IPv6 works),
    that counts accepted connections and closes them at once. Use it as the target of a destination that must be
    refused: `connections` must stay 0. Another loopback address (127.0.0.2) gives a target distinct from Origin."""

    def __init__(self, host: str = "127.0.0.1", *, ipv6: bool = True) -> None:
        self._lock = threading.Lock()
        self._connections = 0
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        self.port = 0
        self.host = host
        self._ipv6 = ipv6

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    def url(self, path: str = "/", host: str | None = None) -> str:
        host = host or self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}{path}"

    def start(self) -> ConnectionCounter:
        v4 = socket.create_server((self.host, 0))
        self.port = v4.getsockname()[1]
        self._sockets.append(v4)
        if self._ipv6:
            with contextlib.suppress(OSError):
                self._sockets.append(socket.create_server(("::1", self.port), family=socket.AF_INET6))
        for listener in self._sockets:
            listener.settimeout(0.05)
            thread = threading.Thread(target=self._run, args=(listener,), name="moxy-test-counter", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, listener: socket.socket) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._connections += 1
            conn.close()

    def stop(self) -> None:
        self._closing.set()
        for thread in self._threads:
            thread.join(5)
        for listener in self._sockets:
            listener.close()

    def __enter__(self) -> ConnectionCounter:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

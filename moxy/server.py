"""The HTTP server side: uvicorn's httptools protocol with bounds on what one client may send.

httptools joins the pieces of a header into one bytes object until the header ends, and uvicorn sets no limit, so
one endless header grows a worker without bound and stalls its event loop while the pieces are copied. The protocol
here counts the request target, the header fields and the raw bytes of a head as they arrive, answers 414 or 431 as
soon as a bound is crossed, and 408 to a head that takes too long. Those answers carry `Cache-Control: no-store` and
end the connection. Everything after the head (the app, keep-alive, pipelining, flow control) is uvicorn's own."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from moxy import sending
from moxy.config import Settings, load_settings
from moxy.responses import SECURITY_HEADERS
from moxy.routes import ADMIN_LISTENER, DRAINING

if TYPE_CHECKING:
    from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope

__all__ = ["BoundedHttpToolsProtocol", "ClientLimits", "DrainState", "process_limits", "refusal"]

# After a refusal, what the client still sends is read and dropped for up to this long before the socket closes:
# closing with unread bytes makes the kernel answer with a reset, which can destroy the answer before the client
# has read it (nginx's lingering close does the same). Nothing read in this time is kept.
LINGER_SECONDS = 2.0
# The raw byte count of a head also holds the method, the version, line breaks and the whitespace around values that
# the per-field count leaves out; this much slack keeps the two counts from disagreeing on a legitimate head.
HEAD_LINE_ALLOWANCE = 1024
# A client that takes none of what is written to it for this long (the server's buffer stays over its high-water
# mark) is given up on and its connection dropped: otherwise one that stops reading, or pipelines requests without
# reading the answers, holds its connection, its buffered answer and a task for ever.
WRITE_STALL_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What one client may send before Moxy refuses it (the MOXY_* settings of the same names)."""

    max_url_bytes: int
    max_header_bytes: int
    max_header_fields: int
    head_timeout: float
    max_connections: int | None  # per worker; None: no limit

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientLimits:
        return cls(
            max_url_bytes=settings.max_url_bytes,
            max_header_bytes=settings.max_header_bytes,
            max_header_fields=settings.max_header_fields,
            head_timeout=settings.head_timeout,
            max_connections=settings.max_connections or None,
        )


@functools.cache
def process_limits() -> ClientLimits:
    """This process's limits. uvicorn spawns its workers, and each reads MOXY_* as `create_app` does there."""
    return ClientLimits.from_settings(load_settings())


class _Refused(Exception):
    """Raised in a parser callback to stop httptools at once; uvicorn then calls `send_400_response`, which answers
    with the status this carries instead."""

    def __init__(self, status: int, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.kind, self.reason = status, kind, reason


def refusal(kind: str, reason: str, extra: dict[str, str] | None = None) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of an answer that ends the connection: the request caused it, so no cache may keep it."""
    body = orjson.dumps({"error": kind, "reason": reason})
    headers = {
        **SECURITY_HEADERS,
        "content-type": "application/json",
        "content-length": str(len(body)),
        "cache-control": "no-store",
        **(extra or {}),
        "connection": "close",
    }
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()], body


class DrainState(ServerState):
    """uvicorn's state shared by a worker's connections, plus whether the worker has begun to drain (it stopped
    accepting: a restart replaced it, or it was told to stop). moxy.supervisor's worker server sets `draining`."""

    def __init__(self) -> None:
        super().__init__()
        self.draining = False


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with Moxy's bounds on the request head and on concurrent connections.

    `limits` is normally this process's settings; tests construct the protocol with explicit ones. `admin`: the
    connection came to the admin listener (MOXY_ADMIN_PORT), and each of its requests says so to the app in the
    ASGI scope's extensions (moxy.routes.ADMIN_LISTENER)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        limits: ClientLimits | None = None,
        admin: bool = False,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.admin = admin
        self.limits = limits or process_limits()
        self.real_app = self.app
        # uvicorn's own concurrency answer carries no Cache-Control; Moxy checks the same counts in
        # on_headers_complete and answers with its own.
        self.limit_concurrency = None
        self.in_head = True  # the next bytes belong to a request head (or nothing has arrived yet)
        self.head_started_in_chunk = False
        self.head_bytes = 0  # raw bytes of the current head, request line included
        self.url_bytes = 0
        self.field_bytes = 0
        self.field_count = 0
        self.chunk_accounted = 0  # bytes of this chunk that belonged to earlier messages
        self.message_ended_in_chunk = False
        self.refused: _Refused | None = None
        self.closing_after_refusal = False
        self.head_timer: asyncio.TimerHandle | None = None
        self.linger_timer: asyncio.TimerHandle | None = None
        self.stall_timer: asyncio.TimerHandle | None = None
        self.draining = False  # the worker is stopping: this connection's next answer is its last

    # -- connection -------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms no timer on a fresh connection, so one that never speaks would stay open for ever.
        self._arm_head_timer()
        if isinstance(self.server_state, DrainState) and self.server_state.draining:
            self.shutdown()  # accepted just before the listener closed, made after the drain began

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.head_timer, self.linger_timer, self.stall_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.linger_timer = self.stall_timer = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        # The transport's buffer passed its high-water mark: the answer now waits for the client to read. One
        # timer per stall, not per write, so the bound costs an ordinary answer nothing.
        super().pause_writing()
        if self.stall_timer is None:
            self.stall_timer = self.loop.call_later(WRITE_STALL_SECONDS, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None

    def _write_stalled(self) -> None:
        self.stall_timer = None
        # abort, not close: close would wait to flush the very buffer the client does not read.
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.closing_after_refusal:
            return  # lingering after a refusal: drain and drop
        if self.in_head and self.head_timer is None:
            # The first byte after an idle keep-alive starts the clock for this head; uvicorn's keep-alive timer,
            # which any byte (even a bare CRLF) cancels, bounds only the idle time before it.
            self._arm_head_timer()
        continuing_head = self.in_head
        self.head_started_in_chunk = False
        self.message_ended_in_chunk = False
        self.chunk_accounted = 0
        super().data_received(data)
        if self.closing_after_refusal or self.transport.is_closing() or not self.in_head:
            return
        if self.head_started_in_chunk:
            # Any bytes of this chunk before the head began belonged to earlier (pipelined) messages, and
            # on_headers_complete and on_body have counted them.
            self.head_bytes = max(0, len(data) - self.chunk_accounted)
        elif continuing_head and not self.message_ended_in_chunk:
            # The whole chunk continues a head that began in an earlier one.
            self.head_bytes += len(data)
        # Otherwise the chunk ended a body (or a message) and began nothing new: none of it is head.
        # httptools hands over a header only when it ends, so an unfinished one is bounded by the raw count.
        if self.head_bytes - self.url_bytes > self.limits.max_header_bytes + HEAD_LINE_ALLOWANCE:
            self._refuse(_Refused(431, "HeaderTooLarge", self._header_bytes_reason()))

    def shutdown(self) -> None:
        """The worker stopped accepting (uvicorn calls this on every open connection). uvicorn's own version closes
        an idle keep-alive connection at once, which resets a request the client may be sending on it at that very
        moment. Here the client is told instead: the next answer on the connection carries `Connection: close`,
        and a connection that stays idle is closed by the keep-alive timer, exactly when it would have been closed
        anyway, so a drain adds no race that keep-alive does not already have."""
        self.draining = True
        if self.closing_after_refusal or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            if not self.cycle.response_started:
                self.cycle.keep_alive = False  # the answer being made is the last, and its head will say so
            # Its head already went out without `close`: it ends as keep-alive, the next answer says close.
        elif self.timeout_keep_alive_task is None and not (self.head_bytes or self.url_bytes or self.field_count):
            # Nothing said on it yet (a head in progress is bounded by the head timer): the keep-alive time to speak.
            handler = self.timeout_keep_alive_handler
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, handler)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a head httptools cannot parse, and the way out of a callback that refused one
        self._refuse(self.refused or _Refused(400, "BadRequest", msg))

    # -- parser callbacks -------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.admin:
            self.scope["extensions"] = {ADMIN_LISTENER: {}}
        self.in_head = True
        self.head_started_in_chunk = True
        self.head_bytes = self.url_bytes = self.field_bytes = self.field_count = 0

    def on_url(self, url: bytes) -> None:
        # Called for every piece of the request target as it arrives, so this bound holds before it is joined.
        self.url_bytes += len(url)
        if self.url_bytes > self.limits.max_url_bytes:
            self._stop(_Refused(414, "URITooLong", f"request target longer than {self.limits.max_url_bytes} bytes"))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.field_count += 1
        self.field_bytes += len(name) + len(value) + 4  # ": " and CRLF, as on the wire
        if self.field_count > self.limits.max_header_fields:
            reason = f"more than {self.limits.max_header_fields} header fields"
            self._stop(_Refused(431, "HeaderTooLarge", reason))
        if self.field_bytes > self.limits.max_header_bytes:
            self._stop(_Refused(431, "HeaderTooLarge", self._header_bytes_reason()))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        # The head on the wire: the fields (counted with their ": " and CRLF), the target, and the request line's
        # method, spaces, version and CRLF plus the blank line that ends the head.
        framing = len(self.parser.get_method()) + len(" HTTP/1.1\r\n") + 1 + 2
        head = self.field_bytes + self.url_bytes + framing
        if not self.head_started_in_chunk:
            # The head began in an earlier chunk: only its bytes in this one belong to the pipelining count.
            self.chunk_accounted += max(0, head - self.head_bytes)
        else:
            self.chunk_accounted += head
        self.in_head = False
        limit = self.limits.max_connections
        busy = limit is not None and (len(self.connections) > limit or len(self.tasks) >= limit)
        self.app = self._busy if busy else self.real_app
        super().on_headers_complete()
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False  # a request during the drain: answered, with `Connection: close`
            extensions = self.scope.setdefault("extensions", {})
            extensions[DRAINING] = {}  # and /readyz says 503 (moxy.routes.DRAINING)
        sending.adopt(self.cycle, WRITE_STALL_SECONDS)

    def on_body(self, body: bytes) -> None:
        self.chunk_accounted += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.in_head = True
        self.message_ended_in_chunk = True
        self.head_bytes = self.url_bytes = self.field_bytes = self.field_count = 0
        super().on_message_complete()

    # -- refusals ---------------------------------------------------------------------------------------------

    def _header_bytes_reason(self) -> str:
        return f"header fields longer than {self.limits.max_header_bytes} bytes in all"

    def _stop(self, refused: _Refused) -> None:
        self.refused = refused
        raise refused

    def _refuse(self, refused: _Refused) -> None:
        """Answer, stop reading anything into memory, and close once the client has had time to read the answer."""
        if self.closing_after_refusal:
            return
        self.closing_after_refusal = True
        self._cancel_head_timer()
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head went wrong while an answer is being written: a second answer would corrupt it, so
            # that one finishes (on_response_complete then closes) and this one is never answered.
            self.cycle.keep_alive = False
            return
        headers, body = refusal(refused.kind, refused.reason)
        lines = [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers + headers]
        self.transport.write(b"".join([STATUS_LINE[refused.status], *lines, b"\r\n", body]))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client sees the end of the answer while we drain what it still sends
        self.flow.resume_reading()
        self.linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self.head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or not self.in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a slow pipelined head: finish the answer in progress, then close
        elif self.head_bytes or self.url_bytes or self.field_count:
            reason = f"request head not received within {self.limits.head_timeout:g} s"
            self._refuse(_Refused(408, "RequestTimeout", reason))
        else:
            self.transport.close()  # a connection that never spoke: nothing to answer

    async def _busy(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        headers, body = refusal("Busy", "too many concurrent connections", {"retry-after": "1"})
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

"""How an answer's bytes leave, on uvicorn's httptools protocol: the head and the first body bytes in one write,
and file bodies moved by the kernel (the ASGI `http.response.zerocopysend` extension).

uvicorn writes the head of an answer the moment the app starts it, and the body in a second write: two system
calls and two TCP segments for every small answer, which for a cache hit is a large share of its whole cost. Here
the head is held until the first body message and leaves with it.

A body held in a file would otherwise reach the client through Python: read into a bytes object, handed to the
transport in slices, copied again into the socket. For a 1 MiB cached image that copy loop is most of the cost of
the answer. With the extension, the kernel moves the bytes from the page cache to the socket (`os.sendfile`, run
in a worker thread, since the file's pages may first have to be read from the disk), and the event loop only waits
for the socket to take more. It is advertised in the scope of every request
(`scope["extensions"]`); an app that sees it may send
`{"type": "http.response.zerocopysend", "file": fd, "offset": n, "count": n, "more_body": bool}` after
`http.response.start` wherever it would have sent body bytes. The file descriptor stays the app's: it is never
closed here.

Everything else about the answer (Content-Length accounting, HEAD, keep-alive, completion) is uvicorn's own,
reached through its own `send`."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

if TYPE_CHECKING:
    from uvicorn._types import ASGISendEvent

__all__ = ["ZERO_COPY", "SendingCycle", "adopt"]

ZERO_COPY = "http.response.zerocopysend"
# os.sendfile moves at most this much per call, so one call never holds a worker thread for long even when the
# socket could take everything at once.
_SENDFILE_STEP = 4 * 1024 * 1024
# Fallback copy (a TLS transport, or bytes still queued in the transport): read this much at a time.
_COPY_STEP = 256 * 1024


class _HeldHead:
    """Stands in for the transport while uvicorn writes a head: keeps the bytes instead of sending them."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class _JoinedWrite:
    """Stands in for the transport while uvicorn writes a body: the held head goes out with the first write."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: asyncio.Transport, head: bytes) -> None:
        self.transport, self.head = transport, head

    def write(self, data: bytes) -> None:
        if self.head:
            data, self.head = self.head + data, b""
        if not self.transport.is_closing():  # gone before the loop said so: there is nobody to write to
            self.transport.write(data)

    def close(self) -> None:
        # uvicorn closes a connection that is not kept alive at the end of the answer: a head never joined to a
        # body (HEAD, an empty body) must still leave first.
        if self.head and not self.transport.is_closing():
            self.transport.write(self.head)
        self.head = b""
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class SendingCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, with the held head and the `http.response.zerocopysend` message."""

    stall_seconds: float = 30.0
    held_head: bytes = b""

    async def send(self, message: ASGISendEvent) -> None:
        event: Any = message
        kind = event["type"]
        if not self.disconnected and self.transport.is_closing() and self.response_started:
            # The client went away (a reset, or a half-close the protocol answers by closing) and the loop has not
            # yet said so: writing now would raise on the closed transport. Nobody is left to answer.
            self.disconnected = True
        if kind == "http.response.start" and not self.response_started:
            await self._hold_head(message)
            return
        if kind == ZERO_COPY and self.response_started and not self.response_complete:
            if self.scope["method"] != "HEAD" and not self.disconnected:
                count = int(event["count"])
                if self.chunked_encoding or count > self.expected_content_length:
                    raise RuntimeError("zero-copy send needs a Content-Length that covers it")
                self._release_head()
                if self.flow.write_paused:
                    await self.flow.drain()
                file = event["file"]
                fd = file if isinstance(file, int) else file.fileno()
                if not await self._transfer(fd, int(event.get("offset", 0)), count):
                    return  # the connection is gone (or was cut): nothing more can be said on it
                self.expected_content_length -= count
            # Completion, HEAD and keep-alive handling stay uvicorn's.
            message = {"type": "http.response.body", "body": b"", "more_body": bool(event.get("more_body", False))}
        if not self.held_head:
            await super().send(message)
            return
        real, joined = self.transport, _JoinedWrite(self.transport, self.held_head)
        self.held_head = b""
        self.transport = joined  # type: ignore[assignment]
        try:
            await super().send(message)
        finally:
            self.transport = real
        if joined.head and not self.disconnected and not real.is_closing():
            real.write(joined.head)  # nothing was written with it (HEAD, an empty body): the head goes alone

    async def _hold_head(self, message: ASGISendEvent) -> None:
        real, held = self.transport, _HeldHead()
        self.transport = held  # type: ignore[assignment]
        try:
            await super().send(message)
        finally:
            self.transport = real
        self.held_head = held.data

    def _release_head(self) -> None:
        if self.held_head:
            head, self.held_head = self.held_head, b""
            if not self.transport.is_closing():
                self.transport.write(head)

    async def _transfer(self, fd: int, offset: int, count: int) -> bool:
        """Send `count` bytes of `fd` from `offset`; False when the connection was lost or cut on the way."""
        sock = self.transport.get_extra_info("socket")
        if sock is None or self.transport.get_extra_info("sslcontext") is not None:
            return await self._copy(fd, offset, count)
        if self.transport.get_write_buffer_size():
            # Bytes the transport still holds (the head, usually) must reach the socket before the file's do.
            return await self._copy(fd, offset, count)
        try:
            # A descriptor of our own for the socket: the sending thread may still use it after the loop has
            # closed the transport's (a client that reset), and a number the loop has closed can be reused by
            # anything opened next. It is also what the loop watches for room (it refuses a second watcher on the
            # transport's own descriptor).
            out = os.dup(sock.fileno())
        except OSError:
            # Out of descriptors (many stalled clients at once): the copying way needs none.
            return await self._copy(fd, offset, count)
        end = offset + count
        loop = asyncio.get_running_loop()
        try:
            while offset < end:
                if self.disconnected:
                    return False
                try:
                    # In a worker thread: the file's pages may have to come from the disk first, and the loop must
                    # never wait for a disk. The socket is non-blocking, so the call returns as soon as its buffer
                    # is full; the bytes go from the page cache to the socket without Python copying them.
                    sent = await asyncio.to_thread(os.sendfile, out, fd, offset, min(end - offset, _SENDFILE_STEP))
                except BlockingIOError:
                    sent = None
                except OSError:
                    self._cut()  # the peer reset or went away mid-body
                    return False
                if sent == 0:
                    # The file is shorter than promised: the client must see a cut answer, never a padded one.
                    self._cut()
                    return False
                if sent is not None:
                    offset += sent
                elif not await self._writable(loop, out):
                    self._cut()  # the client took nothing for stall_seconds
                    return False
            return True
        finally:
            os.close(out)

    def _cut(self) -> None:
        """End the connection mid-answer. Marked as gone at once, so the answer's end is not reported as an app
        that stopped half-way (the client left, or was given up on: nothing went wrong in Moxy)."""
        self.disconnected = True
        self.transport.abort()

    async def _writable(self, loop: asyncio.AbstractEventLoop, fd: int) -> bool:
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(fd, wake)
        try:
            await asyncio.wait_for(ready, self.stall_seconds)
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_writer(fd)

    async def _copy(self, fd: int, offset: int, count: int) -> bool:
        end = offset + count
        while offset < end:
            if self.disconnected:
                return False
            chunk = await asyncio.to_thread(os.pread, fd, min(_COPY_STEP, end - offset), offset)
            if not chunk:
                self._cut()
                return False
            offset += len(chunk)
            self.transport.write(chunk)
            if self.flow.write_paused:
                await self.flow.drain()
        return True


def adopt(cycle: RequestResponseCycle | None, stall_seconds: float) -> None:
    """Give a fresh uvicorn cycle Moxy's way of sending, and tell its app it may send files without copying.

    The cycle is uvicorn's own object, built by the protocol; re-classing it (the subclass adds behaviour and two
    defaults, no state of its own at construction) keeps every line of uvicorn's handling while changing how the
    bytes leave."""
    if cycle is None or type(cycle) is not RequestResponseCycle:
        return
    cycle.__class__ = SendingCycle
    assert isinstance(cycle, SendingCycle)
    cycle.stall_seconds = stall_seconds
    extensions: dict[str, Any] = cycle.scope.setdefault("extensions", {})
    extensions[ZERO_COPY] = {}

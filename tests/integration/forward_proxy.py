"""A small HTTP forward proxy for integration tests (MOXY_UPSTREAM_PROXY), on raw asyncio streams in a background
thread, on 127.0.0.1 (ephemeral port)::

    with ForwardProxy(credentials=("user", "secret")) as proxy:
        proxy.url            # http://127.0.0.1:<port>, proxy.url_with("user", "secret") with credentials
        proxy.seen           # [("GET", "http://127.0.0.2:8000/pic.png"), ("CONNECT", "127.0.0.1:8443"), ...]
        proxy.refused        # requests answered 407 (no or wrong credentials), in the same form
        proxy.stop()         # down: connections to its port are refused from now on

Absolute-form requests (`GET http://host:port/path`) are forwarded in origin form with `Connection: close`, one per
client connection; CONNECT opens a tunnel to `host:port` (502 if it cannot). Nothing else is supported: this is a
test double, and it trusts the test (no policy of its own)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from types import TracebackType
from urllib.parse import quote, urlsplit

__all__ = ["ForwardProxy"]

HEAD_LIMIT = 64 * 1024


class ForwardProxy:
    def __init__(self, *, credentials: tuple[str, str] | None = None) -> None:
        self.credentials = credentials
        self.seen: list[tuple[str, str]] = []
        self.refused: list[tuple[str, str]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()  # every connection, client side and upstream side
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with(self, user: str, password: str) -> str:
        return f"http://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}"

    def start(self) -> ForwardProxy:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop)
        self._server = started.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop listening (new connections are refused) and end every open one."""
        if self._server is not None:
            server, self._server = self._server, None

            async def close() -> None:
                server.close()
                for writer in list(self._open):
                    writer.transport.abort()

            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)

    def __enter__(self) -> ForwardProxy:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    # -- inside the proxy's loop

    def _authorized(self, head: list[bytes]) -> bool:
        if self.credentials is None:
            return True
        user, password = self.credentials
        expected = b"basic " + base64.b64encode(f"{user}:{password}".encode())
        return any(line.lower() == b"proxy-authorization: " + expected.lower() for line in head[1:])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            await self._handle(reader, writer)
        finally:
            self._open.discard(writer)

    async def _connect(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(host, port)
        self._open.add(writer)  # until _close
        return reader, writer

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        head = raw[:-4].split(b"\r\n")
        method, target, _ = head[0].decode("latin-1").split(" ", 2)
        if not self._authorized(head):
            self.refused.append((method, target))
            writer.write(
                b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="test"\r\n'
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await self._close(writer)
            return
        self.seen.append((method, target))
        if method == "CONNECT":
            await self._tunnel(target, reader, writer)
        else:
            await self._forward(method, target, head[1:], reader, writer)

    async def _tunnel(self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, _, port = target.rpartition(":")
        try:
            up_reader, up_writer = await self._connect(host.strip("[]"), int(port))
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await self._close(writer)
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _forward(
        self,
        method: str,
        target: str,
        fields: list[bytes],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        parts = urlsplit(target)
        kept = [
            line
            for line in fields
            if not line.lower().startswith((b"proxy-authorization:", b"proxy-connection:", b"connection:"))
        ]
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = b"\r\n".join([f"{method} {path} HTTP/1.1".encode("latin-1"), *kept, b"Connection: close"])
        try:
            up_reader, up_writer = await self._connect(parts.hostname or "", parts.port or 80)
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await self._close(writer)
            return
        up_writer.write(request + b"\r\n\r\n")
        try:
            answer = await up_reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            await self._close(up_writer)
            await self._close(writer)
            return
        lines = [line for line in answer[:-4].split(b"\r\n") if not line.lower().startswith(b"connection:")]
        # One request per connection: the client is told, so it never reuses what the proxy is about to close.
        writer.write(b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n")
        await self._pipe(up_reader, writer)
        await self._close(up_writer)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        await self._close(sink)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        self._open.discard(writer)
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()

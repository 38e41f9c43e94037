"""How moxy.sending makes answers leave, driven through a recording transport (no sockets): the head joined to the
first body bytes in one write, and every answer shape (HEAD, empty, chunked, several body messages, connection
close) still whole and in order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from moxy.sending import ZERO_COPY, SendingCycle
from moxy.server import BoundedHttpToolsProtocol, ClientLimits
from tests.fakes.transport import FakeTransport

LIMITS = ClientLimits(
    max_url_bytes=1024, max_header_bytes=2048, max_header_fields=10, head_timeout=60.0, max_connections=None
)
App = Callable[[Any, Any, Any], Any]


def exchange(loop: asyncio.AbstractEventLoop, app: App, request: bytes) -> tuple[FakeTransport, list[Any]]:
    """Run one request through Moxy's protocol; the transport, and the scopes the app saw."""
    scopes: list[Any] = []

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        await app(scope, receive, send)

    config = Config(app=recording, lifespan="off", log_level="critical")
    protocol = BoundedHttpToolsProtocol(config, ServerState(), {}, _loop=loop, limits=LIMITS)
    transport = FakeTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    loop.run_until_complete(asyncio.sleep(0.01))
    return transport, scopes


def answer_with(*bodies: bytes, length: int | None = None, chunked: bool = False) -> App:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/plain")]
        if not chunked:
            headers.append((b"content-length", b"%d" % (sum(map(len, bodies)) if length is None else length)))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for number, body in enumerate(bodies):
            await send({"type": "http.response.body", "body": body, "more_body": number < len(bodies) - 1})

    return app


GET = b"GET /a HTTP/1.1\r\nHost: moxy\r\n\r\n"


def test_a_small_answer_leaves_in_one_write(loop: asyncio.AbstractEventLoop) -> None:
    transport, scopes = exchange(loop, answer_with(b"hello"), GET)
    assert len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 5" in head and body == b"hello"
    assert ZERO_COPY in scopes[0]["extensions"]
    assert not transport.closed


def test_a_body_in_several_messages_joins_only_its_first_part_to_the_head(loop: asyncio.AbstractEventLoop) -> None:
    transport, _ = exchange(loop, answer_with(b"one-", b"two-", b"three"), GET)
    assert len(transport.writes) == 3
    assert transport.writes[0].endswith(b"\r\n\r\none-") and transport.writes[1:] == [b"two-", b"three"]


def test_a_head_request_still_gets_its_head(loop: asyncio.AbstractEventLoop) -> None:
    transport, _ = exchange(loop, answer_with(b"", length=5), b"HEAD /a HTTP/1.1\r\nHost: moxy\r\n\r\n")
    assert bytes(transport.written).startswith(b"HTTP/1.1 200 OK")
    assert bytes(transport.written).endswith(b"content-length: 5\r\n\r\n")


def test_an_empty_body_on_a_closing_connection_sends_the_head_before_closing(
    loop: asyncio.AbstractEventLoop,
) -> None:
    transport, _ = exchange(loop, answer_with(b""), b"GET /a HTTP/1.0\r\n\r\n")
    assert bytes(transport.written).startswith(b"HTTP/1.1 200 OK")
    assert b"connection: close" in bytes(transport.written)
    assert transport.closed


def test_a_chunked_answer_keeps_its_framing(loop: asyncio.AbstractEventLoop) -> None:
    transport, _ = exchange(loop, answer_with(b"abc", b"de", chunked=True), GET)
    head, _, body = bytes(transport.written).partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    assert body == b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"


def test_the_cycle_is_moxys_for_every_request(loop: asyncio.AbstractEventLoop) -> None:
    kinds: list[type] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        kinds.append(type(send.__self__))
        await answer_with(b"x")(scope, receive, send)

    exchange(loop, app, GET + GET)  # two pipelined requests on one connection
    assert kinds == [SendingCycle, SendingCycle]


class ClosingTransport(FakeTransport):
    """Like the event loop's transports: writing once closed raises."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise RuntimeError("unable to perform operation on a closed transport")
        super().write(data)


def test_a_client_gone_before_the_loop_said_so_is_not_written_to(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    # A reset or a half-close: the transport is closed at once, the protocol hears of it a moment later.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        transport.close()
        await send({"type": "http.response.body", "body": b"ok"})

    config = Config(app=app, lifespan="off", log_level="critical")
    protocol = BoundedHttpToolsProtocol(config, ServerState(), {}, _loop=loop, limits=LIMITS)
    transport = ClosingTransport()
    protocol.connection_made(transport)
    with caplog.at_level("ERROR", logger="uvicorn.error"):
        logger = logging.getLogger("uvicorn.error")  # it does not propagate to the root logger caplog listens on
        logger.addHandler(caplog.handler)
        try:
            protocol.data_received(GET)
            loop.run_until_complete(asyncio.sleep(0.01))
        finally:
            logger.removeHandler(caplog.handler)
    assert transport.written == b""
    assert not [record for record in caplog.records if record.levelname == "ERROR"], caplog.text

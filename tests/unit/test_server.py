"""The bounded protocol of moxy.server, driven byte by byte through a fake transport (no sockets): which heads are
refused with what, how bytes are counted across chunks and pipelined requests, and what a refusal looks like."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from moxy.server import BoundedHttpToolsProtocol, ClientLimits
from tests.fakes.transport import FakeTransport

LIMITS = ClientLimits(
    max_url_bytes=1024, max_header_bytes=2048, max_header_fields=10, head_timeout=60.0, max_connections=None
)


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def connect(
    loop: asyncio.AbstractEventLoop, limits: ClientLimits = LIMITS
) -> tuple[BoundedHttpToolsProtocol, FakeTransport]:
    config = Config(app=ok_app, lifespan="off", log_level="critical")
    protocol = BoundedHttpToolsProtocol(config, ServerState(), {}, _loop=loop, limits=limits)
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport


def status_of(transport: FakeTransport) -> int:
    return int(bytes(transport.written).split(b" ", 2)[1])


def run_tasks(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0.01))


def test_a_head_within_every_bound_reaches_the_app(loop: asyncio.AbstractEventLoop) -> None:
    protocol, transport = connect(loop)
    fields = b"".join(b"X-F%d: %s\r\n" % (n, b"v" * 150) for n in range(9))  # 9 fields + Host, ~1.5 KiB
    protocol.data_received(b"GET /" + b"u" * 1000 + b" HTTP/1.1\r\nHost: moxy\r\n" + fields + b"\r\n")
    run_tasks(loop)
    assert status_of(transport) == 200
    assert not transport.closed


@pytest.mark.parametrize(
    ("head", "status"),
    [
        pytest.param(b"GET /" + b"u" * 1100 + b" HTTP/1.1\r\n\r\n", 414, id="long-url"),
        pytest.param(b"GET / HTTP/1.1\r\n" + b"X: " + b"v" * 2100 + b"\r\nY: 1\r\n\r\n", 431, id="long-field"),
        pytest.param(b"GET / HTTP/1.1\r\n" + b"".join(b"X%d: v\r\n" % n for n in range(11)) + b"\r\n", 431, id="11"),
        pytest.param(
            b"GET / HTTP/1.1\r\n" + b"".join(b"X%d: %s\r\n" % (n, b"v" * 300) for n in range(8)) + b"\r\n",
            431,
            id="sum",
        ),
        pytest.param(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400, id="malformed"),
    ],
)
def test_a_head_over_a_bound_is_refused_no_store_and_closed(
    loop: asyncio.AbstractEventLoop, head: bytes, status: int
) -> None:
    protocol, transport = connect(loop)
    protocol.data_received(head)
    assert status_of(transport) == status
    answer = bytes(transport.written).lower()
    assert b"\r\ncache-control: no-store\r\n" in answer and b"\r\nconnection: close\r\n" in answer
    assert transport.eof_written  # the answer ends here; what the client still sends is drained, then closed
    protocol.data_received(b"more bytes are dropped, never parsed")
    assert bytes(transport.written).lower() == answer


def test_an_endless_header_is_refused_by_its_raw_bytes_before_it_ends(loop: asyncio.AbstractEventLoop) -> None:
    # httptools hands a header over only when it ends, so the bound must hold on the raw bytes of the head.
    protocol, transport = connect(loop)
    protocol.data_received(b"GET / HTTP/1.1\r\nX-Endless: ")
    pieces = 0
    while not transport.written and pieces < 100:
        protocol.data_received(b"e" * 256)
        pieces += 1
    assert status_of(transport) == 431
    assert pieces * 256 <= LIMITS.max_header_bytes + 1024 + 256


def test_a_url_is_bounded_while_it_dribbles_in(loop: asyncio.AbstractEventLoop) -> None:
    protocol, transport = connect(loop)
    protocol.data_received(b"GET /")
    for _ in range(5):
        protocol.data_received(b"u" * 256)
    assert status_of(transport) == 414


def test_pipelined_requests_count_each_head_on_its_own(loop: asyncio.AbstractEventLoop) -> None:
    # Five heads of ~1.5 KiB in one chunk, the last one unfinished: 7.5 KiB in the chunk, but no head is too large.
    protocol, transport = connect(loop)
    head = b"GET / HTTP/1.1\r\nHost: moxy\r\nX-Pad: " + b"p" * 1500 + b"\r\n\r\n"
    protocol.data_received(head * 4 + head[:-10])
    run_tasks(loop)
    assert bytes(transport.written).count(b"HTTP/1.1 200") >= 1
    assert b"431" not in bytes(transport.written)
    assert not transport.closed


def test_a_slow_head_gets_408_and_a_silent_connection_is_just_closed(loop: asyncio.AbstractEventLoop) -> None:
    quick = ClientLimits(
        max_url_bytes=1024, max_header_bytes=2048, max_header_fields=10, head_timeout=0.05, max_connections=None
    )
    slow, slow_transport = connect(loop, quick)
    silent, silent_transport = connect(loop, quick)
    slow.data_received(b"GET / HTTP/1.1\r\nHo")
    loop.run_until_complete(asyncio.sleep(0.1))
    assert status_of(slow_transport) == 408
    assert silent_transport.closed and not silent_transport.written


def test_past_max_connections_the_app_is_not_called(loop: asyncio.AbstractEventLoop) -> None:
    one = ClientLimits(
        max_url_bytes=1024, max_header_bytes=2048, max_header_fields=10, head_timeout=60.0, max_connections=1
    )
    first, _ = connect(loop, one)
    second, transport = connect(loop, one)
    # Both connections share uvicorn's server state in a real server; here the second sees the first's.
    second.connections.add(first)
    second.data_received(b"GET / HTTP/1.1\r\nHost: moxy\r\n\r\n")
    run_tasks(loop)
    assert status_of(transport) == 503
    assert b"\r\ncache-control: no-store\r\n" in bytes(transport.written)


class AbortableTransport(FakeTransport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self.closed = True


def test_a_client_that_takes_nothing_is_dropped_after_the_stall_bound(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("moxy.server.WRITE_STALL_SECONDS", 0.05)
    config = Config(app=ok_app, lifespan="off", log_level="critical")
    protocol = BoundedHttpToolsProtocol(config, ServerState(), {}, _loop=loop, limits=LIMITS)
    transport = AbortableTransport()
    protocol.connection_made(transport)
    # The transport's buffer passed its high-water mark and stays there: the client reads nothing.
    protocol.pause_writing()
    loop.run_until_complete(asyncio.sleep(0.1))
    assert transport.aborted, "a stalled writer is dropped, not kept for ever"


def test_a_client_that_drains_in_time_is_kept(loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("moxy.server.WRITE_STALL_SECONDS", 0.05)
    config = Config(app=ok_app, lifespan="off", log_level="critical")
    protocol = BoundedHttpToolsProtocol(config, ServerState(), {}, _loop=loop, limits=LIMITS)
    transport = AbortableTransport()
    protocol.connection_made(transport)
    for _ in range(5):  # slow, but each stall shorter than the bound
        protocol.pause_writing()
        loop.run_until_complete(asyncio.sleep(0.02))
        protocol.resume_writing()
    loop.run_until_complete(asyncio.sleep(0.1))
    assert not transport.aborted
    protocol.connection_lost(None)


def test_a_body_that_ends_in_a_later_read_is_not_counted_as_a_head(loop: asyncio.AbstractEventLoop) -> None:
    # Found in review: the tail of a body, arriving in its own read, was added to the next head's byte count,
    # so a large-enough body made a refusal out of nothing (here the limit is 2 KiB of header bytes).
    protocol, transport = connect(loop)
    body = b"x" * 40_000
    protocol.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:100])
    run_tasks(loop)
    protocol.data_received(body[100:])
    run_tasks(loop)
    protocol.data_received(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    run_tasks(loop)
    answers = bytes(transport.written)
    assert answers.count(b"HTTP/1.1 200") == 2, answers[:300]
    assert b"431" not in answers
    protocol.connection_lost(None)


def test_many_pipelined_heads_in_one_read_are_each_counted_alone(loop: asyncio.AbstractEventLoop) -> None:
    protocol, transport = connect(loop)
    # 300 small requests in one read, 12 KiB in all: far more than the 2 KiB header bound taken together.
    protocol.data_received(b"GET /p HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n" * 300)
    run_tasks(loop)
    answers = bytes(transport.written)
    assert b"431" not in answers
    assert answers.count(b"HTTP/1.1 200") >= 1
    protocol.connection_lost(None)

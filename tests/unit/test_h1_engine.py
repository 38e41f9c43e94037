"""moxy.upstream.h1 without sockets: the request it writes, the content decoders and their per-piece bound, and the
connection protocol fed scripted bytes through a fake transport (framing, head bounds, interim answers, the reason
code of every failure, the pool's keys and limits). The engine on real sockets, next to the aiohttp one, is driven by
the integration modules that run once per engine (tests/integration/engines.py)."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import ssl
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from moxy.config import Settings
from moxy.errors import UpstreamError, UpstreamTimeout
from moxy.policy import DestinationPolicy
from moxy.upstream import ACCEPT_ENCODING, DEFAULT_ENGINE, ENGINES, REASONS, Upstream
from moxy.upstream.h1 import (
    DECODE_PIECE,
    MAX_FIELD,
    MAX_FIELDS,
    MAX_HEAD_BYTES,
    H1Engine,
    PoolKey,
    _Connection,
    _decoder,
    _request,
    _target,
    _ZlibDecoder,
)

pytestmark = pytest.mark.anyio

LOCAL = ipaddress.ip_address("127.0.0.1")
OTHER = ipaddress.ip_address("127.0.0.2")
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- the request ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://example.test/a?b=1", ("http", "example.test", 80, "/a?b=1", "example.test")),
        ("https://example.test", ("https", "example.test", 443, "/", "example.test")),
        ("http://127.0.0.1:8080/x", ("http", "127.0.0.1", 8080, "/x", "127.0.0.1:8080")),
        ("https://[::1]:8443/x", ("https", "::1", 8443, "/x", "[::1]:8443")),
        ("http://example.test:80/x#frag", ("http", "example.test", 80, "/x", "example.test")),
        # Sent as signed: escapes stay, only what HTTP cannot carry is encoded.
        (
            "http://example.test/a%2Fb/%E6%97%A5?q=a%20b",
            ("http", "example.test", 80, "/a%2Fb/%E6%97%A5?q=a%20b", "example.test"),
        ),
        ("http://example.test/\u65e5?x=\u00e9", ("http", "example.test", 80, "/%E6%97%A5?x=%C3%A9", "example.test")),
    ],
)
def test_target(url: str, expected: tuple[str, str, int, str, str]) -> None:
    assert _target(url) == expected


@pytest.mark.parametrize("url", ["ftp://example.test/", "http:///x", "http://example.test:99999/"])
def test_target_refuses_what_it_cannot_send(url: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        _target(url)
    assert caught.value.reason == "transport-error"


def test_request_is_exactly_the_given_fields_plus_host() -> None:
    sent = _request("GET", "/a", "example.test", [("Accept", "image/*"), ("X-Caf\u00e9", "cr\u00e8me")])
    assert sent == b"GET /a HTTP/1.1\r\nHost: example.test\r\nAccept: image/*\r\nX-Caf\xe9: cr\xe8me\r\n\r\n"


@pytest.mark.parametrize("field", [("X", "a\r\nEvil: 1"), ("X", "a\nb"), ("X\r\nEvil", "1"), ("X", "a\0b")])
def test_request_refuses_a_split_line(field: tuple[str, str]) -> None:
    with pytest.raises(UpstreamError) as caught:
        _request("GET", "/", "example.test", [field])
    assert caught.value.reason == "transport-error"


# -- content codings --------------------------------------------------------------------------------------------


def decode_all(decoder: Any, data: bytes, step: int = 1000) -> bytes:
    out = []
    for start in range(0, len(data), step):
        out += list(decoder.decode(data[start : start + step]))
    decoder.finish()
    return b"".join(out)


PAYLOAD = bytes(range(256)) * 2000


@pytest.mark.parametrize(
    ("coding", "data"),
    [
        ("gzip", gzip.compress(PAYLOAD)),
        ("gzip", gzip.compress(PAYLOAD[:1000]) + gzip.compress(PAYLOAD[1000:])),  # RFC 1952: members in a row
        ("deflate", zlib.compress(PAYLOAD)),
        ("deflate", zlib.compress(PAYLOAD)[2:-4]),  # raw deflate, as some servers send it
        ("GZip", gzip.compress(PAYLOAD)),
    ],
)
def test_codings_decoded(coding: str, data: bytes) -> None:
    decoder = _decoder([("Content-Type", "x/y"), ("Content-Encoding", coding)])
    assert decoder is not None
    assert decode_all(decoder, data) == PAYLOAD


def test_first_coding_field_decides_and_unknown_ones_pass() -> None:
    assert _decoder([("Content-Encoding", "identity"), ("Content-Encoding", "gzip")]) is None
    assert _decoder([("Content-Encoding", "compress")]) is None
    assert _decoder([]) is None


def test_brotli_only_with_a_module() -> None:
    # br is offered (moxy.upstream.ACCEPT_ENCODING) exactly when it can be decoded; sent anyway, it is a bad coding.
    if "br" in ACCEPT_ENCODING:
        assert _decoder([("Content-Encoding", "br")]) is not None
        return
    with pytest.raises(UpstreamError) as caught:
        _decoder([("Content-Encoding", "br")])
    assert caught.value.reason == "bad-encoding"


def test_a_bomb_comes_out_in_bounded_pieces() -> None:
    bomb = gzip.compress(bytes(64 * 1024 * 1024), 9)
    decoder = _ZlibDecoder(gzip=True)
    pieces = decoder.decode(bomb)
    seen = 0
    for piece in pieces:
        assert len(piece) <= DECODE_PIECE
        seen += len(piece)
        if seen > 4 * DECODE_PIECE:
            break  # the consumer stops here, as the fetcher's body cap does: nothing more is decoded
    assert seen <= 5 * DECODE_PIECE


@pytest.mark.parametrize(
    ("coding", "data"),
    [
        ("gzip", b"definitely not gzip"),
        ("deflate", b"\x78\x9c not deflate"),
        ("gzip", gzip.compress(PAYLOAD)[:-20]),  # cut short: not the whole body
        ("gzip", gzip.compress(PAYLOAD) + b"garbage"),
    ],
)
def test_bad_coded_bodies(coding: str, data: bytes) -> None:
    decoder = _decoder([("Content-Encoding", coding)])
    assert decoder is not None
    with pytest.raises(UpstreamError) as caught:
        decode_all(decoder, data)
    assert caught.value.reason == "bad-encoding"


def test_an_empty_coded_body_is_fine() -> None:
    decoder = _ZlibDecoder(gzip=True)
    decoder.finish()


# -- the connection protocol over a fake transport --------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """Records what is written; `answer` (bytes, or a list of reads) is delivered after the request is written."""

    def __init__(self, protocol: _Connection, answer: bytes | list[bytes] = b"", *, close_after: bool = False) -> None:
        super().__init__()
        self.protocol = protocol
        self.answer = [answer] if isinstance(answer, bytes) else list(answer)
        self.close_after = close_after
        self.written: list[bytes] = []
        self.aborted = False
        self.paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))
        loop = asyncio.get_running_loop()
        for read in self.answer:
            loop.call_soon(self.protocol.data_received, read)
        if self.close_after:
            loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.aborted

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


Script = Callable[[_Connection], FakeTransport]


def make_engine(script: Script, **options: Any) -> tuple[H1Engine, list[FakeTransport]]:
    settings: dict[str, Any] = {
        "connect_timeout": 1.0,
        "read_timeout": 1.0,
        "limit": 0,
        "limit_per_host": 0,
        "ssl_context": ssl.create_default_context(),
    }
    settings.update(options)
    engine = H1Engine(**settings)
    transports: list[FakeTransport] = []

    async def fake_open(key: PoolKey, host_key: Any, address: Any, port: int, server_name: str | None) -> _Connection:
        connection = _Connection(engine, key, host_key, settings["read_timeout"])
        transport = script(connection)
        transports.append(transport)
        connection.connection_made(transport)
        return connection

    engine._open = fake_open  # type: ignore[method-assign]
    return engine, transports


def answering(*answers: bytes | list[bytes], close_after: bool = False) -> Script:
    """Each new connection answers the next script entry to its first request."""
    queue = list(answers)

    def script(connection: _Connection) -> FakeTransport:
        return FakeTransport(connection, queue.pop(0) if queue else b"", close_after=close_after)

    return script


async def fetch(engine: H1Engine, method: str = "GET", url: str = "http://example.test/x") -> tuple[int, bytes]:
    wire = await engine.send(method, url, [("Accept", "*/*")], [LOCAL])
    body = b"".join([chunk async for chunk in wire.chunks()])
    return wire.status, body


async def failure(engine: H1Engine, method: str = "GET") -> str:
    with pytest.raises(UpstreamError) as caught:
        await fetch(engine, method)
    assert caught.value.reason in REASONS
    return caught.value.reason


async def test_content_length_body_and_reuse() -> None:
    engine, transports = make_engine(answering(OK))
    assert await fetch(engine) == (200, b"ok")
    transports[0].answer = [OK]
    assert await fetch(engine) == (200, b"ok")
    assert len(transports) == 1  # the same connection, reused after a cleanly finished body
    assert transports[0].written[0] == b"GET /x HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\n\r\n"
    await engine.aclose()
    await asyncio.sleep(0)
    assert transports[0].aborted


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3\r\n!!!\r\n0\r\n\r\n", b"ok!!!"),
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"2\r\nok\r\n", b"0\r\n\r\n"], b"ok"),
        ([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK], b"ok"),
        (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", b"ok"),  # bare LF line ends, as the aiohttp engine takes
    ],
)
async def test_framings(answer: bytes | list[bytes], body: bytes) -> None:
    engine, transports = make_engine(answering(answer))
    assert await fetch(engine) == (200, body)
    await engine.aclose()


async def test_interim_answers_leave_no_trace_in_the_final_head() -> None:
    engine, _ = make_engine(answering(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK))
    wire = await engine.send("GET", "http://example.test/", [], [LOCAL])
    assert wire.status == 200
    assert wire.raw_headers == [("Content-Length", "2")]
    await wire.abort()
    await engine.aclose()


async def test_until_close_body_is_whole_at_a_clean_close() -> None:
    engine, transports = make_engine(answering(b"HTTP/1.0 200 OK\r\n\r\nall of it", close_after=True))
    assert await fetch(engine) == (200, b"all of it")
    assert engine._idle == {}  # the close ended it: nothing to reuse
    await engine.aclose()


@pytest.mark.parametrize(
    "answer", [b"HTTP/1.1 204 No Content\r\n\r\n", b'HTTP/1.1 304 Not Modified\r\nETag: "1"\r\n\r\n']
)
async def test_no_body_statuses_are_reused(answer: bytes) -> None:
    engine, transports = make_engine(answering(answer))
    status, body = await fetch(engine)
    assert body == b""
    assert len(engine._idle) == 1
    await engine.aclose()


async def test_head_has_no_body_and_is_not_reused() -> None:
    engine, transports = make_engine(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"))
    assert await fetch(engine, "HEAD") == (200, b"")
    assert engine._idle == {}  # the body llhttp would expect is never read
    await asyncio.sleep(0)
    assert transports[0].aborted
    await engine.aclose()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"", "disconnected"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "disconnected"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "truncated"),
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nab"], "truncated"),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", "protocol-error"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok", "protocol-error"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "protocol-error"),
        (b"HTTP/1.1 200 OK\r\nX: a\0b\r\nContent-Length: 2\r\n\r\nok", "protocol-error"),
        # Bytes past the Content-Length: a second answer nobody asked for.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n", "protocol-error"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\noksurplus", "protocol-error"),
        # Broken chunking in the read that brought the head is a broken answer; in a later read, bad chunking.
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", "protocol-error"),
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"zz\r\nabc\r\n0\r\n\r\n"], "bad-chunking"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n", "protocol-error"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!", "bad-encoding"),
    ],
)
async def test_failures(answer: bytes | list[bytes], reason: str) -> None:
    engine, transports = make_engine(answering(answer, close_after=True))
    assert await failure(engine) == reason
    assert engine._idle == {}
    await engine.aclose()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 " + b"O" * (MAX_FIELD + 1) + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * (MAX_FIELD + 1) + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X" * (MAX_FIELD + 1) + b": 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_FIELDS + 1)) + b"\r\n",
    ],
)
async def test_head_bounds(head: bytes) -> None:
    engine, _ = make_engine(answering(head))
    assert await failure(engine) == "protocol-error"
    await engine.aclose()


async def test_a_head_that_never_ends_is_refused_without_growing() -> None:
    # Fields each within bounds, arriving a read at a time, never finishing the head.
    reads = [b"HTTP/1.1 200 OK\r\n"] + [b"X-Long: " + b"a" * 8000 + b"\r\n" for _ in range(MAX_HEAD_BYTES // 8000 + 2)]
    engine, transports = make_engine(answering(reads))
    assert await failure(engine) == "protocol-error"
    await engine.aclose()


async def test_read_timeout_while_waiting() -> None:
    engine, _ = make_engine(answering([]), read_timeout=0.05)
    with pytest.raises(UpstreamTimeout) as caught:
        await fetch(engine)
    assert caught.value.reason == "read-timeout"
    await engine.aclose()


async def test_abort_closes_and_never_pools() -> None:
    engine, transports = make_engine(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart"))
    wire = await engine.send("GET", "http://example.test/", [], [LOCAL])
    await wire.abort()
    await wire.abort()  # idempotent
    await asyncio.sleep(0)
    assert transports[0].aborted
    assert engine._idle == {}
    await engine.aclose()


async def test_idle_bytes_close_a_pooled_connection() -> None:
    engine, transports = make_engine(answering(OK))
    await fetch(engine)
    connection = next(iter(engine._idle.values()))[0]
    connection.data_received(b"HTTP/1.1 200 OK\r\n\r\n")  # nobody asked
    await asyncio.sleep(0)
    assert transports[0].aborted
    assert engine._idle == {}  # forgotten when it closed
    await engine.aclose()


async def test_slow_consumer_pauses_reading() -> None:
    big = b"x" * (1024 * 1024)
    answer = [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * len(big)), big, big]
    engine, transports = make_engine(answering(answer))
    wire = await engine.send("GET", "http://example.test/", [], [LOCAL])
    await asyncio.sleep(0.01)
    assert transports[0].paused  # a MiB and more undelivered: the upstream is held back
    body = b"".join([chunk async for chunk in wire.chunks()])
    assert len(body) == 2 * len(big)
    assert not transports[0].paused
    await engine.aclose()


# -- the pool -----------------------------------------------------------------------------------------------------


async def test_pool_keys_never_cross_hosts_addresses_or_tls_names() -> None:
    engine, transports = make_engine(lambda connection: FakeTransport(connection, OK))
    await fetch(engine, url="http://a.test/")
    await engine.send("GET", "http://a.test/", [], [OTHER])  # another pinned address: a new connection
    assert len(transports) == 2
    wire = await engine.send("GET", "http://b.test/", [], [LOCAL])  # another host on the same address
    await wire.abort()
    assert len(transports) == 3
    keys = {transport.protocol.key for transport in transports}
    assert ("http", "a.test", 80, "127.0.0.1", None) in keys
    assert ("http", "a.test", 80, "127.0.0.2", None) in keys
    assert ("http", "b.test", 80, "127.0.0.1", None) in keys
    await engine.aclose()


async def test_https_key_names_the_tls_server() -> None:
    engine, transports = make_engine(lambda connection: FakeTransport(connection, OK))
    await fetch(engine, url="https://a.test/")
    await fetch(engine, url="http://a.test:443/")  # same address and port, no TLS: never the TLS connection
    assert [t.protocol.key for t in transports] == [
        ("https", "a.test", 443, "127.0.0.1", "a.test"),
        ("http", "a.test", 443, "127.0.0.1", None),
    ]
    await engine.aclose()


async def test_expired_idle_connection_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, transports = make_engine(lambda connection: FakeTransport(connection, OK))
    await fetch(engine)
    monkeypatch.setattr("moxy.upstream.h1.KEEPALIVE_SECONDS", 0.0)
    await fetch(engine)
    assert len(transports) == 2
    await engine.aclose()


@pytest.mark.parametrize("limits", [{"limit": 1}, {"limit_per_host": 1}])
async def test_limits_make_the_next_request_wait(limits: dict[str, int]) -> None:
    engine, transports = make_engine(lambda connection: FakeTransport(connection, OK), **limits)
    first = await engine.send("GET", "http://a.test/", [], [LOCAL])
    second = asyncio.ensure_future(engine.send("GET", "http://a.test/", [], [LOCAL]))
    await asyncio.sleep(0.02)
    assert not second.done()
    assert b"".join([chunk async for chunk in first.chunks()]) == b"ok"  # released: the waiter goes on
    wire = await asyncio.wait_for(second, 1)
    await wire.abort()
    await engine.aclose()


async def test_connect_failures_try_each_pinned_address(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = H1Engine(
        connect_timeout=1, read_timeout=1, limit=0, limit_per_host=0, ssl_context=ssl.create_default_context()
    )
    tried: list[str] = []

    async def refuse(key: PoolKey, host_key: Any, address: Any, port: int, server_name: str | None) -> _Connection:
        tried.append(str(address))
        raise UpstreamError("connect-failed") if len(tried) == 1 else UpstreamTimeout("connect-timeout")

    engine._open = refuse  # type: ignore[method-assign]
    with pytest.raises(UpstreamTimeout) as caught:
        await engine.send("GET", "http://a.test/", [], [LOCAL, OTHER])
    assert caught.value.reason == "connect-timeout"  # the last address's failure
    assert tried == ["127.0.0.1", "127.0.0.2"]
    assert engine._in_use == 0
    await engine.aclose()
    with pytest.raises(UpstreamError):
        await engine.send("GET", "http://a.test/", [], [LOCAL])


def test_engines_by_name() -> None:
    assert ENGINES["h1"] is H1Engine


async def test_a_connection_closed_before_any_answer_is_retried_once() -> None:
    # RFC 9112 §9.3.1, as the aiohttp engine does: an idempotent request meets a server that dropped the connection.
    transports_closing: list[FakeTransport] = []

    def script(connection: _Connection) -> FakeTransport:
        transport = FakeTransport(connection, OK if transports_closing else b"", close_after=not transports_closing)
        transports_closing.append(transport)
        return transport

    engine, _ = make_engine(script)
    assert await fetch(engine) == (200, b"ok")
    assert len(transports_closing) == 2
    await engine.aclose()


async def test_no_retry_for_a_method_that_is_not_idempotent() -> None:
    engine, transports = make_engine(answering(b"", OK, close_after=True))
    with pytest.raises(UpstreamError) as caught:
        await engine.send("POST", "http://example.test/", [], [LOCAL])
    assert caught.value.reason == "disconnected"
    assert len(transports) == 1
    await engine.aclose()


# -- selection ----------------------------------------------------------------------------------------------------


def test_the_setting_names_an_engine() -> None:
    assert Settings(key=SecretStr("k" * 32), upstream_engine="h1").upstream_engine == "h1"
    assert Settings(key=SecretStr("k" * 32)).upstream_engine == DEFAULT_ENGINE
    with pytest.raises(ValidationError):
        Settings(key=SecretStr("k" * 32), upstream_engine="curl")  # type: ignore[arg-type]


def _upstream_with(engine_name: str, spool_dir: Path) -> Upstream:
    return Upstream(
        policy=DestinationPolicy.from_settings_values((), (), ()),
        connect_timeout=1,
        read_timeout=1,
        total_timeout=1,
        max_body_bytes=1,
        max_redirects=0,
        user_agent="Moxy/test",
        spool_dir=spool_dir,
        engine_name=engine_name,
    )


@pytest.mark.parametrize("name", sorted(ENGINES))
async def test_the_fetcher_builds_the_named_engine(tmp_path: Path, name: str) -> None:
    upstream = _upstream_with(name, tmp_path)
    assert isinstance(upstream._get_engine(), ENGINES[name])
    await upstream.aclose()


def test_an_unknown_engine_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown upstream engine"):
        _upstream_with("curl", tmp_path)


async def test_a_closing_idle_connection_is_not_reused() -> None:
    engine, transports = make_engine(lambda connection: FakeTransport(connection, OK))
    await fetch(engine)
    transports[0].aborted = True  # the server's FIN was seen; connection_lost has not run yet
    await fetch(engine)
    assert len(transports) == 2
    await engine.aclose()

"""moxy.upstream against the hostile Origin on loopback: bytes intact, decoding, timeouts, the size cap closing the
connection early, lying framing, and destinations that must be refused with zero connections made."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moxy.errors import DestinationRefused, UpstreamError, UpstreamTimeout
from moxy.policy import DestinationPolicy
from moxy.upstream import Upstream, UpstreamResponse
from tests.integration import engines
from tests.integration.origin import ConnectionCounter, Origin, Reply, pattern, pattern_sha256

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.usefixtures("upstream_engine")]
upstream_engine = engines.upstream_engine  # once per engine: the module proves the wire

KiB = 1024
MiB = 1024 * KiB
LOOPBACK = ("127.0.0.0/8", "::1/128")


@pytest.fixture
def counter() -> Iterator[ConnectionCounter]:
    with ConnectionCounter() as running:
        yield running


def make(tmp_path: Path, networks: tuple[str, ...] = LOOPBACK, **overrides: Any) -> Upstream:
    options: dict[str, Any] = {
        "policy": DestinationPolicy.from_settings_values(networks, (), ()),
        "connect_timeout": 2.0,
        "read_timeout": 2.0,
        "total_timeout": 20.0,
        "max_body_bytes": 64 * MiB,
        "max_redirects": 3,
        "user_agent": "Moxy/test",
        "spool_dir": tmp_path,
    }
    options.update(overrides)
    return Upstream(**options)


async def fetch(upstream: Upstream, url: str, headers: dict[str, str] | None = None) -> UpstreamResponse:
    try:
        return await upstream.fetch(url, headers or {})
    finally:
        await upstream.aclose()


def body_sha256(response: UpstreamResponse) -> str:
    if response.body is not None:
        return hashlib.sha256(response.body).hexdigest()
    assert response.body_path is not None
    digest = hashlib.sha256()
    with open(response.body_path, "rb") as file:
        while piece := file.read(MiB):
            digest.update(piece)
    return digest.hexdigest()


# -- good answers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize(("size", "spooled"), [(1 * KiB, False), (2 * MiB, False), (3 * MiB, True), (50 * MiB, True)])
async def test_bytes_intact(tmp_path: Path, origin: Origin, size: int, spooled: bool, chunked: bool) -> None:
    origin.route("/blob", Reply(stream_size=size, chunked=chunked, headers={"Content-Type": "image/png"}))
    response = await fetch(make(tmp_path), origin.url("/blob"))
    assert response.status == 200
    assert response.length == size
    assert response.declared_length == (None if chunked else size)
    assert (response.body_path is not None) is spooled
    assert body_sha256(response) == pattern_sha256(size)
    if response.body_path is not None:
        assert Path(response.body_path).parent == tmp_path
        Path(response.body_path).unlink()
    assert list(tmp_path.iterdir()) == []


async def test_gzip_decoded_and_headers_clean(tmp_path: Path, origin: Origin) -> None:
    payload = pattern(300 * KiB)
    reply = Reply.gzipped(payload, headers={"Content-Type": "application/json", "Set-Cookie": "a=b", "ETag": '"1"'})
    origin.route("/gz", reply)
    response = await fetch(make(tmp_path), origin.url("/gz"), {"Accept": "application/json", "Cookie": "s=1"})
    assert response.body == payload
    # Content-Length counts the gzip bytes on the wire, so it is not handed on as the decoded body's length.
    assert response.declared_length is None
    assert len(reply.body) < len(payload)
    assert "content-encoding" not in response.headers
    assert "set-cookie" not in response.headers
    assert response.headers["etag"] == '"1"'
    sent = origin.requests[-1].headers
    assert sent["accept-encoding"].startswith("gzip, deflate")
    assert sent["accept"] == "application/json"
    assert sent["user-agent"] == "Moxy/test"
    assert sent["via"] == "1.1 moxy"
    assert "cookie" not in sent


async def test_only_the_forwarded_headers_reach_the_wire(tmp_path: Path, origin: Origin) -> None:
    # The engine adds Host and framing, never a default Accept (it would not be in the cache key) or a cookie.
    origin.route("/h", Reply(body=b"ok"))
    given = {
        "Cookie": "session=1",
        "Authorization": "Bearer x",
        "Proxy-Authorization": "Basic y",
        "Connection": "keep-alive, X-Secret",
        "User-Agent": "curl/8",
        "Host": "other.test",
    }
    response = await fetch(make(tmp_path), origin.url("/h"), given)
    assert response.body == b"ok"
    sent = origin.requests[-1].headers
    assert sent["host"] == f"127.0.0.1:{origin.port}"
    assert sent["user-agent"] == "Moxy/test"
    assert sent["via"] == "1.1 moxy"
    for never in ("accept", "cookie", "authorization", "proxy-authorization", "x-secret"):
        assert never not in sent


async def test_engine_built_once_and_again_after_close(tmp_path: Path, origin: Origin) -> None:
    origin.route("/e", Reply(body=b"e"))
    upstream = make(tmp_path)
    assert upstream.ssl_context is not None  # the built engine's trust store
    try:
        await upstream.fetch(origin.url("/e"), {})
        engine = upstream._engine
        assert engine is not None
        await upstream.fetch(origin.url("/e"), {})
        assert upstream._engine is engine
        await upstream.aclose()
        assert upstream._engine is None
        await upstream.aclose()  # idempotent
        assert (await upstream.fetch(origin.url("/e"), {})).body == b"e"
        assert upstream._engine is not None and upstream._engine is not engine
    finally:
        await upstream.aclose()
    assert origin.hits("/e") == 3


async def test_conditional_request_returns_304(tmp_path: Path, origin: Origin) -> None:
    origin.route("/img", Reply(body=b"png", headers={"ETag": '"v7"', "Cache-Control": "max-age=60"}))
    response = await fetch(make(tmp_path), origin.url("/img"), {"If-None-Match": '"v7"'})
    assert (response.status, response.body) == (304, b"")
    assert response.headers["etag"] == '"v7"'
    assert origin.requests[-1].headers["if-none-match"] == '"v7"'


async def test_connections_are_reused(tmp_path: Path, origin: Origin) -> None:
    origin.route("/a", Reply(body=b"a" * 100))
    upstream = make(tmp_path)
    try:
        for _ in range(5):
            assert (await upstream.fetch(origin.url("/a"), {})).body == b"a" * 100
    finally:
        await upstream.aclose()
    assert origin.hits("/a") == 5
    assert origin.connections == 1


async def test_redirects_followed_and_loop_capped(tmp_path: Path, origin: Origin) -> None:
    origin.route("/start", Reply.redirect("/middle", 301))
    origin.route("/middle", Reply.redirect(origin.url("/end"), 307))
    origin.route("/end", Reply(body=b"done"))
    origin.route("/loop", Reply.redirect("/loop"))
    upstream = make(tmp_path)
    try:
        response = await upstream.fetch(origin.url("/start"), {})
        assert (response.url, response.body) == (origin.url("/end"), b"done")
        with pytest.raises(UpstreamError) as caught:
            await upstream.fetch(origin.url("/loop"), {})
        assert caught.value.reason == "too-many-redirects"
    finally:
        await upstream.aclose()
    assert origin.hits("/loop") == 4


# -- timeouts --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Reply(body=b"late", delay_headers=3), "read-timeout"),
        (Reply(body=b"late", delay_body=3), "read-timeout"),
        # Each chunk comes quickly enough; the whole does not.
        (Reply(stream_size=40 * KiB, chunk_size=KiB, chunk_delay=0.05), "total-timeout"),
    ],
)
async def test_timeouts(tmp_path: Path, origin: Origin, reply: Reply, reason: str) -> None:
    origin.route("/slow", reply)
    upstream = make(tmp_path, read_timeout=0.3, total_timeout=0.8)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await fetch(upstream, origin.url("/slow"))
    elapsed = time.monotonic() - started
    assert caught.value.reason == reason
    assert elapsed < 2.0  # loose: about the configured timeout, far below the origin's delay
    assert list(tmp_path.iterdir()) == []


async def test_connect_refused(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    with pytest.raises(UpstreamError) as caught:
        await fetch(make(tmp_path), f"http://127.0.0.1:{port}/")
    assert caught.value.reason == "connect-failed"


# -- size cap and broken framing -------------------------------------------------------------------------------


async def wait_for_stable(read: Any, settle: float = 0.3, limit: float = 5.0) -> int:
    """Poll an origin counter until it stops moving (the origin notices a closed socket asynchronously)."""
    deadline = time.monotonic() + limit
    value = read()
    while time.monotonic() < deadline:
        await asyncio.sleep(settle)
        now = read()
        if now == value:
            return int(now)
        value = now
    return int(value)


@pytest.mark.parametrize("chunked", [False, True])
async def test_over_limit_closes_early(tmp_path: Path, origin: Origin, chunked: bool) -> None:
    size = 200 * MiB
    # Chunked: no Content-Length, so the cap can only be enforced while streaming.
    origin.route("/huge", Reply(stream_size=size, chunked=chunked))
    with pytest.raises(UpstreamError) as caught:
        await fetch(make(tmp_path, max_body_bytes=1 * MiB), origin.url("/huge"))
    assert caught.value.reason == "too-large"
    sent = await wait_for_stable(lambda: origin.body_bytes_sent("/huge"))
    assert sent < 32 * MiB  # socket buffers hold a few MiB; reading on would have taken all 200
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("reply", "reasons"),
    [
        (Reply(body=b"x" * 5000, declared_length=10_000), {"truncated"}),  # shorter than declared, then FIN
        # Longer than declared: framing ends the message at Content-Length; the surplus is a broken next message.
        (Reply(body=b"x" * 10_000, declared_length=5000), {"truncated", "protocol-error"}),
        (Reply(body=b"x" * 10_000, close_after=3000, delay_body=0.05), {"truncated"}),
        (Reply(body=b"x" * 100_000, reset_after=3000, delay_body=0.05), {"truncated"}),
        (Reply(body=b"x" * 10_000, chunked=True, chunk_size=1000, close_after=3000), {"truncated"}),
        (Reply(raw=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"), {"protocol-error"}),
        (Reply(raw=b"HTTP/1.1 2x0 OK\r\n\r\n"), {"protocol-error"}),
        (Reply(raw=b""), {"disconnected"}),
        (Reply(headers={"Content-Encoding": "gzip"}, body=b"definitely not gzip"), {"bad-encoding"}),
    ],
)
async def test_broken_answers(tmp_path: Path, origin: Origin, reply: Reply, reasons: set[str]) -> None:
    origin.route("/broken", reply)
    with pytest.raises(UpstreamError) as caught:
        await fetch(make(tmp_path), origin.url("/broken"))
    assert type(caught.value) is UpstreamError
    assert caught.value.reason in reasons
    assert list(tmp_path.iterdir()) == []


async def test_truncated_spooled_body_leaves_no_file(tmp_path: Path, origin: Origin) -> None:
    origin.route("/cut", Reply(stream_size=8 * MiB, close_after=5 * MiB))
    with pytest.raises(UpstreamError, match="truncated"):
        await fetch(make(tmp_path), origin.url("/cut"))
    assert list(tmp_path.iterdir()) == []


# -- destination policy: zero connections ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/",
        "http://localhost:{port}/",
        "http://[::1]:{port}/",
        "http://2130706433:{port}/",
        "http://0x7f.1:{port}/",
        "http://[::ffff:127.0.0.1]:{port}/",
    ],
)
async def test_refused_destination_opens_no_connection(tmp_path: Path, counter: ConnectionCounter, url: str) -> None:
    with pytest.raises(DestinationRefused):
        await fetch(make(tmp_path, networks=()), url.format(port=counter.port))
    assert counter.connections == 0


async def test_redirect_to_refused_destination_opens_no_connection(tmp_path: Path, origin: Origin) -> None:
    with ConnectionCounter("127.0.0.2", ipv6=False) as target:
        origin.route("/hop", Reply.redirect(target.url("/x")))
        with pytest.raises(DestinationRefused):
            await fetch(make(tmp_path, networks=("127.0.0.1/32",)), origin.url("/hop"))
        assert origin.hits("/hop") == 1
        assert target.connections == 0


async def test_counter_does_count(counter: ConnectionCounter) -> None:
    # The zero-connection assertions above mean something only if the counter sees a real connection.
    with socket.create_connection(("127.0.0.1", counter.port)):
        pass
    assert await wait_for_stable(lambda: counter.connections, settle=0.1) == 1


# -- DNS pinning -----------------------------------------------------------------------------------------------


async def test_connects_to_the_checked_address_only(tmp_path: Path, origin: Origin) -> None:
    with ConnectionCounter("127.0.0.2", ipv6=False) as elsewhere:
        answers = ["127.0.0.1", "127.0.0.2"]
        asked: list[tuple[str, int]] = []

        async def rebinding(host: str, port: int) -> list[str]:
            # First answer: the origin. Any later lookup (a rebinding attempt) would point elsewhere.
            asked.append((host, port))
            return [answers[min(len(asked), len(answers)) - 1]]

        origin.route("/pin", Reply(body=b"pinned"))
        url = f"http://rebind.invalid:{origin.port}/pin"
        response = await fetch(make(tmp_path, resolver=rebinding), url)
        assert response.body == b"pinned"
        assert asked == [("rebind.invalid", origin.port)]  # one lookup, ours, before the check
        assert origin.hits("/pin") == 1
        assert elsewhere.connections == 0
        # Host header (and SNI for https) keep the name; only the address is pinned.
        assert origin.requests[-1].headers["host"] == f"rebind.invalid:{origin.port}"


async def test_name_resolving_to_refused_address(tmp_path: Path, counter: ConnectionCounter) -> None:
    async def to_loopback(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    with pytest.raises(DestinationRefused):
        await fetch(make(tmp_path, networks=(), resolver=to_loopback), f"http://public.invalid:{counter.port}/")
    assert counter.connections == 0

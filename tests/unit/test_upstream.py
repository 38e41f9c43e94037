"""moxy.upstream over a scripted engine (tests/fakes/engine.py): header hygiene, redirects under the policy, body
cap, failures passed on, spooling. No sockets: names resolve through a fake resolver to a public address (or a
refused one on purpose). What the wire itself does (decoding, framing, the engine's own headers, its error mapping) is
proven against the real engine in tests/integration/test_upstream_real.py and tests/unit/test_upstream_aiohttp.py."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, strategies as st

from moxy.errors import DestinationRefused, UpstreamError, UpstreamTimeout
from moxy.policy import DestinationPolicy
from moxy.upstream import (
    DROPPED_RESPONSE,
    ERROR_BODY_BYTES,
    HOST_FAILURES,
    REASONS,
    Upstream,
    _response_headers,
    _with_authority,
)
from tests.fakes.engine import FakeEngine, Handler, Reply, Sent

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def make_policy() -> DestinationPolicy:
    return DestinationPolicy.from_settings_values(allowed_networks=(), allow_hosts=(), deny_hosts=("evil.test",))


async def public_resolver(host: str, port: int) -> list[str]:
    return ["93.184.216.34"]


def make(handler: Handler, tmp_path: Path, **overrides: Any) -> tuple[Upstream, FakeEngine]:
    engine = FakeEngine(handler)
    options: dict[str, Any] = {
        "policy": make_policy(),
        "connect_timeout": 1.0,
        "read_timeout": 1.0,
        "total_timeout": 5.0,
        "max_body_bytes": 10_000,
        "max_redirects": 3,
        "user_agent": "Moxy/test",
        "spool_dir": tmp_path,
        "memory_body_bytes": 4_000,
        "resolver": public_resolver,
        "engine": engine,
    }
    options.update(overrides)
    return Upstream(**options), engine


def ok(body: bytes = b"data", **headers: str) -> Handler:
    return lambda request: Reply(200, headers=headers, body=body)


# -- request headers -------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_request_headers_forwarded_and_own_added(tmp_path: Path) -> None:
    upstream, engine = make(ok(), tmp_path)
    await upstream.fetch(
        "http://example.test/pic.png",
        {
            "Accept": "image/webp",
            "If-None-Match": '"v1"',
            "Cookie": "session=1",
            "Authorization": "Bearer x",
            "Proxy-Authorization": "Basic y",
            "Connection": "keep-alive, X-Secret",
            "User-Agent": "curl/8",
            "Host": "other.test",
        },
    )
    await upstream.aclose()
    request = engine.requests[0]
    sent = request.headers
    assert sent["accept"] == "image/webp"
    assert sent["if-none-match"] == '"v1"'
    assert sent["user-agent"] == "Moxy/test"
    assert sent["via"] == "1.1 moxy"
    assert sent["accept-encoding"].startswith("gzip, deflate")
    # The caller's Host never reaches the engine, which names the URL's host (test_upstream_real checks the wire).
    assert request.url == "http://example.test/pic.png"
    assert [name.lower() for name, _ in request.raw_headers].count("user-agent") == 1
    for never in ("cookie", "authorization", "proxy-authorization", "connection", "host"):
        assert never not in sent


@pytest.mark.anyio
async def test_no_default_accept_is_invented(tmp_path: Path) -> None:
    # What goes upstream must be exactly what the cache key describes.
    upstream, engine = make(ok(), tmp_path)
    await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert "accept" not in engine.requests[0].headers


# -- response headers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Set-Cookie",
        "Set-Cookie2",
        "Content-Encoding",
        "Content-Length",
    ],
)
def test_response_hygiene_drops(name: str) -> None:
    headers = _response_headers([(name, "v"), ("Content-Type", "image/png")])
    assert headers == {"content-type": "image/png"}


def test_response_hygiene_drops_fields_named_by_connection_and_joins_repeats() -> None:
    raw = [
        ("Connection", "X-Internal, close"),
        ("X-Internal", "secret"),
        ("Cache-Control", "max-age=60"),
        ("cache-control", "public"),
        ("ETag", '"a"'),
    ]
    assert _response_headers(raw) == {"cache-control": "max-age=60, public", "etag": '"a"'}


@pytest.mark.parametrize(
    "raw",
    [
        [("Vary", "Accept"), ("Vary", "Origin\x01")],  # one bad line spoils the field
        [("Connection", "vary"), ("Vary", "Accept")],  # named hop-by-hop
    ],
)
def test_an_unreadable_vary_fails_closed_as_vary_star(raw: list[tuple[str, str]]) -> None:
    # Dropped, it would read as "no Vary" and one variant's answer would be cached for every client.
    assert _response_headers([*raw, ("Content-Type", "image/png")]) == {"content-type": "image/png", "vary": "*"}


header_names = st.sampled_from(
    sorted(DROPPED_RESPONSE) + ["content-type", "etag", "x-custom", "Cache-Control", "SET-COOKIE", "Proxy-Foo"]
)


@given(st.lists(st.tuples(header_names, st.text(alphabet="abc ,", max_size=8)), max_size=12))
def test_response_hygiene_property(raw: list[tuple[str, str]]) -> None:
    headers = _response_headers(raw)
    for name in headers:
        assert name == name.lower()
        assert name not in DROPPED_RESPONSE
        assert not name.startswith("proxy-")
    kept = {name.lower() for name, _ in raw} - DROPPED_RESPONSE
    kept = {name for name in kept if not name.startswith("proxy-")}
    listed = {t.strip().lower() for n, v in raw if n.lower() == "connection" for t in v.split(",")}
    assert set(headers) == kept - listed


@pytest.mark.anyio
async def test_response_headers_cleaned_and_coded_body_handed_over(tmp_path: Path) -> None:
    # The engine hands over the decoded body (gzip decoding itself: test_upstream_real); the head still describes
    # the coded bytes on the wire, Content-Length included.
    payload = b"pixels" * 500
    wire = gzip.compress(payload)

    def handler(request: Sent) -> Reply:
        headers = {
            "Content-Encoding": "gzip",
            "Content-Length": str(len(wire)),
            "Set-Cookie": "a=b",
            "Content-Type": "image/png",
        }
        return Reply(200, headers=headers, body=payload)

    upstream, _ = make(handler, tmp_path)
    response = await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert response.body == payload
    assert response.length == len(payload)
    # The wire length counts gzip bytes: handed on, it would be held against the decoded body and reject it.
    assert len(wire) != len(payload)
    assert response.declared_length is None
    assert response.headers == {"content-type": "image/png"}
    assert response.request_time <= response.response_time


# -- redirects -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.anyio
async def test_redirect_followed_with_same_headers(tmp_path: Path, status: int) -> None:
    def handler(request: Sent) -> Reply:
        if request.path == "/a/old":
            return Reply(status, headers={"Location": "../new/pic.png?x=1#frag"}, body=b"moved")
        return Reply(200, body=b"found")

    upstream, engine = make(handler, tmp_path)
    response = await upstream.fetch("http://example.test/a/old", {"Accept": "image/*"})
    await upstream.aclose()
    assert response.status == 200
    assert response.body == b"found"
    assert response.url == "http://example.test/new/pic.png?x=1"
    assert engine.urls == ["http://example.test/a/old", "http://example.test/new/pic.png?x=1"]
    assert [r.headers.get("accept") for r in engine.requests] == ["image/*", "image/*"]
    # The redirect's body is never read: its connection is dropped instead.
    assert engine.wires[0].aborted and engine.wires[0].reply.served == 0


@pytest.mark.parametrize(("hops", "allowed", "ok_expected"), [(0, 0, True), (2, 2, True), (3, 2, False), (1, 0, False)])
@pytest.mark.anyio
async def test_redirect_count(tmp_path: Path, hops: int, allowed: int, ok_expected: bool) -> None:
    def handler(request: Sent) -> Reply:
        step = int(request.path.strip("/") or 0)
        if step < hops:
            return Reply(302, headers={"Location": f"/{step + 1}"})
        return Reply(200, body=b"end")

    upstream, engine = make(handler, tmp_path, max_redirects=allowed)
    if ok_expected:
        response = await upstream.fetch("http://example.test/", {})
        assert response.body == b"end"
        assert len(engine.requests) == hops + 1
    else:
        with pytest.raises(UpstreamError) as caught:
            await upstream.fetch("http://example.test/", {})
        assert caught.value.reason == "too-many-redirects"
        assert len(engine.requests) == allowed + 1
    await upstream.aclose()


@pytest.mark.anyio
async def test_redirect_loop_capped(tmp_path: Path) -> None:
    upstream, engine = make(lambda r: Reply(301, headers={"Location": r.url}), tmp_path)
    with pytest.raises(UpstreamError, match="too-many-redirects"):
        await upstream.fetch("http://example.test/loop", {})
    await upstream.aclose()
    assert len(engine.requests) == 4


@pytest.mark.parametrize(
    "location",
    ["http://evil.test/x", "http://10.1.2.3/latest/meta-data", "//evil.test/x"],
)
@pytest.mark.anyio
async def test_redirect_to_refused_destination_never_requested(tmp_path: Path, location: str) -> None:
    upstream, engine = make(lambda r: Reply(302, headers={"Location": location}), tmp_path)
    with pytest.raises(DestinationRefused):
        await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert engine.urls == ["http://example.test/"]


@pytest.mark.parametrize(
    "location",
    [
        "ftp://example.test/file",
        "javascript:alert(1)",
        "file:///etc/passwd",
        "https://:80/no-host",
        "http://[::1/unclosed",
        "/a\tb",
        "/a b",
    ],
)
@pytest.mark.anyio
async def test_redirect_to_non_http_is_an_upstream_error(tmp_path: Path, location: str) -> None:
    upstream, engine = make(lambda r: Reply(302, headers={"Location": location}), tmp_path)
    with pytest.raises(UpstreamError) as caught:
        await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert caught.value.reason == "bad-redirect"
    assert len(engine.requests) == 1


@pytest.mark.anyio
async def test_redirect_without_location_is_returned(tmp_path: Path) -> None:
    upstream, _ = make(lambda r: Reply(302, body=b"nowhere"), tmp_path)
    response = await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert (response.status, response.body) == (302, b"nowhere")


@pytest.mark.anyio
async def test_redirect_to_host_resolving_to_refused_address(tmp_path: Path) -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["10.0.0.7"] if host == "internal.test" else ["93.184.216.34"]

    upstream, engine = make(
        lambda r: Reply(302, headers={"Location": "http://internal.test/"}), tmp_path, resolver=resolver
    )
    with pytest.raises(DestinationRefused):
        await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert len(engine.requests) == 1


# -- destination and resolution --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://evil.test/", "http://10.0.0.1/", "gopher://example.test/", "http://0x7f.1/", "http://[::1]/"]
)
@pytest.mark.anyio
async def test_refused_first_url_makes_no_request(tmp_path: Path, url: str) -> None:
    upstream, engine = make(ok(), tmp_path)
    with pytest.raises(DestinationRefused):
        await upstream.fetch(url, {})
    await upstream.aclose()
    assert engine.requests == []


@pytest.mark.anyio
async def test_engine_gets_the_checked_addresses(tmp_path: Path) -> None:
    async def two_public(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]

    upstream, engine = make(ok(), tmp_path, resolver=two_public)
    await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert [str(address) for address in engine.requests[0].pinned] == [
        "93.184.216.34",
        "2606:2800:220:1:248:1893:25c8:1946",
    ]


async def resolves_to_nothing(host: str, port: int) -> list[str]:
    return []


async def resolves_with_error(host: str, port: int) -> list[str]:
    raise OSError("name not known")


async def resolves_never(host: str, port: int) -> list[str]:
    await asyncio.Event().wait()
    return []


async def resolves_private(host: str, port: int) -> list[str]:
    return ["93.184.216.34", "10.9.9.9"]


@pytest.mark.parametrize(
    ("resolver", "error", "reason"),
    [
        (resolves_to_nothing, UpstreamError, "dns-failed"),
        (resolves_with_error, UpstreamError, "dns-failed"),
        (resolves_never, UpstreamTimeout, "dns-timeout"),
        (resolves_private, DestinationRefused, "host example.test resolves to a private address"),
    ],
)
@pytest.mark.anyio
async def test_resolution_failures(tmp_path: Path, resolver: Any, error: type[Exception], reason: str) -> None:
    upstream, engine = make(ok(), tmp_path, resolver=resolver, connect_timeout=0.01)
    with pytest.raises(error) as caught:
        await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert getattr(caught.value, "reason", None) == reason
    assert engine.requests == []


# -- body size -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "too_large"), [(10_000, False), (10_001, True)])
@pytest.mark.anyio
async def test_body_cap_streamed(tmp_path: Path, size: int, too_large: bool) -> None:
    # No Content-Length: the cap must be enforced while counting.
    reply = Reply(200, chunks=[b"x" * 1000] * (size // 1000) + [b"x" * (size % 1000)])
    upstream, engine = make(lambda r: reply, tmp_path)
    if too_large:
        with pytest.raises(UpstreamError) as caught:
            await upstream.fetch("http://example.test/", {})
        assert caught.value.reason == "too-large"
        assert caught.value.status == 200
        assert reply.served == 11  # stopped at the first chunk past the cap
        assert engine.wires[0].aborted  # the connection is closed, not drained
    else:
        response = await upstream.fetch("http://example.test/", {})
        assert response.length == size
    await upstream.aclose()
    assert not too_large or list(tmp_path.iterdir()) == []


@pytest.mark.anyio
async def test_declared_length_over_cap_refused_before_reading(tmp_path: Path) -> None:
    reply = Reply(200, headers={"Content-Length": "20000"}, chunks=[b"x" * 100] * 200)
    upstream, engine = make(lambda r: reply, tmp_path)
    with pytest.raises(UpstreamError, match="too-large"):
        await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert reply.served == 0
    assert engine.wires[0].aborted


@pytest.mark.anyio
async def test_error_status_returned_with_sampled_body(tmp_path: Path) -> None:
    reply = Reply(503, chunks=[b"e" * 16_384] * 10)
    upstream, engine = make(lambda r: reply, tmp_path, max_body_bytes=10**6)
    response = await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert response.status == 503
    assert response.body == b"e" * ERROR_BODY_BYTES
    assert reply.served < 10
    assert engine.wires[0].aborted


@pytest.mark.parametrize("status", [304, 204])
@pytest.mark.anyio
async def test_bodiless_statuses_returned(tmp_path: Path, status: int) -> None:
    upstream, _ = make(lambda r: Reply(status, headers={"ETag": '"v2"'}), tmp_path)
    response = await upstream.fetch("http://example.test/", {"If-None-Match": '"v2"'})
    await upstream.aclose()
    assert (response.status, response.body, response.length) == (status, b"", 0)
    assert response.headers["etag"] == '"v2"'


@pytest.mark.anyio
async def test_head_reads_no_body(tmp_path: Path) -> None:
    upstream, engine = make(lambda r: Reply(200, headers={"Content-Length": "500"}), tmp_path)
    response = await upstream.fetch("http://example.test/", {}, method="HEAD")
    await upstream.aclose()
    assert engine.requests[0].method == "HEAD"
    assert (response.body, response.declared_length) == (b"", 500)


# -- framing and engine failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("declared", [50, 150])
@pytest.mark.anyio
async def test_length_mismatch_is_truncated(tmp_path: Path, declared: int) -> None:
    reply = Reply(200, headers={"Content-Length": str(declared)}, chunks=[b"x" * 100])
    upstream, _ = make(lambda r: reply, tmp_path)
    with pytest.raises(UpstreamError) as caught:
        await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert caught.value.reason == "truncated"


def raising(exc: Exception) -> Handler:
    def handler(request: Sent) -> Reply:
        raise exc

    return handler


def failing_body(exc: Exception, **headers: str) -> Handler:
    return lambda request: Reply(200, headers=headers, chunks=[b"ab"], error=exc)


@pytest.mark.parametrize(
    ("handler", "error", "reason"),
    [
        (raising(UpstreamTimeout("connect-timeout")), UpstreamTimeout, "connect-timeout"),
        (raising(UpstreamTimeout("read-timeout")), UpstreamTimeout, "read-timeout"),
        (raising(UpstreamError("connect-failed")), UpstreamError, "connect-failed"),
        (raising(UpstreamError("tls-error")), UpstreamError, "tls-error"),
        (raising(UpstreamError("disconnected")), UpstreamError, "disconnected"),
        (raising(UpstreamError("protocol-error")), UpstreamError, "protocol-error"),
        (raising(UpstreamError("transport-error")), UpstreamError, "transport-error"),
        # A timeout of the engine's own that is not the fetch's total budget is a read timeout.
        (raising(TimeoutError()), UpstreamTimeout, "read-timeout"),
        (failing_body(UpstreamError("truncated")), UpstreamError, "truncated"),
        (failing_body(UpstreamError("bad-chunking")), UpstreamError, "bad-chunking"),
        (failing_body(UpstreamTimeout("read-timeout")), UpstreamTimeout, "read-timeout"),
        (failing_body(UpstreamError("bad-encoding"), **{"Content-Encoding": "gzip"}), UpstreamError, "bad-encoding"),
        (failing_body(UpstreamError("too-large"), **{"Content-Encoding": "gzip"}), UpstreamError, "too-large"),
        (failing_body(UpstreamError("protocol-error")), UpstreamError, "protocol-error"),
    ],
)
@pytest.mark.anyio
async def test_engine_failures_are_passed_on(
    tmp_path: Path, handler: Handler, error: type[UpstreamError], reason: str
) -> None:
    upstream, engine = make(handler, tmp_path)
    with pytest.raises(UpstreamError) as caught:
        await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert type(caught.value) is error
    assert caught.value.reason == reason
    assert reason in REASONS
    assert all(wire.aborted for wire in engine.wires)  # a failed body never goes back to the pool
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("reason", sorted(HOST_FAILURES))
@pytest.mark.anyio
async def test_host_failures_open_the_breaker(tmp_path: Path, reason: str) -> None:
    # A host that gives no answer, again and again, is not asked for a while: the next fetch fails at once.
    failure = UpstreamTimeout(reason) if reason.endswith("timeout") else UpstreamError(reason)
    upstream, engine = make(raising(failure), tmp_path, breaker_failures=2, breaker_cooldown=60)
    for _ in range(2):
        with pytest.raises(UpstreamError, match=reason):
            await upstream.fetch("http://example.test/", {})
    with pytest.raises(UpstreamError) as caught:
        await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert caught.value.reason == "host-unavailable"
    assert len(engine.requests) == 2


@pytest.mark.anyio
async def test_answers_that_are_not_host_failures_keep_the_breaker_shut(tmp_path: Path) -> None:
    upstream, engine = make(failing_body(UpstreamError("bad-encoding")), tmp_path, breaker_failures=2)
    for _ in range(3):
        with pytest.raises(UpstreamError, match="bad-encoding"):
            await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert len(engine.requests) == 3


@pytest.mark.anyio
async def test_total_timeout_covers_the_body(tmp_path: Path) -> None:
    reply = Reply(200, chunks=[b"start"], hang=True)
    upstream, _ = make(lambda r: reply, tmp_path, total_timeout=0.05, read_timeout=60)
    with pytest.raises(UpstreamTimeout) as caught:
        await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert caught.value.reason == "total-timeout"


# -- spooling --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "spooled"), [(4_000, False), (4_001, True), (9_999, True)])
@pytest.mark.anyio
async def test_spooling_threshold(tmp_path: Path, size: int, spooled: bool) -> None:
    body = bytes(i % 256 for i in range(size))
    reply = Reply(200, chunks=[body[i : i + 700] for i in range(0, size, 700)])
    upstream, _ = make(lambda r: reply, tmp_path)
    response = await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert response.length == size
    if spooled:
        assert response.body is None
        assert response.body_path is not None
        path = Path(response.body_path)
        assert path.parent == tmp_path
        # Caller-owned: still there after the client is closed.
        assert path.read_bytes() == body
        path.unlink()
    else:
        assert response.body == body
        assert response.body_path is None
        assert list(tmp_path.iterdir()) == []


@pytest.mark.anyio
async def test_spool_file_removed_when_body_fails(tmp_path: Path) -> None:
    reply = Reply(200, chunks=[b"x" * 3_000, b"y" * 3_000], error=UpstreamError("truncated"))
    upstream, _ = make(lambda r: reply, tmp_path)
    with pytest.raises(UpstreamError, match="truncated"):
        await upstream.fetch("http://example.test/", {})
    await upstream.aclose()
    assert reply.served == 2  # the body did pass the memory bound, so a spool file existed
    assert list(tmp_path.iterdir()) == []


# -- engine lifecycle ------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_given_engine_used_for_every_fetch_and_closed_once(tmp_path: Path) -> None:
    upstream, engine = make(ok(), tmp_path)
    await upstream.fetch("http://example.test/1", {})
    await upstream.fetch("http://example.test/2", {})
    assert upstream._engine is engine
    await upstream.aclose()
    assert upstream._engine is None
    assert engine.closed == 1
    await upstream.aclose()  # idempotent
    assert engine.closed == 1
    assert len(engine.requests) == 2


def test_trust_store_loaded_only_for_the_built_engine(tmp_path: Path) -> None:
    # Loading the system trust store takes tens of ms: a fetcher given its engine does without.
    given, _ = make(ok(), tmp_path)
    assert given.ssl_context is None
    built, _ = make(ok(), tmp_path, engine=None)
    assert built.ssl_context is not None


@pytest.mark.parametrize(
    ("url", "authority", "expected"),
    [
        ("http://1572395042/a?b#c", "93.184.216.34", "http://93.184.216.34/a?b#c"),
        ("http://EXAMPLE.test:80/p?", "example.test", "http://example.test/p?"),
        ("https://example.test:8443", "example.test:8443", "https://example.test:8443"),
        ("http://h?q=/x", "h", "http://h?q=/x"),
        ("http://[0:0::1]:81/", "[::1]:81", "http://[::1]:81/"),
    ],
)
def test_authority_rewrite_keeps_the_rest(url: str, authority: str, expected: str) -> None:
    assert _with_authority(url, authority) == expected


@pytest.mark.anyio
async def test_request_goes_to_the_canonical_host(tmp_path: Path) -> None:
    # WHATWG host parsing: the decimal spelling of 93.184.216.34 is requested as the dotted address.
    upstream, engine = make(ok(), tmp_path)
    response = await upstream.fetch("http://1572395042/x?y", {})
    await upstream.aclose()
    assert engine.urls == ["http://93.184.216.34/x?y"]
    assert [str(address) for address in engine.requests[0].pinned] == ["93.184.216.34"]
    assert response.url == "http://93.184.216.34/x?y"

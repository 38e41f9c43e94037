"""moxy.upstream.aiohttp without sockets: every aiohttp failure maps to its reason code (the order of the checks
matters, aiohttp's exception classes nest), and the pinned resolver answers only with the checked addresses.
The engine on the wire is driven in tests/integration/test_upstream_real.py."""

from __future__ import annotations

import ipaddress
import socket
import ssl

import aiohttp
import pytest
import yarl
from aiohttp import http_exceptions
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict, CIMultiDictProxy

from moxy.errors import UpstreamError, UpstreamTimeout
from moxy.upstream import REASONS
from moxy.upstream.aiohttp import _PINNED, _PinnedResolver, error_for

KEY = ConnectionKey("example.test", 443, True, True, None, None, None)
REQUEST = aiohttp.RequestInfo(
    yarl.URL("http://example.test/"), "GET", CIMultiDictProxy(CIMultiDict()), yarl.URL("http://example.test/")
)


def payload_error(cause: Exception | None) -> aiohttp.ClientPayloadError:
    error = aiohttp.ClientPayloadError("payload")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("exc", "error", "in_head", "in_body"),
    [
        # Connect timeouts are server timeouts too in aiohttp: checked first.
        (aiohttp.ConnectionTimeoutError(), UpstreamTimeout, "connect-timeout", "connect-timeout"),
        (aiohttp.SocketTimeoutError(), UpstreamTimeout, "read-timeout", "read-timeout"),
        (aiohttp.ServerTimeoutError(), UpstreamTimeout, "read-timeout", "read-timeout"),
        (payload_error(http_exceptions.DecompressSizeError("bomb")), UpstreamError, "too-large", "too-large"),
        (payload_error(http_exceptions.ContentEncodingError("x")), UpstreamError, "bad-encoding", "bad-encoding"),
        (
            payload_error(http_exceptions.TransferEncodingError("bad chunk size")),
            UpstreamError,
            "bad-chunking",
            "bad-chunking",
        ),
        (
            payload_error(http_exceptions.TransferEncodingError("Not enough data to satisfy transfer length header.")),
            UpstreamError,
            "truncated",
            "truncated",
        ),
        (payload_error(None), UpstreamError, "truncated", "truncated"),
        # TLS failures are connector errors too: checked before them.
        (aiohttp.ClientConnectorSSLError(KEY, ssl.SSLError()), UpstreamError, "tls-error", "tls-error"),
        (
            aiohttp.ClientConnectorCertificateError(KEY, ssl.SSLCertVerificationError()),
            UpstreamError,
            "tls-error",
            "tls-error",
        ),
        (aiohttp.ServerFingerprintMismatch(b"a", b"b", "example.test", 443), UpstreamError, "tls-error", "tls-error"),
        (
            aiohttp.ClientConnectorError(KEY, ConnectionRefusedError()),
            UpstreamError,
            "connect-failed",
            "connect-failed",
        ),
        (aiohttp.ClientConnectorDNSError(KEY, OSError()), UpstreamError, "connect-failed", "connect-failed"),
        # The forward proxy's own failures (MOXY_UPSTREAM_PROXY) nest in the connector and response errors.
        (
            aiohttp.ClientProxyConnectionError(KEY, ConnectionRefusedError()),
            UpstreamError,
            "proxy-failed",
            "proxy-failed",
        ),
        (aiohttp.ClientHttpProxyError(REQUEST, (), status=407), UpstreamError, "proxy-refused", "proxy-refused"),
        (aiohttp.ServerDisconnectedError(), UpstreamError, "disconnected", "truncated"),
        (aiohttp.ClientOSError(), UpstreamError, "disconnected", "truncated"),
        (ConnectionResetError(), UpstreamError, "disconnected", "truncated"),
        (aiohttp.ClientResponseError(REQUEST, ()), UpstreamError, "protocol-error", "protocol-error"),
        (aiohttp.InvalidURL("http://[::1"), UpstreamError, "transport-error", "transport-error"),
        (OSError("other"), UpstreamError, "transport-error", "transport-error"),
    ],
)
def test_error_mapping(exc: BaseException, error: type[UpstreamError], in_head: str, in_body: str) -> None:
    for in_body_flag, reason in ((False, in_head), (True, in_body)):
        mapped = error_for(exc, in_body=in_body_flag)
        assert type(mapped) is error
        assert mapped.reason == reason
        assert reason in REASONS


@pytest.mark.anyio
async def test_resolver_asks_the_system_for_the_proxys_name_only() -> None:
    resolver = _PinnedResolver(proxy_host="localhost")
    try:
        answers = await resolver.resolve("localhost", 3128)
        assert answers and all(ipaddress.ip_address(a["host"]).is_loopback for a in answers)
        with pytest.raises(OSError):  # any other name is still only what the policy checked
            await resolver.resolve("example.test", 80)
    finally:
        await resolver.close()


@pytest.mark.anyio
async def test_resolver_answers_only_with_the_pinned_addresses() -> None:
    resolver = _PinnedResolver()
    # Fail closed: a lookup outside a checked hop never becomes a connection.
    with pytest.raises(OSError):
        await resolver.resolve("example.test", 80)
    token = _PINNED.set((ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("2001:db8::1")))
    try:
        answers = await resolver.resolve("example.test", 8080)
    finally:
        _PINNED.reset(token)
    assert [(a["hostname"], a["host"], a["port"], a["family"]) for a in answers] == [
        ("example.test", "93.184.216.34", 8080, socket.AF_INET),
        ("example.test", "2001:db8::1", 8080, socket.AF_INET6),
    ]
    assert all(a["flags"] == socket.AI_NUMERICHOST for a in answers)
    await resolver.close()

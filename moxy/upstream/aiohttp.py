"""The production engine of the fetcher: aiohttp, one pooled session, DNS replaced by the addresses the policy
checked. The only module that imports aiohttp; only `moxy.upstream` imports it.

It sends exactly one request per call (no redirects), connects only to the pinned addresses of that hop (or, with a
forward proxy, to the proxy, as moxy.upstream.egress describes), and maps every aiohttp failure to an
`UpstreamError` with a code from `moxy.upstream.REASONS`."""

from __future__ import annotations

import contextvars
import socket
import ssl
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

from moxy.errors import UpstreamError, UpstreamTimeout
from moxy.upstream.egress import ForwardProxy

if TYPE_CHECKING:
    from moxy.policy import IPAddress

__all__ = ["AiohttpEngine", "error_for"]

# The addresses the policy accepted for the hop being connected right now. A context variable, not an attribute,
# so concurrent fetches on one session never see each other's pins (aiohttp resolves inside the caller's task).
_PINNED: contextvars.ContextVar[tuple[IPAddress, ...] | None] = contextvars.ContextVar(
    "moxy_upstream_pinned", default=None
)


class _PinnedResolver(AbstractResolver):
    """aiohttp resolver that answers only with the checked addresses of the current hop and never asks DNS; except
    for the forward proxy's own name (`proxy_host`), the one address the operator chose, exempt from the policy."""

    def __init__(self, proxy_host: str | None = None) -> None:
        self.proxy_host = proxy_host
        self.system = aiohttp.ThreadedResolver() if proxy_host is not None else None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self.system is not None and host == self.proxy_host:
            return await self.system.resolve(host, port, socket.AF_UNSPEC)
        pinned = _PINNED.get()
        if pinned is None:
            # Fail closed: a lookup we did not check must never turn into a connection.
            raise OSError(f"no checked address for {host!r}")
        return [
            {
                "hostname": host,
                "host": str(address),
                "port": port,
                "family": socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in pinned
        ]

    async def close(self) -> None:
        if self.system is not None:
            await self.system.close()


def error_for(exc: BaseException, *, in_body: bool) -> UpstreamError:
    """The UpstreamError (code from REASONS) an aiohttp failure stands for; `in_body`: it came after the head."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout("connect-timeout")
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return UpstreamTimeout("read-timeout")
    if isinstance(exc, aiohttp.ClientPayloadError):
        cause = exc.__cause__
        if isinstance(cause, aiohttp.http_exceptions.DecompressSizeError):
            return UpstreamError("too-large")  # a decompression bomb, stopped by aiohttp's own per-chunk limit
        if isinstance(cause, aiohttp.http_exceptions.ContentEncodingError):
            return UpstreamError("bad-encoding")
        if isinstance(cause, aiohttp.http_exceptions.TransferEncodingError) and "Not enough data" not in str(cause):
            return UpstreamError("bad-chunking")
        return UpstreamError("truncated")
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return UpstreamError("proxy-failed")
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return UpstreamError("proxy-refused", status=exc.status)
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch):
        return UpstreamError("tls-error")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError("connect-failed")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | ConnectionError):
        return UpstreamError("truncated" if in_body else "disconnected")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamError("protocol-error")
    return UpstreamError("transport-error")


class _AiohttpWire:
    """One aiohttp response whose head has arrived; the body is read through `chunks()` (a `moxy.upstream.Wire`)."""

    __slots__ = ("protocol", "raw_headers", "response", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.raw_headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response.raw_headers]
        # Kept because aiohttp hands the connection back to its pool the moment the body ends.
        connection = response.connection
        self.protocol = connection.protocol if connection is not None else None

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        content = self.response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                yield chunk
        except (aiohttp.ClientError, OSError) as exc:
            raise error_for(exc, in_body=True) from exc
        # Bytes past the declared Content-Length fail to parse as a next message after the body has ended
        # cleanly; that parse failure is the only sign the upstream sent more than it announced (a length lie).
        # Only a parse failure counts: a server that closes after a complete body (HTTP/1.0 style, or
        # `Connection: close`) leaves a disconnect error here too, and that answer is whole.
        if self.protocol is not None and isinstance(
            self.protocol.exception(), aiohttp.http_exceptions.HttpProcessingError
        ):
            raise UpstreamError("protocol-error")

    async def abort(self) -> None:
        self.response.close()


class AiohttpEngine:
    """aiohttp underneath, one pooled session, DNS replaced by the pinned resolver (a `moxy.upstream.Engine`).
    Build it inside the running loop: the session binds to it."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        limit: int,
        limit_per_host: int,
        ssl_context: ssl.SSLContext,
        proxy: ForwardProxy | None = None,
    ) -> None:
        self._proxy = proxy
        self._proxy_url = yarl.URL(proxy.url) if proxy is not None else None
        self._proxy_auth = (
            aiohttp.BasicAuth(proxy.username, proxy.password or "")
            if proxy is not None and proxy.username is not None
            else None
        )
        connector = aiohttp.TCPConnector(
            resolver=_PinnedResolver(proxy.host if proxy is not None else None),
            # The name checked against the certificate (and sent as SNI) is the URL's host, never the pinned address.
            ssl=ssl_context,
            use_dns_cache=False,  # a cache would answer from an earlier hop's check
            limit=limit,
            limit_per_host=limit_per_host,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout),
            cookie_jar=aiohttp.DummyCookieJar(),  # cookies never cross, not even between upstreams
            auto_decompress=True,
            trust_env=False,  # no proxy from the environment may sit between us and the checked address
            skip_auto_headers=("Accept",),  # send only what the caller forwarded: it is part of the cache key
            raise_for_status=False,
        )

    async def send(
        self, method: str, url: str, headers: list[tuple[str, str]], pinned: list[IPAddress]
    ) -> _AiohttpWire:
        # encoded=True sends the signed URL as it is, instead of yarl's re-quoting (which could change its meaning).
        target = yarl.URL(url, encoded=True) if url.isascii() else yarl.URL(url)
        if self._proxy is not None:
            return await self._send_through_proxy(method, target, headers, pinned)
        # Set around exactly one request (aiohttp follows no redirects here), so the pin cannot leak to another URL.
        token = _PINNED.set(tuple(pinned))
        try:
            response = await self._session.request(
                method, target, headers=headers, allow_redirects=False, read_until_eof=True
            )
        except (aiohttp.ClientError, OSError) as exc:
            raise error_for(exc, in_body=False) from exc
        finally:
            _PINNED.reset(token)
        return _AiohttpWire(response)

    async def _send_through_proxy(
        self, method: str, target: yarl.URL, headers: list[tuple[str, str]], pinned: list[IPAddress]
    ) -> _AiohttpWire:
        """http: absolute-form to the proxy by name; https: a tunnel to a checked address, TLS named by the host
        (moxy.upstream.egress says why)."""
        attempts: list[tuple[yarl.URL, list[tuple[str, str]], str | None]]
        if target.scheme == "http":
            attempts = [(target, headers, None)]
        else:
            name, host = target.raw_host or "", target.host_port_subcomponent or ""
            # One tunnel per checked address, in the policy's order, until one opens (as direct connections try).
            attempts = [(target.with_host(str(address)), [("Host", host), *headers], name) for address in pinned]
        failure = UpstreamError("connect-failed")
        for url, fields, server_name in attempts:
            try:
                response = await self._session.request(
                    method,
                    url,
                    headers=fields,
                    allow_redirects=False,
                    read_until_eof=True,
                    proxy=self._proxy_url,
                    proxy_auth=self._proxy_auth,
                    server_hostname=server_name,
                )
            except (aiohttp.ClientError, OSError) as exc:
                failure = error_for(exc, in_body=False)
                # The proxy down, or refusing our credentials: another address would not help. A tunnel the proxy
                # could not open (its 502 for that address), or TLS that failed in it, may work to the next one.
                if failure.reason == "proxy-failed" or failure.status == 407:
                    raise failure from exc
                continue
            if response.status == 407:
                # The proxy's own answer to a request it would not forward: never the upstream's.
                response.close()
                raise UpstreamError("proxy-refused", status=407)
            return _AiohttpWire(response)
        raise failure

    async def aclose(self) -> None:
        await self._session.close()

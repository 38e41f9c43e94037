"""The forward proxy every upstream request goes through when MOXY_UPSTREAM_PROXY is set: its address and
credentials, and what both engines send it. Imports no HTTP library.

How a target is reached through it, and why (the destination policy has checked the name and its addresses first,
moxy.upstream `_check`):
- https: a tunnel by `CONNECT <checked address>:<port>` (RFC 9110 §9.3.6), then TLS inside it named and verified by
  the URL's host. The proxy connects to the address Moxy checked, so a name that resolves differently for the proxy
  (DNS rebinding) cannot move the connection elsewhere, exactly as without a proxy.
- http: an absolute-form request (`GET http://host/path`, RFC 9112 §3.2.2), which the proxy resolves itself. An
  address in the target would not do: the proxy must then send the address as the Host, which breaks every
  name-based site. What stays is the window between Moxy's lookup and the proxy's, so the proxy's own rules
  (refusing private ranges) are the guard there; https targets have no such window."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

__all__ = ["ForwardProxy", "connect_request"]


@dataclass(frozen=True, slots=True)
class ForwardProxy:
    """An HTTP forward proxy: where it listens, and its Basic credentials (never in `repr`, logs or errors)."""

    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> ForwardProxy:
        """`http://[user:pass@]host[:port]`. Raises ValueError with a message that never repeats the URL (it may
        hold the password)."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            raise ValueError("is not a URL (http://[user:pass@]host:port)") from None
        if parts.scheme.lower() != "http":
            # TLS to the proxy itself (an https:// proxy) is not supported: the tunnel's TLS is end to end anyway.
            raise ValueError("must be an http:// URL (http://[user:pass@]host:port)")
        if not parts.hostname:
            raise ValueError("names no host (http://[user:pass@]host:port)")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("takes no path or query (http://[user:pass@]host:port)")
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(parts.hostname, port or 80, username, password)

    @property
    def url(self) -> str:
        """The proxy's address as a URL, without credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def authorization(self) -> str | None:
        """The Proxy-Authorization value (RFC 9110 §11.7.2; Basic, RFC 7617), or None without credentials."""
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def connect_request(address: str, port: int, proxy: ForwardProxy) -> bytes:
    """The CONNECT request opening a tunnel to `address` (a checked IP literal) and `port`."""
    authority = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization is not None:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

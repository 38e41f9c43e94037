"""Loopback ports for servers a test starts by port number (nginx, redis-server, `moxy serve --port`)."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at the moment of the call. The probe socket is closed before the caller's server
    binds, so another process may take the port in between: a caller that cannot bear that binds the socket itself
    and hands it over (as MoxyServer does), or retries on another port (as NginxCache does)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port

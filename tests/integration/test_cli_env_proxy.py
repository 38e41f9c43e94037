"""The `moxy` client commands never send their requests, and the secrets in them (the purge token, the origin
secret), to a proxy named in the environment: each talks to the operator's own Moxy directly, whatever HTTP_PROXY,
HTTPS_PROXY or ALL_PROXY a shell or container carries. Proved with a listener posing as that proxy, which records
whatever reaches it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from types import TracebackType

import httpx
import pytest

from tests.assets import KEY, PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = pytest.mark.integration

TOKEN = "purge-token-for-the-proxy-test-0123"
SECRET = "an-origin-secret-for-the-cdn-0123"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class CapturingProxy:
    """A listener on 127.0.0.1 that keeps the first bytes of every connection and answers 502: a proxy that would
    have received whatever a client sent it, secrets included."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> CapturingProxy:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        # shutdown wakes the accept() the thread is blocked in (close alone would not), which ends the thread.
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(2)
                try:
                    data = connection.recv(65536)
                    connection.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    data = b""
                with self._lock:
                    self.received.append(data)


@pytest.fixture
def proxy() -> Iterator[CapturingProxy]:
    with CapturingProxy() as running:
        yield running


def moxy_command(
    *args: str, proxy: CapturingProxy, stdin: str = "", **settings: str
) -> subprocess.CompletedProcess[str]:
    """The installed command with every proxy variable naming `proxy`, and no NO_PROXY to exempt loopback."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MOXY_") and name.upper() not in ("NO_PROXY", *PROXY_VARIABLES)
    }
    env |= {name: proxy.url for name in PROXY_VARIABLES}
    env |= {f"MOXY_{name.upper()}": value for name, value in settings.items()}
    command = [sys.executable, "-m", "moxy", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, input=stdin)


def test_purge_ignores_proxies_from_the_environment(
    origin: Origin, start_moxy: Callable[..., MoxyServer], proxy: CapturingProxy
) -> None:
    origin.route("/a.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=3600"}, body=PNG))
    moxy = start_moxy(purge_token=TOKEN)
    url = origin.url("/a.png")
    assert [plain_get(moxy.sign(url)) for _ in range(2)] == ["MISS", "HIT"]  # cached
    done = moxy_command("purge", url, proxy=proxy, key=KEY, purge_token=TOKEN, admin_url=moxy.base_url)
    assert (done.returncode, done.stdout) == (0, "purged 1 entry\n"), done.stderr
    assert proxy.received == []
    assert plain_get(moxy.sign(url)) == "MISS"  # the real Moxy purged it


def plain_get(url: str) -> str:
    """X-Moxy-Cache of a GET without Accept (httpx's default `*/*` would ask for another variant)."""
    with httpx.Client(timeout=30) as client:
        del client.headers["accept"]
        return client.get(url).headers["x-moxy-cache"]


def test_warm_ignores_proxies_from_the_environment(
    origin: Origin, start_moxy: Callable[..., MoxyServer], proxy: CapturingProxy
) -> None:
    origin.route("/a.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=3600"}, body=PNG))
    moxy = start_moxy(origin_secret=SECRET)
    listed = f"{origin.url('/a.png')}\n"
    settings = {"key": KEY, "base_url": moxy.base_url, "origin_secret": SECRET}
    # Straight to one Moxy, with the origin secret: the request that must reach nobody else.
    done = moxy_command("warm", "--endpoint", moxy.base_url, "-", proxy=proxy, stdin=listed, **settings)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split() == ["MISS", "1"]
    # By the public address (MOXY_BASE_URL, here that Moxy too), which is sent no secret: refused like any client
    # that goes around the CDN, and still not through the proxy.
    again = moxy_command("warm", "-", proxy=proxy, stdin=listed, **settings)
    assert again.returncode == 1
    assert again.stdout.splitlines()[0].split() == ["error", "403", "1"]
    assert proxy.received == []
    assert origin.hits("/a.png") == 1


def test_health_ignores_proxies_from_the_environment(
    start_moxy: Callable[..., MoxyServer], proxy: CapturingProxy
) -> None:
    moxy = start_moxy()
    done = moxy_command("health", "--port", str(moxy.port), proxy=proxy, key=KEY)
    assert (done.returncode, done.stdout) == (0, "healthy\n"), done.stderr
    assert proxy.received == []

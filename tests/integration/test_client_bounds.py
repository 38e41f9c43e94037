"""Hostile clients against a real Moxy (`moxy serve`) on loopback: oversized heads are refused with 431/414 and the
connection closed, without the worker buffering them; slow heads are cut (408); idle connections end; the event loop
keeps answering /healthz while all this goes on; legitimate long signed URLs still work.

One Moxy serves the module (short timeouts so the slow-client tests stay quick); every test opens its own sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.assets import PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = pytest.mark.integration

HEAD_TIMEOUT = 2.0
KEEPALIVE_TIMEOUT = 1
MAX_CONNECTIONS = 40


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    with Origin() as running:
        running.route("/pic.png", Reply(headers={"Content-Type": "image/png"}, body=PNG))
        yield running


@pytest.fixture(scope="module")
def moxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MoxyServer]:
    cache: Path = tmp_path_factory.mktemp("bounds") / "cache"
    server = MoxyServer(
        cache,
        head_timeout=HEAD_TIMEOUT,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        max_connections=MAX_CONNECTIONS,
        access_log="false",
    )
    with server:
        yield server


def connect(moxy: MoxyServer, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", moxy.port), timeout=timeout)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bool]:
    """Status, headers and whether the server then closed the connection (EOF within the socket's timeout)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise AssertionError(f"connection closed before an answer: {data!r}")
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        rest += piece
    try:
        closed = sock.recv(65536) == b""
    except (TimeoutError, ConnectionResetError):
        closed = False
    return status, headers, closed


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """Send what the server will take; False once it has stopped reading and closed."""
    try:
        sock.sendall(data)
    except OSError:
        return False
    return True


def worker_rss_kib(moxy: MoxyServer) -> int:
    # The worker, not the supervisor: the heads are read (and would pile up) where requests are served.
    for line in Path(f"/proc/{moxy.worker_pid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def assert_refused(answer: tuple[int, dict[str, str], bool], status: int) -> None:
    got, headers, closed = answer
    assert got == status
    assert headers["cache-control"] == "no-store"  # the client caused it: no CDN may keep it for everyone
    assert headers["connection"] == "close"
    assert headers["x-content-type-options"] == "nosniff"
    assert closed


def test_a_64_kib_header_gets_431_and_the_connection_closes(moxy: MoxyServer) -> None:
    with connect(moxy) as sock:
        send_quietly(sock, b"GET /healthz HTTP/1.1\r\nHost: moxy\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
        assert_refused(read_answer(sock), 431)


def test_200_header_fields_get_431(moxy: MoxyServer) -> None:
    fields = b"".join(b"X-F%d: v\r\n" % number for number in range(200))
    with connect(moxy) as sock:
        send_quietly(sock, b"GET /healthz HTTP/1.1\r\nHost: moxy\r\n" + fields + b"\r\n")
        assert_refused(read_answer(sock), 431)


def test_a_64_kib_url_gets_414(moxy: MoxyServer) -> None:
    with connect(moxy) as sock:
        send_quietly(sock, b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\nHost: moxy\r\n\r\n")
        assert_refused(read_answer(sock), 414)


def test_a_dribbled_1_mib_header_is_refused_without_the_worker_growing(moxy: MoxyServer) -> None:
    before = worker_rss_kib(moxy)
    with connect(moxy) as sock:
        send_quietly(sock, b"GET /healthz HTTP/1.1\r\nHost: moxy\r\nX-Big: ")
        for _ in range(64):  # 64 pieces of 16 KiB: 1 MiB in all, unless the server stops taking them
            if not send_quietly(sock, b"b" * 16384):
                break
            time.sleep(0.005)
        send_quietly(sock, b"\r\n\r\n")
        assert_refused(read_answer(sock), 431)
    assert worker_rss_kib(moxy) - before < 4 * 1024


def test_healthz_stays_fast_while_four_clients_push_256_mb_headers(moxy: MoxyServer) -> None:
    stop = threading.Event()
    pushed = [0, 0, 0, 0]
    block = b"c" * (1024 * 1024)

    def push(slot: int) -> None:
        with connect(moxy, timeout=5) as sock:
            send_quietly(sock, b"GET /healthz HTTP/1.1\r\nHost: moxy\r\nX-Big: ")
            for _ in range(256):  # 256 MiB at most; refused long before, the server drains for a moment, then closes
                if stop.is_set() or not send_quietly(sock, block):
                    return
                pushed[slot] += len(block)

    before = worker_rss_kib(moxy)
    attackers = [threading.Thread(target=push, args=(slot,), daemon=True) for slot in range(4)]
    for attacker in attackers:
        attacker.start()
    latencies = []
    peak = before
    try:
        time.sleep(0.2)
        for _ in range(10):
            started = time.monotonic()
            assert httpx.get(moxy.base_url + "/healthz", timeout=5).status_code == 200
            latencies.append(time.monotonic() - started)
            peak = max(peak, worker_rss_kib(moxy))
            time.sleep(0.1)
    finally:
        stop.set()
        for attacker in attackers:
            attacker.join(timeout=10)
    assert max(latencies) < 1.0, latencies
    assert peak - before < 16 * 1024, (before, peak)
    assert all(attacker.is_alive() is False for attacker in attackers)


def test_a_slowloris_head_is_cut_after_the_head_timeout(moxy: MoxyServer) -> None:
    with connect(moxy, timeout=1) as sock:
        started = time.monotonic()
        send_quietly(sock, b"GET /healthz HTTP/1.1\r\n")
        answer = None
        for byte in b"X-Slow: " + b"s" * 40:  # one byte every 0.25 s: 12 s at most, far past the 2 s bound
            if not send_quietly(sock, bytes([byte])):
                break
            try:
                answer = read_answer(sock)
                break
            except TimeoutError:
                continue  # nothing yet; the 1 s read timeout paces the dribble
        elapsed = time.monotonic() - started
    assert answer is not None, "the slow head was never cut"
    assert_refused(answer, 408)
    assert HEAD_TIMEOUT <= elapsed < HEAD_TIMEOUT + 2


def test_a_connection_that_never_speaks_is_closed(moxy: MoxyServer) -> None:
    with connect(moxy, timeout=HEAD_TIMEOUT + 3) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed without an answer: there was no request to answer
        assert time.monotonic() - started < HEAD_TIMEOUT + 1


def test_an_idle_keep_alive_connection_is_closed(moxy: MoxyServer) -> None:
    with connect(moxy, timeout=KEEPALIVE_TIMEOUT + 4) as sock:
        send_quietly(sock, b"GET /healthz HTTP/1.1\r\nHost: moxy\r\n\r\n")
        status, headers, _ = read_answer_keep_alive(sock)
        assert status == 200
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert time.monotonic() - started < KEEPALIVE_TIMEOUT + 1


def test_bare_line_breaks_do_not_keep_an_idle_connection_open(moxy: MoxyServer) -> None:
    # Every byte cancels uvicorn's keep-alive timer, and line breaks before a request start none of its callbacks.
    with connect(moxy, timeout=0.5) as sock:
        send_quietly(sock, b"GET /healthz HTTP/1.1\r\nHost: moxy\r\n\r\n")
        assert read_answer_keep_alive(sock)[0] == 200
        started = time.monotonic()
        while time.monotonic() - started < HEAD_TIMEOUT + KEEPALIVE_TIMEOUT + 4:
            if not send_quietly(sock, b"\r\n"):
                break
            try:
                if sock.recv(65536) == b"":
                    break
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
        assert time.monotonic() - started < HEAD_TIMEOUT + 2


def read_answer_keep_alive(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, "closed before an answer"
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(rest) < int(headers.get("content-length", "0")):
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), headers, rest


def test_connections_past_the_limit_get_503_no_store(moxy: MoxyServer) -> None:
    idle = [connect(moxy) for _ in range(MAX_CONNECTIONS + 5)]
    try:
        time.sleep(0.2)
        answer = httpx.get(moxy.base_url + "/healthz", timeout=5)
        assert answer.status_code == 503
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["retry-after"] == "1"
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while httpx.get(moxy.base_url + "/healthz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "still refusing after the idle connections closed"
        time.sleep(0.1)


@pytest.mark.parametrize("query_bytes", [2 * 1024, 10 * 1024])
def test_long_signed_urls_still_work(moxy: MoxyServer, origin: Origin, query_bytes: int) -> None:
    # A 10 KiB upstream URL signs to about 13.7 KiB, inside the 16 KiB request-target bound.
    upstream = origin.url("/pic.png?q=" + "x" * query_bytes)
    signed = moxy.sign(upstream)
    assert len(signed) > query_bytes * 4 // 3
    answer = httpx.get(signed, timeout=10)
    assert answer.status_code == 200
    assert answer.content == PNG


@pytest.mark.parametrize(
    "query",
    ["%", "%zz%00", "e=" + "9" * 5000, "url=" + "%" * 3000, "&" * 8000, "a=%ff%fe", "e=-1&e=2"],
    ids=["lone-percent", "bad-escapes", "huge-expiry", "percent-url", "empty-pairs", "not-utf8", "repeated-e"],
)
def test_junk_query_strings_get_an_answer_not_a_crash(moxy: MoxyServer, origin: Origin, query: str) -> None:
    signed = moxy.sign(origin.url("/pic.png"))
    for target in (f"{signed}?{query}", f"{moxy.base_url}/{'a' * 40}?{query}"):
        answer = httpx.get(target, timeout=10)
        assert answer.status_code < 500, (target[:100], answer.status_code, answer.text[:200])
        if answer.status_code >= 400:
            assert "no-store" in answer.headers["cache-control"]
    assert httpx.get(moxy.base_url + "/healthz", timeout=5).status_code == 200

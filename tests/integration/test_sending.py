"""The zero-copy file answer (moxy/sending.py) on a real uvicorn server with Moxy's protocol, on loopback: the
bytes and framing a client sees, keep-alive after it, files that end early, clients that stop reading or leave.
The full flow over it (a large cached body served from its file by `moxy serve`) is at the end."""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from moxy import server as moxy_server_module
from moxy.sending import ZERO_COPY, SendingCycle
from moxy.server import BoundedHttpToolsProtocol, ClientLimits
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply
from tests.net import free_port

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
LIMITS = ClientLimits(
    max_url_bytes=8192, max_header_bytes=16384, max_header_fields=50, head_timeout=5.0, max_connections=None
)


class FileApp:
    """Answers /file?offset=N&count=N&promise=N from one file with a zero-copy send (when offered)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offered: list[bool] = []
        self.finished = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        query = dict(part.split("=") for part in scope["query_string"].decode().split("&") if part)
        offset, count = int(query.get("offset", 0)), int(query["count"])
        promise = int(query.get("promise", count))
        self.offered.append(ZERO_COPY in scope.get("extensions", {}))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            headers = [(b"content-type", b"application/octet-stream"), (b"content-length", b"%d" % promise)]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": ZERO_COPY, "file": fd, "offset": offset, "count": count, "more_body": False})
        finally:
            os.close(fd)
            self.finished.set()


@pytest.fixture
def served_file(tmp_path: Path) -> Iterator[tuple[int, bytes, FileApp]]:
    data = os.urandom(3 * MiB + 12345)
    path = tmp_path / "body.bin"
    path.write_bytes(data)
    app = FileApp(path)
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=functools.partial(BoundedHttpToolsProtocol, limits=LIMITS),  # type: ignore[arg-type]
        lifespan="off",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port, data, app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def server_errors() -> Iterator[list[logging.LogRecord]]:
    """The error records of the in-process server (its logger does not propagate to the root logger)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, logger = Keep(level=logging.ERROR), logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _request(sock: socket.socket, target: str, method: str = "GET") -> None:
    sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode())


def _read_answer(sock: socket.socket, *, head: bool = False) -> tuple[dict[str, str], bytes]:
    """One answer: its header fields and a body of exactly Content-Length bytes (fewer if the connection ended)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the head ended: {buffer!r}"
        buffer += chunk
    raw_head, _, body = buffer.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), lines[0]
    fields = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    wanted = 0 if head else int(fields["content-length"])
    while len(body) < wanted:
        chunk = sock.recv(min(1 << 20, wanted - len(body)))
        if not chunk:
            break
        body += chunk
    return fields, body


def _connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def test_whole_and_partial_files_arrive_intact_on_one_keep_alive_connection(
    served_file: tuple[int, bytes, FileApp],
) -> None:
    port, data, app = served_file
    with _connect(port) as sock:
        _request(sock, f"/file?count={len(data)}")
        fields, body = _read_answer(sock)
        assert body == data and fields["content-length"] == str(len(data))
        _request(sock, "/file?offset=1000001&count=777777")  # the same connection, a slice from the middle
        _, body = _read_answer(sock)
        assert body == data[1000001 : 1000001 + 777777]
        _request(sock, f"/file?count={len(data)}", method="HEAD")
        fields, body = _read_answer(sock, head=True)
        assert body == b"" and fields["content-length"] == str(len(data))
        _request(sock, "/file?count=10")  # still in step after HEAD: no body bytes were written for it
        _, body = _read_answer(sock)
        assert body == data[:10]
    assert app.offered == [True] * 4


def test_a_slow_reader_gets_every_byte(served_file: tuple[int, bytes, FileApp]) -> None:
    port, data, _ = served_file
    with _connect(port, receive_buffer=8192) as sock:
        _request(sock, f"/file?count={len(data)}")
        time.sleep(0.5)  # the server meets a full socket many times over: it must wait, not spin or drop
        _, body = _read_answer(sock)
        assert body == data


def test_without_a_spare_descriptor_a_slow_reader_still_gets_every_byte(
    served_file: tuple[int, bytes, FileApp], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, data, _ = served_file

    def no_descriptors(fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    copied: list[int] = []
    copy = SendingCycle._copy

    async def counted_copy(self: SendingCycle, fd: int, offset: int, count: int) -> bool:
        copied.append(count)
        return await copy(self, fd, offset, count)

    monkeypatch.setattr(os, "dup", no_descriptors)  # waiting for the socket needs one; copying does not
    monkeypatch.setattr(SendingCycle, "_copy", counted_copy)
    with _connect(port, receive_buffer=4096) as sock:
        _request(sock, f"/file?count={len(data)}")
        time.sleep(0.5)  # the socket fills: the server must wait for it, and cannot watch it without a descriptor
        _, body = _read_answer(sock)
        assert body == data
    assert copied, "the rest of the body went the copying way"


def test_a_file_shorter_than_promised_cuts_the_answer_never_pads_it(served_file: tuple[int, bytes, FileApp]) -> None:
    port, data, _ = served_file
    with _connect(port) as sock:
        # The app promises (and asks for) 1 MiB past the end of the file.
        _request(sock, f"/file?offset={len(data) - 100}&count={MiB}&promise={MiB}")
        _, body = _read_answer(sock)
        assert body == data[-100:], "only the bytes the file has, then the connection ends"
        assert sock.recv(1) == b""


def test_a_client_that_stops_reading_is_dropped_after_the_stall_bound(
    served_file: tuple[int, bytes, FileApp], monkeypatch: pytest.MonkeyPatch, server_errors: list[logging.LogRecord]
) -> None:
    port, data, app = served_file
    monkeypatch.setattr(moxy_server_module, "WRITE_STALL_SECONDS", 0.5)
    with _connect(port, receive_buffer=4096) as sock:
        _request(sock, f"/file?count={len(data)}")
        assert app.finished.wait(10), "the answer to a client that reads nothing must end after the stall bound"
    with _connect(port) as other:  # and the server goes on serving
        _request(other, "/file?count=5")
        assert _read_answer(other)[1] == data[:5]
    assert not server_errors, "a client given up on is no error of the server's"


def test_a_client_that_leaves_mid_body_ends_the_answer(
    served_file: tuple[int, bytes, FileApp], server_errors: list[logging.LogRecord]
) -> None:
    port, data, app = served_file
    sock = _connect(port, receive_buffer=4096)
    _request(sock, f"/file?count={len(data)}")
    assert sock.recv(4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close with a reset
    sock.close()
    assert app.finished.wait(10)
    with _connect(port) as other:
        _request(other, "/file?count=5")
        assert _read_answer(other)[1] == data[:5]
    assert not server_errors, "a client that left is no error of the server's"


def _syscalls(pid: int) -> tuple[int, int]:
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(io["syscr"]), int(io["syscw"])


def test_moxy_serves_a_large_cached_body_from_its_file_without_copying_it(
    origin: Origin, start_moxy: Callable[..., MoxyServer]
) -> None:
    moxy = start_moxy(memory_max_entry_bytes=MiB)  # so the 4 MiB entry is served from the disk tier
    body = b"\x89PNG\r\n\x1a\n" + os.urandom(4 * MiB)
    origin.route("/large.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=body))
    assert moxy.get(origin.url("/large.png")).content == body  # stored on disk
    worker = moxy.worker_pid()  # the process that serves, under `moxy serve`'s supervisor
    with socket.create_connection(("127.0.0.1", moxy.port), timeout=10) as sock:
        path = moxy.sign(origin.url("/large.png")).removeprefix(moxy.base_url)
        _request(sock, path)
        assert _read_answer(sock)[1] == body  # a disk hit; the file's checksum is now known to this worker
        before = _syscalls(worker)
        _request(sock, path)
        assert _read_answer(sock)[1] == body
        reads, writes = (after - earlier for after, earlier in zip(_syscalls(worker), before, strict=True))
    # Copied through Python, a 4 MiB body takes 16 reads of the file and 64 socket writes: about 40 more writes
    # than reads, all told. The kernel counts each sendfile call as one read and one write, however many calls a slow
    # reader makes it take, so sent from its file the two counts stay within a few calls of each other (the head,
    # the log line, the entry's metadata).
    assert writes - reads < 16, f"{writes} write calls and {reads} read calls for one 4 MiB answer"

"""Clients that read a large cached body slowly, or stop reading, hold about one slice of it each, not the whole
body; and the files of answers they abandon are released when they go."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
CLIENTS = 40


def _rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _stalled_client(moxy: MoxyServer, url: str) -> socket.socket:
    client = socket.socket()
    # A tiny receive window: the body piles up on the server's side unless the server holds back.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", moxy.port))
    path = url.removeprefix(moxy.base_url)
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: moxy\r\n\r\n".encode())
    return client


@pytest.mark.parametrize("size_mib, tier", [(4, "disk"), (2, "memory")])
def test_stalled_readers_hold_a_slice_each(
    origin: Origin, start_moxy: Callable[..., MoxyServer], size_mib: int, tier: str
) -> None:
    # A memory tier that keeps 2 MiB entries; 4 MiB ones are served from their file on disk.
    moxy = start_moxy(memory_max_entry_bytes=2 * MiB)
    body = PNG_HEAD + bytes(range(256)) * (size_mib * MiB // 256 - 1)
    origin.route("/big.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=body))
    url = moxy.sign(origin.url("/big.png"))
    first = moxy.get(origin.url("/big.png"))
    assert first.status_code == 200 and first.content == body
    pid = moxy.worker_pid()  # the process that serves, under `moxy serve`'s supervisor
    before, fds_before = _rss(pid), _open_fds(pid)
    clients = [_stalled_client(moxy, url) for _ in range(CLIENTS)]
    try:
        time.sleep(2.0)  # every answer under way, each stuck on its client's full window
        grown = _rss(pid) - before
        # On a build that handed the whole body over at once this was about CLIENTS x the body (160 / 80 MiB);
        # now each holds one file read (256 KiB) and a slice or two in the server's buffer.
        assert grown < CLIENTS * MiB, f"{grown / MiB:.0f} MiB for {CLIENTS} stalled readers"
        assert _open_fds(pid) >= fds_before + CLIENTS // 2  # the clients are connected and waiting
    finally:
        for client in clients:
            client.close()
    deadline = time.monotonic() + 5
    while _open_fds(pid) > fds_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _open_fds(pid) <= fds_before, "connections and files of abandoned answers are released"
    assert moxy.get(origin.url("/big.png")).content == body

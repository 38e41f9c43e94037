"""A client that adds a fresh junk query to every hit cannot make the hit memo grow: verification ignores the
parameters it does not read, and so does the memo's key."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.assets import PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def _rss_of_tree(pid: int) -> int:
    """Resident bytes of `pid` and every process below it (the server may run its app in a child)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        status = Path(f"/proc/{current}/status").read_text()
        total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
        children = Path(f"/proc/{current}/task/{current}/children")
        if children.exists():
            pending += [int(child) for child in children.read_text().split()]
    return total


def test_junk_queries_on_hits_do_not_grow_the_worker(origin: Origin, start_moxy: Callable[..., MoxyServer]) -> None:
    moxy = start_moxy()
    origin.route("/pic.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=PNG))
    url = moxy.sign(origin.url("/pic.png"))
    assert moxy.process is not None
    with httpx.Client(timeout=30) as client:
        for _ in range(200):  # warm: allocator pools and the memo's one entry settle
            assert client.get(url).status_code == 200
        before = _rss_of_tree(moxy.process.pid)
        for number in range(4_000):
            # 12 KiB of distinct junk per request: about 48 MB of keys if each made its own memo entry.
            junk = f"{number:08d}" + "j" * (12 * 1024)
            response = client.get(f"{url}?junk={junk}")
            assert response.status_code == 200
            assert response.content == PNG
        after = _rss_of_tree(moxy.process.pid)
    assert origin.hits("/pic.png") == 1
    assert after - before < 16 * MiB, f"worker grew by {(after - before) / MiB:.1f} MiB"
    assert os.path.exists(f"/proc/{moxy.process.pid}")

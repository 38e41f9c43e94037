"""kill -9 of a whole Moxy process while it fetches or stores a 50 MB entry, then a restart on the same folder:
the entry is a clean miss, never a torn body, and what was stored before is still served."""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.assets import PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply, pattern_sha256

pytestmark = pytest.mark.integration
StartMoxy = Callable[..., MoxyServer]
SIZE = 50 * 1024 * 1024
MiB = 1024 * 1024


def files(folder: Path) -> Iterator[Path]:
    return (path for path in folder.rglob("*") if path.is_file()) if folder.exists() else iter(())


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def kill_hard(moxy: MoxyServer) -> None:
    moxy.stop(signal.SIGKILL)
    assert moxy.process is not None and moxy.process.returncode == -signal.SIGKILL


def request_in_background(url: str) -> None:
    import threading

    def run() -> None:
        try:
            httpx.get(url, timeout=120)
        except httpx.HTTPError:
            pass  # the server is killed under it: that is the point

    threading.Thread(target=run, daemon=True).start()


def assert_whole(answer: httpx.Response, cache: str) -> None:
    assert answer.status_code == 200, answer.text[:200]
    assert answer.headers["x-moxy-cache"] == cache
    assert len(answer.content) == SIZE
    assert hashlib.sha256(answer.content).hexdigest() == pattern_sha256(SIZE)


def test_killed_while_fetching(tmp_path: Path, origin: Origin, start_moxy: StartMoxy) -> None:
    cache = tmp_path / "cache"
    settings = {"max_body_bytes": 64 * MiB, "content_types": "application/octet-stream,image/*"}
    origin.route("/before.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=PNG))
    # A trickle: the body takes a few seconds, so the spool file can be seen growing.
    origin.route(
        "/movie.bin",
        Reply(
            headers={"Content-Type": "application/octet-stream", "Cache-Control": "max-age=600"},
            stream_size=SIZE,
            chunk_size=MiB,
            chunk_delay=0.05,
        ),
    )
    first = start_moxy(cache, **settings)
    assert first.get(origin.url("/before.png")).headers["x-moxy-cache"] == "MISS"
    request_in_background(first.sign(origin.url("/movie.bin")))
    wait_until(lambda: any(path.stat().st_size >= 10 * MiB for path in files(cache / "tmp")), 30, "a 10 MiB spool file")
    kill_hard(first)

    second = start_moxy(cache, **settings)
    assert second.get(origin.url("/before.png")).headers["x-moxy-cache"] == "HIT", "stored before: still served"
    assert_whole(second.get(origin.url("/movie.bin"), timeout=120), "MISS")
    assert_whole(second.get(origin.url("/movie.bin"), timeout=120), "HIT")


def test_killed_between_body_and_entry(tmp_path: Path, origin: Origin, start_moxy: StartMoxy) -> None:
    cache = tmp_path / "cache"
    settings = {"max_body_bytes": 64 * MiB, "content_types": "application/octet-stream"}
    origin.route(
        "/movie.bin",
        Reply(headers={"Content-Type": "application/octet-stream", "Cache-Control": "max-age=600"}, stream_size=SIZE),
    )
    first = start_moxy(cache, app="tests.integration.seams:slow_commit_app", **settings)
    request_in_background(first.sign(origin.url("/movie.bin")))
    # The body file is in place (renamed from its temp file); the metadata that would name it is not written yet.
    wait_until(lambda: any(path.stat().st_size == SIZE for path in files(cache / "body")), 60, "the body file")
    assert list(files(cache / "meta")) == []
    kill_hard(first)

    second = start_moxy(cache, **settings)
    assert_whole(second.get(origin.url("/movie.bin"), timeout=120), "MISS")
    assert_whole(second.get(origin.url("/movie.bin"), timeout=120), "HIT")
    assert origin.hits("/movie.bin") == 2, "fetched by the killed process and once after the restart"

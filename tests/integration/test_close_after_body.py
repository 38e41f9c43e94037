"""Bodies from servers that close the connection after a complete answer (HTTP/1.0 style, as Python's own
http.server does) arrive whole: the close is the end of the message, not a sign of a length lie."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from moxy.policy import DestinationPolicy
from moxy.upstream import Upstream
from tests.integration import engines

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.usefixtures("upstream_engine")]
upstream_engine = engines.upstream_engine  # once per engine: the module proves the wire

MiB = 1024 * 1024


@pytest.fixture(params=[pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"), "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    # Overrides the asyncio-only anyio_backend of tests/conftest.py: production runs on uvloop, where the close after
    # the body was misread, so this file runs on uvloop and on the plain loop.
    return request.param


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    folder = tmp_path / "www"
    folder.mkdir()
    digests: dict[str, str] = {}
    for name, size in (("video-5m.mp4", 5 * MiB), ("video-20m.mp4", 20 * MiB)):
        data = bytes(range(256)) * (size // 256)
        (folder / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    handler = partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", digests
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    # HTTP/1.0: Content-Length, then the server closes the connection after the body.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize("name", ["video-5m.mp4", "video-20m.mp4"])
async def test_large_body_from_a_server_that_closes_after_it(
    files: tuple[str, dict[str, str]], name: str, tmp_path: Path
) -> None:
    base, digests = files
    upstream = Upstream(
        policy=DestinationPolicy.from_settings_values(("127.0.0.0/8",), (), ()),
        connect_timeout=5.0,
        read_timeout=10.0,
        total_timeout=60.0,
        max_body_bytes=64 * MiB,
        max_redirects=0,
        user_agent="Moxy/test",
        spool_dir=tmp_path,
    )
    try:
        for _ in range(4):  # the misreading depended on timing: several rounds, each must be whole
            response = await upstream.fetch(f"{base}/{name}", {})
            assert response.status == 200
            assert response.body_path is not None
            digest = hashlib.sha256(Path(response.body_path).read_bytes()).hexdigest()
            Path(response.body_path).unlink()
            assert response.length == response.declared_length
            assert digest == digests[name]
    finally:
        await upstream.aclose()

"""A full or read-only cache folder under a real Moxy: misses are still served (with the security headers), the
failure is counted, reported by /readyz as degraded and logged once, and writes resume by themselves.

Root ignores file modes, so chmod cannot make a folder read-only here. Each test instead gives Moxy a small tmpfs
of its own in a user and mount namespace (`unshare --user --map-root-user --mount`, no privilege needed): a
helper process holds the namespace, Moxy runs inside it (`nsenter`), and the test fills, remounts read-only and
frees that tmpfs while Moxy runs, looking at its files through /proc/<helper>/root. Without user namespaces the
tests skip, except under CI=true, where they fail: a green CI run must have exercised them."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moxy.body import Spool as _BodySink
from moxy.errors import UpstreamError
from tests.assets import PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = pytest.mark.integration

# Over the 2 MiB that a fetch keeps in memory before spooling to the cache folder.
LARGE_PNG = PNG[:16] + os.urandom(3 * 1024 * 1024)
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "deny",
    "referrer-policy": "no-referrer",
}
TMPFS_BYTES = 32 * 1024 * 1024


class FaultFolder:
    """A tmpfs at `path`, visible only inside a user+mount namespace held by a helper process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.helper: subprocess.Popen[bytes] | None = None

    def start(self) -> FaultFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        script = f'mount -t tmpfs -o size={TMPFS_BYTES} tmpfs "$1" && echo ready && exec sleep 3600'
        self.helper = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(self.path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.helper.stdout is not None
        line = self.helper.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            assert self.helper.stderr is not None
            raise OSError(self.helper.stderr.read().decode(errors="replace").strip() or "the helper did not start")
        return self

    def stop(self) -> None:
        if self.helper is not None:
            if self.helper.poll() is None:
                self.helper.kill()
                self.helper.wait(timeout=5)
            for pipe in (self.helper.stdout, self.helper.stderr):
                if pipe is not None:
                    pipe.close()

    @property
    def enter(self) -> list[str]:
        assert self.helper is not None
        return ["nsenter", f"--target={self.helper.pid}", "--user", "--mount", "--"]

    def view(self, relative: str = "") -> Path:
        """The tmpfs as seen from outside the namespace."""
        assert self.helper is not None
        return Path(f"/proc/{self.helper.pid}/root") / str(self.path).lstrip("/") / relative

    def mount(self, options: str) -> None:
        # A remount to read-only fails (EBUSY) while a file is open for writing, such as a spool of a fetch
        # in flight; Moxy holds none between operations, so a retry soon gets through.
        deadline = time.monotonic() + 10
        while True:
            done = subprocess.run([*self.enter, "mount", "-o", options, str(self.path)], capture_output=True)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"remount {options}: {done.stderr.decode()}")
            time.sleep(0.1)

    def fill(self) -> None:
        """Fill the tmpfs to the last byte with a file outside Moxy's folders."""
        fd = os.open(self.view("filler"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            size = 1024 * 1024
            while size:
                try:
                    os.write(fd, bytes(size))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    size //= 2  # what is left is smaller than this: try half
        finally:
            os.close(fd)

    def free(self) -> None:
        os.unlink(self.view("filler"))

    def files(self, folder: str) -> list[str]:
        return sorted(
            str(path.relative_to(self.view(folder))) for path in self.view(folder).rglob("*") if path.is_file()
        )


@pytest.fixture
def fault_folder(tmp_path: Path) -> Iterator[FaultFolder]:
    missing = [tool for tool in ("unshare", "nsenter", "mount") if shutil.which(tool) is None]
    try:
        if missing:
            raise OSError(f"missing {', '.join(missing)}")
        folder = FaultFolder(tmp_path / "cache").start()
    except OSError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"a tmpfs in a user namespace is required in CI: {exc}")
        pytest.skip(f"no tmpfs in a user namespace here: {exc}")
    yield folder
    folder.stop()


@pytest.fixture
def start_inside(fault_folder: FaultFolder) -> Iterator[Callable[..., MoxyServer]]:
    """Start Moxy processes inside the fault folder's namespace, with that tmpfs as their cache folder."""
    started: list[MoxyServer] = []
    real_popen = subprocess.Popen

    def popen(command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return real_popen([*fault_folder.enter, *command], **kwargs)

    def start(**settings: Any) -> MoxyServer:
        server = MoxyServer(fault_folder.path, **settings)
        started.append(server)
        # nsenter execs the command (no fork for these namespaces): the pid and the passed socket stay Moxy's.
        with mock.patch.object(subprocess, "Popen", popen):
            return server.start()

    yield start
    for server in started:
        server.stop()


def metric(moxy: MoxyServer, name: str, **labels: str) -> float:
    text = httpx.get(moxy.base_url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                return float(sample.value)
    return 0.0


def events(moxy: MoxyServer, name: str) -> list[dict[str, Any]]:
    found = []
    for line in moxy.log().splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            record = orjson.loads(line)
            if record.get("event") == name:
                found.append(record)
    return found


def readyz(moxy: MoxyServer) -> httpx.Response:
    return httpx.get(moxy.base_url + "/readyz", timeout=10)


def assert_served(answer: httpx.Response, body: bytes) -> None:
    assert answer.status_code == 200, answer.text[:300]
    assert answer.content == body
    for name, value in SECURITY_HEADERS.items():
        assert answer.headers[name] == value
    assert "content-security-policy" in answer.headers


def routes(origin: Origin, *names: str) -> None:
    for name in names:
        body = LARGE_PNG if name.startswith("large") else PNG
        origin.route(
            f"/{name}", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=body)
        )


def assert_stored_for_the_next_process(
    start_inside: Callable[..., MoxyServer], origin: Origin, names: list[str]
) -> None:
    """A fresh process (an empty memory tier) answers from the disk, without asking the origin."""
    second = start_inside()
    for name in names:
        before = origin.hits(f"/{name}")
        answer = second.get(origin.url(f"/{name}"))
        assert_served(answer, LARGE_PNG if name.startswith("large") else PNG)
        assert answer.headers["x-moxy-cache"] == "HIT", name
        assert origin.hits(f"/{name}") == before


def test_full_cache_folder_serves_counts_reports_and_recovers(
    fault_folder: FaultFolder, start_inside: Callable[..., MoxyServer], origin: Origin
) -> None:
    routes(origin, "small-1.png", "large-1.png", "small-2.png", "large-2.png", "small-after.png", "large-after.png")
    origin.route("/huge.png", Reply(headers={"Content-Type": "image/png"}, stream_size=20 * 1024 * 1024))
    moxy = start_inside()
    assert readyz(moxy).status_code == 200

    fault_folder.fill()
    for name in ("small-1.png", "large-1.png", "small-2.png", "large-2.png"):
        answer = moxy.get(origin.url(f"/{name}"))
        assert_served(answer, LARGE_PNG if name.startswith("large") else PNG)
        assert answer.headers["x-moxy-cache"] == "MISS"
    # Past what may be held in memory instead of the spool: the upstream-error path (a 502), never a 500.
    huge = moxy.get(origin.url("/huge.png"))
    assert huge.status_code == 502
    assert huge.json()["reason"] == "spool-failed"
    assert huge.headers["x-content-type-options"] == "nosniff"

    ready = readyz(moxy)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "degraded": ["cache-dir"]}
    assert metric(moxy, "moxy_disk_failures_total", operation="put", error="full") >= 4
    # The two large bodies and the huge one could not be spooled: counted as the spool's own failures.
    assert metric(moxy, "moxy_disk_failures_total", operation="spool", error="full") >= 3
    assert metric(moxy, "moxy_requests_total", status="200", cache="MISS") == 4
    assert metric(moxy, "moxy_requests_total", status="500") == 0
    failed = events(moxy, "cache-dir-failed")
    assert len(failed) == 1, "logged once when the folder fails, not once per request"
    assert failed[0]["error"] == "full"
    # Nothing half-written: no entry, no body, no temp file, no spool left behind.
    assert fault_folder.files("meta") == []
    assert fault_folder.files("body") == []
    assert fault_folder.files("tmp") == []

    fault_folder.free()
    assert readyz(moxy).json() == {"status": "ready", "degraded": []}
    assert len(events(moxy, "cache-dir-recovered")) == 1
    for name in ("small-after.png", "large-after.png"):
        assert_served(moxy.get(origin.url(f"/{name}")), LARGE_PNG if name.startswith("large") else PNG)
    assert len(events(moxy, "cache-dir-failed")) == 1
    assert_stored_for_the_next_process(start_inside, origin, ["small-after.png", "large-after.png"])


def test_read_only_cache_folder_serves_counts_reports_and_recovers(
    fault_folder: FaultFolder, start_inside: Callable[..., MoxyServer], origin: Origin
) -> None:
    routes(origin, "kept.png", "small-1.png", "large-1.png", "small-2.png", "small-after.png", "large-after.png")
    moxy = start_inside()
    assert moxy.get(origin.url("/kept.png")).headers["x-moxy-cache"] == "MISS"

    fault_folder.mount("remount,ro")
    for name in ("small-1.png", "large-1.png", "small-2.png"):
        answer = moxy.get(origin.url(f"/{name}"))
        assert_served(answer, LARGE_PNG if name.startswith("large") else PNG)
        assert answer.headers["x-moxy-cache"] == "MISS"
    kept = moxy.get(origin.url("/kept.png"))
    assert_served(kept, PNG)
    assert kept.headers["x-moxy-cache"] == "HIT"

    ready = readyz(moxy)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "degraded": ["cache-dir"]}
    assert metric(moxy, "moxy_disk_failures_total", operation="put", error="read-only") >= 3
    assert metric(moxy, "moxy_requests_total", status="500") == 0
    failed = events(moxy, "cache-dir-failed")
    assert len(failed) == 1 and failed[0]["error"] == "read-only"
    assert fault_folder.files("tmp") == []

    fault_folder.mount("remount,rw")
    assert readyz(moxy).json() == {"status": "ready", "degraded": []}
    assert len(events(moxy, "cache-dir-recovered")) == 1
    for name in ("small-after.png", "large-after.png"):
        assert_served(moxy.get(origin.url(f"/{name}")), LARGE_PNG if name.startswith("large") else PNG)
    assert_stored_for_the_next_process(start_inside, origin, ["kept.png", "small-after.png", "large-after.png"])


# -- the spool of one fetch, without sockets ------------------------------------------------------------------


def spool_of(tmp_path: Path) -> Path:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    return spool


async def feed(sink: _BodySink, size: int) -> bytes:
    body = os.urandom(size)
    for start in range(0, size, 256 * 1024):
        await sink.add(body[start : start + 256 * 1024])
    return body


def test_spool_that_cannot_be_created_keeps_the_body_in_memory(tmp_path: Path) -> None:
    failures: list[OSError] = []

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system")

    async def run() -> None:
        sink = _BodySink(spool_of(tmp_path), 1024 * 1024, failures.append)
        with mock.patch("tempfile.NamedTemporaryFile", refused):
            body = await feed(sink, 3 * 1024 * 1024)
            assert await sink.finish() == (body, None)

    asyncio.run(run())
    assert [failure.errno for failure in failures] == [errno.EROFS]
    assert list(spool_of(tmp_path).iterdir()) == []


def test_spool_that_fills_up_midway_is_read_back(tmp_path: Path) -> None:
    real_write_all = _BodySink._write_all

    def fills_up(self: _BodySink, file: Any, data: bytes) -> None:
        if self._spooled >= 1024 * 1024:
            real_write_all(self, file, data[: len(data) // 3])  # part of it lands, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(self, file, data)

    async def run() -> None:
        sink = _BodySink(spool_of(tmp_path), 512 * 1024)
        with mock.patch.object(_BodySink, "_write_all", fills_up):
            body = await feed(sink, 5 * 1024 * 1024)
            assert await sink.finish() == (body, None)

    asyncio.run(run())
    assert list(spool_of(tmp_path).iterdir()) == []


def test_spool_failure_past_the_memory_bound_is_an_upstream_error(tmp_path: Path) -> None:
    def full(self: _BodySink, file: Any, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def run() -> None:
        sink = _BodySink(spool_of(tmp_path), 512 * 1024)
        with mock.patch.object(_BodySink, "_write_all", full), pytest.raises(UpstreamError) as refused:
            try:
                await feed(sink, _BodySink.FALLBACK_BYTES + 1024 * 1024)
            finally:
                await sink.discard()
        assert refused.value.reason == "spool-failed"

    asyncio.run(run())
    assert list(spool_of(tmp_path).iterdir()) == []

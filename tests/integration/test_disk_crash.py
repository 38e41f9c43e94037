"""kill -9 in the middle of writing a 50 MB entry: the entry never appears half-written, the folder stays usable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moxy.cache import DiskStorage, Entry, make_key
from tests.entries import make_entry

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

SIZE = 50 * 1024 * 1024

# The child writes through DiskStorage on a deliberately slow "disk" (1 MiB per write, 5 ms apart), so the parent
# can kill it while the temp file is growing. Everything else is the real code path.
CHILD = textwrap.dedent(
    """
    import os, sys, time
    import anyio
    from moxy.cache import DiskStorage
    from tests.entries import make_entry

    real_write = os.write
    def slow_write(fd, data):
        time.sleep(0.005)
        return real_write(fd, bytes(memoryview(data)[: 1024 * 1024]))
    os.write = slow_write

    body = bytes(range(256)) * ({size} // 256)
    entry = make_entry("https://img.example/huge.bin", body, headers=(("content-type", "video/mp4"),), stored_at=0.0)
    disk = DiskStorage(__import__("pathlib").Path(sys.argv[1]), 1 << 30)
    print("ready", flush=True)
    anyio.run(disk.put, entry)
    print("done", flush=True)
    """
).format(size=SIZE)


def small_entry(name: str, body: bytes) -> Entry:
    return make_entry(f"https://img.example/{name}", body, headers=(), stored_at=0.0)


async def test_sigkill_mid_write_leaves_no_entry(tmp_path: Path):
    root = tmp_path / "cache"
    before = small_entry("before.png", b"written before the crash")
    await DiskStorage(root, 1 << 30).put(before)

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        killed_at = 0
        while time.monotonic() < deadline and child.poll() is None:
            sizes = [path.stat().st_size for path in (root / "tmp").iterdir() if path.is_file()]
            if sizes and max(sizes) >= 10 * 1024 * 1024:
                os.kill(child.pid, signal.SIGKILL)
                killed_at = max(sizes)
                break
            time.sleep(0.002)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
    assert 0 < killed_at < SIZE

    disk = DiskStorage(root, 1 << 30)
    huge_key = make_key("https://img.example/huge.bin", {})
    assert await disk.get(huge_key) is None
    assert list((root / "meta").rglob("*.*")) == []  # no half-renamed files in the entry folders
    got = await disk.get(before.key)
    assert got is not None and got.body == before.body

    # The folder stays usable: same key written whole now, and the leftover temp file is swept once it is old.
    body = os.urandom(3 * 1024 * 1024)
    again = small_entry("huge.bin", body)
    await disk.put(again)
    got = await disk.get(huge_key)
    assert got is not None and got.digest == again.digest
    leftovers = list((root / "tmp").iterdir())
    assert leftovers, "the killed writer's temp file is still there"
    old = time.time() - 7200
    for path in leftovers:
        os.utime(path, (old, old))
    DiskStorage(root, 1 << 30)
    assert list((root / "tmp").iterdir()) == []

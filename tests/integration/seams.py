"""App factories for uvicorn that wrap the real `moxy.app:create_app` with one deliberate slowness, so a test can
kill Moxy inside a window that is otherwise a few milliseconds wide. Everything else is the real code path."""

from __future__ import annotations

import time
from pathlib import Path

from moxy.app import MoxyApp, create_app
from moxy.cache.disk import DiskStorage

# Long enough to notice the window from outside and send SIGKILL; the test kills long before it ends.
COMMIT_PAUSE_SECONDS = 30.0


def slow_commit_app() -> MoxyApp:
    """Moxy whose disk tier pauses after a body file is in place and before the entry's metadata is written:
    the moment a crash would leave a body that no entry names."""
    write_temp = DiskStorage._write_temp

    def paused(self: DiskStorage, data: bytes, written: list[Path], *, sync: bool | None = None) -> Path:
        time.sleep(COMMIT_PAUSE_SECONDS)  # in the storage thread, as the real write would be
        return write_temp(self, data, written, sync=sync)

    DiskStorage._write_temp = paused  # type: ignore[method-assign]
    return create_app()

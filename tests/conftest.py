from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import processes

# How long the end of the run waits for processes stopped by the last teardowns to finish exiting.
SURVIVOR_GRACE_SECONDS = 5.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No test sees the developer's MOXY_* settings, nor the key and cache an installed Moxy keeps in the user's
    folders (moxy.config: XDG_CONFIG_HOME, XDG_CACHE_HOME), which would turn "no key" into a key."""
    for name in list(os.environ):
        if name.startswith("MOXY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    yield


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fails the run if a process the tests started outlives them: a descendant of pytest, or one that carries this
    session's mark (a worker orphaned by its supervisor's death has parent 1, but still the mark). Survivors are
    killed after being named, so one run's leak does not pile onto the next."""
    os.environ[processes.SESSION_MARK] = str(os.getpid())
    yield
    deadline = time.monotonic() + SURVIVOR_GRACE_SECONDS
    while (survivors := _ours()) and time.monotonic() < deadline:
        time.sleep(0.05)  # a process stopped by the last teardown may still be on its way out
    for pid in survivors:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not survivors, "processes the tests started are still alive:\n" + "\n".join(
        processes.describe(pid) for pid in sorted(survivors)
    )


def _ours() -> set[int]:
    return processes.descendants(os.getpid()) | processes.marked(str(os.getpid()))

"""System servers the integration tests start (nginx, redis-server): found, or the test fails under CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest


def require_binary(name: str, *candidates: str) -> str:
    """The path of the server `name`. Missing, it fails the test under CI=true (a green CI run must have
    exercised it) and skips it elsewhere."""
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found is not None:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is not installed (required in CI)")
    pytest.skip(f"{name} is not installed")


def wait_until_healthy(process: subprocess.Popen[bytes], base_url: str, log_path: Path, seconds: float) -> None:
    """Wait for `base_url`/healthz to answer 200; fails with the end of the process's log if it exits first or
    does not answer within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, f"{process.args!r} exited {process.returncode}:\n{log_path.read_text()[-3000:]}"
        try:
            if httpx.get(base_url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{process.args!r} did not serve:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.1)

"""System servers the integration tests start (nginx, redis-server): found, or the test fails under CI."""

from __future__ import annotations

import os
import shutil

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

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees the developer's MOXY_* settings."""
    for name in list(os.environ):
        if name.startswith("MOXY_"):
            monkeypatch.delenv(name)
    yield

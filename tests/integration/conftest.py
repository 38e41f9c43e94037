from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin


@pytest.fixture
def origin() -> Iterator[Origin]:
    with Origin() as running:
        yield running


@pytest.fixture
def upstream_engine() -> str | None:
    """The MOXY_UPSTREAM_ENGINE of what start_moxy starts; None: the product's default. Modules that prove the wire
    override it to run once per engine (tests/integration/engines.py)."""
    return None


@pytest.fixture
def start_moxy(tmp_path: Path, upstream_engine: str | None) -> Iterator[Callable[..., MoxyServer]]:
    """Start Moxy processes (real uvicorn on an ephemeral port); all are stopped at teardown."""
    started: list[MoxyServer] = []

    def start(cache_dir: Path | None = None, **settings: Any) -> MoxyServer:
        if upstream_engine is not None:
            settings.setdefault("upstream_engine", upstream_engine)
        server = MoxyServer(cache_dir or tmp_path / "cache", **settings)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()

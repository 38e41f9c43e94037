"""Fixtures shared by the unit tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A private event loop for driving a server protocol by hand. At the end, the tasks it still holds (a pipelined
    request started as the previous answer completed, say) are cancelled and run out before it closes: a task
    destroyed unstarted leaves a coroutine never awaited, whose warning would surface in some later test."""
    running = asyncio.new_event_loop()
    yield running
    pending = asyncio.all_tasks(running)
    for task in pending:
        task.cancel()

    async def run_out() -> None:
        await asyncio.gather(*pending, return_exceptions=True)

    if pending:
        running.run_until_complete(run_out())
    running.close()


@pytest.fixture
def flushed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptors os.fsync is called with from now on (the calls still flush)."""
    calls: list[int] = []
    real_fsync = os.fsync

    def counted_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counted_fsync)
    return calls

"""A scripted upstream fetch: the `fetch` seam of `moxy.proxy.Proxy` (url, headers -> UpstreamResponse) without
sockets. It replies in script order, each reply optionally held until its gate is set, records every call and how
many ran at once::

    fetch = FakeFetch(clock)
    fetch.then(Answer(body=b"one")).then(UpstreamError("connect-failed"))
    fetch.then(Answer(), gate=gate)           # held until gate.set()
    fetch.otherwise = Answer()                # the reply to every call beyond the script

A call beyond the script with no `otherwise` fails the test, so `FakeFetch()` is also the fetch that must not be
called."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from moxy.errors import UpstreamError
from moxy.upstream import UpstreamResponse
from tests.assets import JSON_BODY

__all__ = ["Answer", "Call", "FakeFetch", "Scripted"]


@dataclass(frozen=True)
class Answer:
    """What the fake upstream replies; `spool` delivers the body through a file, as the fetcher does for big ones."""

    body: bytes = JSON_BODY
    status: int = 200
    headers: Mapping[str, str] = field(
        default_factory=lambda: {"content-type": "application/json", "cache-control": "max-age=60"}
    )
    spool: Path | None = None
    before: Callable[[], None] | None = None  # a side effect at answer time (after the gate opened)

    def response(self, url: str, now: float, number: int) -> UpstreamResponse:
        if self.before is not None:
            self.before()
        body: bytes | None = self.body
        body_path: str | None = None
        if self.spool is not None:
            path = self.spool / f"spooled-{number}"
            path.write_bytes(self.body)
            body, body_path = None, str(path)
        return UpstreamResponse(
            url=url,
            status=self.status,
            headers=dict(self.headers),
            body=body,
            body_path=body_path,
            length=len(self.body),
            declared_length=len(self.body) if self.body else None,
            request_time=now,
            response_time=now,
        )


Scripted = Answer | UpstreamError


@dataclass(frozen=True)
class Call:
    url: str
    headers: dict[str, str]


class FakeFetch:
    """The fetch seam: replies in script order, each optionally held until its gate is set."""

    def __init__(self, clock: Callable[[], float] = time.time, *, otherwise: Scripted | None = None) -> None:
        self.clock = clock
        self.calls: list[Call] = []
        self.active = 0
        self.peak = 0
        self.otherwise = otherwise  # reply to calls beyond the script; None fails them
        self._script: deque[tuple[Scripted, asyncio.Event | None]] = deque()

    def then(self, step: Scripted, *, gate: asyncio.Event | None = None) -> FakeFetch:
        self._script.append((step, gate))
        return self

    async def __call__(self, url: str, headers: Mapping[str, str]) -> UpstreamResponse:
        self.calls.append(Call(url, dict(headers)))
        if self._script:
            step, gate = self._script.popleft()
        elif self.otherwise is not None:
            step, gate = self.otherwise, None
        else:
            raise AssertionError(f"unexpected fetch #{len(self.calls)} of {url}")
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if gate is not None:
                # Bounded, so a test that forgets to open a gate fails instead of hanging.
                await asyncio.wait_for(gate.wait(), timeout=5)
        finally:
            self.active -= 1
        if isinstance(step, UpstreamError):
            # Without its last traceback: an error raised again and again (`otherwise`) keeps no frames alive.
            raise step.with_traceback(None)
        return step.response(url, self.clock(), len(self.calls))

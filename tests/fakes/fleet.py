"""In-memory stand-ins for what many hosts share through Redis: the lock port of moxy.cache.fleet and the purge
channel of moxy.cache.purges. `down = True` makes every call fail as a dead Redis does (None)."""

from __future__ import annotations

from moxy.cache.purges import PurgeRecord

__all__ = ["FakeChannel", "FakeLocks"]


class FakeLocks:
    def __init__(self) -> None:
        self.holders: dict[str, str] = {}
        self.down = False
        self.calls = 0

    async def acquire(self, name: str, token: str, ttl: float) -> bool | None:
        self.calls += 1
        if self.down:
            return None
        if name in self.holders:
            return False
        self.holders[name] = token
        return True

    async def held(self, name: str) -> bool | None:
        self.calls += 1
        return None if self.down else name in self.holders

    async def release(self, name: str, token: str) -> None:
        self.calls += 1
        if not self.down and self.holders.get(name) == token:
            del self.holders[name]


class FakeChannel:
    """A stream shared by the PurgeLogs given it: ids are "<n>-0", in order."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, PurgeRecord | None]] = []
        self.down = False
        self.reads = 0
        self.closed = False

    def _order(self, stream_id: str) -> int:
        return int(stream_id.partition("-")[0])

    async def publish(self, record: PurgeRecord) -> str | None:
        if self.down:
            return None
        stream_id = f"{len(self.entries) + 1}-0"
        self.entries.append((stream_id, record))
        return stream_id

    async def tip(self) -> str | None:
        if self.down:
            return None
        return self.entries[-1][0] if self.entries else "0-0"

    async def read(self, after: str, block: float) -> list[tuple[str, PurgeRecord | None]] | None:
        self.reads += 1
        if self.down:
            return None
        return [(i, r) for i, r in self.entries if self._order(i) > self._order(after)]

    async def aclose(self) -> None:
        self.closed = True

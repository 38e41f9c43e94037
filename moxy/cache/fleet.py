"""Cross-host coalescing: concurrent cold misses for one key on several hosts share one upstream fetch.

The first host to take a short lock in Redis (moxy.cache.redis.RedisFleet: SET NX PX with a random token) fetches;
the others wait, with a bound, until the lock is gone and then read the shared tier. Whatever goes wrong (Redis slow
or down, the lock outliving the wait, the fetch leaving no shared copy) ends the wait at once with `Alone`: the host
fetches for itself, as it would without Redis. Within a host the proxy's own coalescing already puts one request
per key in here, so a host polls for a key at most once at a time.

This module decides; it imports no Redis. The proxy asks `claim` before a cold fetch and calls `release` after it."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from moxy.cache.entry import storage_id

if TYPE_CHECKING:
    from moxy.cache.entry import Entry

__all__ = ["Alone", "Claim", "FleetLocks", "Filled", "Lead", "LockPort"]

# A waiter asks whether the lock is still held this often at first, then less often (x1.5) up to the cap: a fetch
# of a few milliseconds is picked up quickly, and a long one costs each waiting host a few calls a second.
POLL_FIRST, POLL_MAX = 0.01, 0.1


class LockPort(Protocol):
    """Short named locks shared by every host (moxy.cache.redis.RedisFleet). None means Redis is unusable."""

    async def acquire(self, name: str, token: str, ttl: float) -> bool | None: ...

    async def held(self, name: str) -> bool | None: ...

    async def release(self, name: str, token: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Lead:
    """This host fetches for the fleet, and releases the lock once the entry is stored (or the fetch failed)."""

    name: str
    token: str


@dataclass(frozen=True, slots=True)
class Filled:
    """Another host fetched and stored the entry: serve it."""

    entry: Entry
    waited: float  # seconds spent waiting for the other host


@dataclass(frozen=True, slots=True)
class Alone:
    """Fetch here, as without Redis: `reason` says why ("redis", "timeout", "no-shared-copy")."""

    reason: str


Claim = Lead | Filled | Alone


class FleetLocks:
    """`ttl`: how long a lock lives if its holder never releases it (a crashed host), and so the longest a host
    waits for another's fetch."""

    def __init__(
        self,
        port: LockPort,
        *,
        ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.port = port
        self.ttl = ttl
        self.clock = clock
        self.sleep = sleep

    async def claim(self, key: str, stored: Callable[[], Awaitable[Entry | None]], wait: float | None = None) -> Claim:
        """Take the lock for the storage key `key`, or wait (at most `wait` seconds, at most the lock's life) for the
        host that holds it and return what `stored` then reads (the tiers, Redis among them, where that host wrote)."""
        name, token = storage_id(key), secrets.token_hex(16)
        taken = await self.port.acquire(name, token, self.ttl)
        if taken is None:
            return Alone("redis")
        if taken:
            lead = Lead(name, token)
            # The host before us may have stored the entry and released the lock after this request looked it up:
            # one read now spares a second upstream fetch.
            entry = await stored()
            if entry is None:
                return lead
            await self.release(lead)
            return Filled(entry, 0.0)
        started = self.clock()
        deadline = started + min(self.ttl, wait if wait is not None else self.ttl)
        interval = POLL_FIRST
        while True:
            now = self.clock()
            if now >= deadline:
                return Alone("timeout")
            await self.sleep(min(interval, deadline - now))
            interval = min(interval * 1.5, POLL_MAX)
            held = await self.port.held(name)
            if held is None:
                return Alone("redis")
            if held:
                continue
            entry = await stored()
            if entry is None:
                # The holder's answer was not stored (failed, uncacheable, too big for Redis, or Redis lost it):
                # each host fetches for itself rather than queueing behind another round of waiting.
                return Alone("no-shared-copy")
            return Filled(entry, self.clock() - started)

    async def release(self, lead: Lead) -> None:
        await self.port.release(lead.name, lead.token)

"""The cache: entries and keys (entry), freshness arithmetic (freshness), and the storage tiers.

Storage backends deal in Entry and key only; HTTP semantics live in freshness and in the proxy.
RedisStorage is not re-exported: only moxy.cache.redis imports redis (an optional dependency)."""

from __future__ import annotations

from typing import Protocol

from moxy.cache.disk import DiskStorage as DiskStorage
from moxy.cache.entry import (
    BodyFile as BodyFile,
    CorruptEntry as CorruptEntry,
    Entry as Entry,
    make_key as make_key,
    storage_id as storage_id,
)
from moxy.cache.memory import MemoryStorage as MemoryStorage
from moxy.cache.tiered import TieredStorage as TieredStorage

__all__ = [
    "BodyFile",
    "CorruptEntry",
    "DiskStorage",
    "Entry",
    "MemoryStorage",
    "Storage",
    "TieredStorage",
    "make_key",
    "storage_id",
]


class Storage(Protocol):
    """The storage seam. Every method is a coroutine; blocking I/O runs off the event loop."""

    async def get(self, key: str) -> Entry | None:
        """The entry stored under the full `key`, or None (a miss, also for a corrupt or colliding entry)."""
        ...

    async def put(self, entry: Entry) -> None:
        """Store or replace the entry under entry.key. A tier may decline to keep it (too big, disk full)."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove the entry; True when there was one."""
        ...

    async def touch(self, entry: Entry) -> None:
        """Replace the metadata of a stored entry after a 304; the body (same digest) is not rewritten."""
        ...

    async def aclose(self) -> None: ...

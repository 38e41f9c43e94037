"""Read-through composition of storage tiers, fastest first (memory, disk, Redis).

Knows nothing of HTTP: it moves Entry values between tiers and lets each tier decide what it keeps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moxy.cache import Storage
    from moxy.cache.entry import Entry
    from moxy.cache.purges import PurgeLog

__all__ = ["TieredStorage"]


class TieredStorage:
    """get() tries the tiers top-down and fills the tiers above a hit.

    put() and touch() write top-down: if the process dies half-way, an upper tier holds the newer copy and a
    lower one the older, never the reverse (an older copy above would shadow the newer one below it).
    delete() goes bottom-up, so a concurrent read cannot refill an upper tier from a lower one not yet purged."""

    def __init__(self, tiers: Sequence[Storage], purges: PurgeLog | None = None) -> None:
        if not tiers:
            raise ValueError("TieredStorage needs at least one tier")
        self.tiers: tuple[Storage, ...] = tuple(tiers)
        self.purges = purges

    async def get(self, key: str) -> Entry | None:
        for depth, tier in enumerate(self.tiers):
            entry = await tier.get(key)
            if entry is not None and self.purges is not None and self.purges.covers(entry):
                # This tier's copy predates a purge (made by another worker, or of another variant). Only it goes:
                # a tier below may already hold the copy fetched since, which must not be thrown away too.
                await tier.delete(key)
                continue
            if entry is not None:
                for upper in self.tiers[:depth]:
                    await upper.put(entry)  # each tier keeps what suits it (memory: small bytes bodies only)
                return entry
        return None

    async def put(self, entry: Entry) -> None:
        for tier in self.tiers:
            await tier.put(entry)

    async def touch(self, entry: Entry) -> None:
        for tier in self.tiers:
            await tier.touch(entry)

    async def delete(self, key: str) -> bool:
        removed = False
        for tier in reversed(self.tiers):
            removed = await tier.delete(key) or removed
        return removed

    async def aclose(self) -> None:
        for tier in self.tiers:
            await tier.aclose()

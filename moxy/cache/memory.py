"""The per-process memory tier: a byte-bounded LRU of small entries whose bodies are bytes.

cachetools.LRUCache with getsizeof, not TTLCache: expiry would make stale copies unreachable, and a stale
copy is exactly what stale-while-revalidate and stale-if-error need (RFC 5861)."""

from __future__ import annotations

from cachetools import LRUCache

from moxy.cache.entry import Entry

__all__ = ["MemoryStorage"]

# Rough per-entry overhead (the Entry object, its header tuples, the dict slot) so that a cache of
# many tiny bodies is bounded too.
ENTRY_OVERHEAD = 512


def _size(entry: Entry) -> int:
    return entry.length + len(entry.key) + ENTRY_OVERHEAD


class MemoryStorage:
    """Byte-bounded LRU. Entries whose body is a file, or larger than `max_entry_bytes`, are not kept."""

    def __init__(self, max_bytes: int, max_entry_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._cache: LRUCache[str, Entry] = LRUCache(maxsize=max(1, max_bytes), getsizeof=_size)
        # The hot path: a bound method, one dict lookup and an LRU reorder, no copies.
        self._lookup = self._cache.get

    @property
    def currsize(self) -> int:
        """Bytes accounted to the entries held now."""
        return int(self._cache.currsize)

    def __len__(self) -> int:
        return len(self._cache)

    async def get(self, key: str) -> Entry | None:
        # Keyed by the full key, so the "full key compared on read" rule holds by construction.
        return self._lookup(key)

    def resident(self, key: str) -> Entry | None:
        """The entry held under `key`, without waiting (the hit memo's check of a variant's index)."""
        return self._lookup(key)

    def holds(self, entry: Entry) -> bool:
        """Whether this very entry (not an older or newer copy) is still resident; counts as a use for the LRU."""
        return self._lookup(entry.key) is entry

    async def put(self, entry: Entry) -> None:
        if (
            not isinstance(entry.body, bytes)
            or len(entry.body) != entry.length
            or entry.length > self.max_entry_bytes
            or _size(entry) > self.max_bytes
        ):
            # Not kept here; drop any older copy so this tier never shadows the newer one below it.
            self._cache.pop(entry.key, None)
            return
        self._cache[entry.key] = entry

    async def delete(self, key: str) -> bool:
        return self._cache.pop(key, None) is not None

    async def touch(self, entry: Entry) -> None:
        # Replacing the object is the cheap metadata update here: the body bytes are shared, not copied.
        await self.put(entry)

    async def aclose(self) -> None:
        self._cache.clear()

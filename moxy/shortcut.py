"""The repeat-hit shortcut: a fresh memory-tier entry answered again without redoing the work of the first answer.

A Moxy URL names its upstream URL immutably, so once one request for exact path + query + forwarded header
values was verified, checked against the destination policy and rendered, a repeat of those same bytes needs
none of it again while the entry stays fresh, resident and unpurged, and the URL unexpired. What is left per
request is a few dict lookups, the Age arithmetic and the ASGI messages. It is the hot path of a CDN origin, and
the full flow through the router costs several times as much.

Anything unusual (HEAD, Range, conditional requests, another method, a stale or evicted entry) goes the full way;
this only ever answers what the full flow would have answered with the same bytes and the same headers."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from cachetools import LRUCache

from moxy.cache.freshness import current_age

if TYPE_CHECKING:
    from moxy.cache.entry import Entry
    from moxy.cache.memory import MemoryStorage
    from moxy.cache.purges import PurgeLog

__all__ = ["HitShortcut", "PreparedHit"]

# Request headers that change what the answer is (304, 206, 416): their presence sends a request the full way.
_DIVERTING = frozenset(
    {b"range", b"if-none-match", b"if-modified-since", b"if-range", b"if-match", b"if-unmodified-since"}
)

# The query parameters verification reads (the native expiry, the camo query form's URL); every other parameter is
# ignored by the full flow, so it must not make a new shortcut key either (a junk query per request would fill it).
_SIGNED_PARAMETERS = frozenset({"e", "url"})
# A request whose identity is longer than this is answered the full way: the memo is for ordinary repeat hits.
MAX_KEY_BYTES = 16 * 1024
# Bookkeeping of one prepared answer besides its key and header bytes (objects, list and dict slots), roughly.
_ENTRY_OVERHEAD = 512

ShortcutKey = tuple[str, tuple[tuple[str, str], ...], tuple[bytes, ...]]


@dataclass(frozen=True, slots=True)
class PreparedHit:
    """One rendered answer minus the parts that change with time (Age and the ttl in Cache-Status).

    The entry is held weakly: once the memory tier lets go of it (eviction, purge, replacement) nothing here
    keeps its body alive, so the shortcut never holds more body bytes than MOXY_MEMORY_CACHE_BYTES allows."""

    entry: weakref.ReferenceType[Entry]
    headers: list[tuple[bytes, bytes]]
    cache_status_prefix: bytes
    fresh_until: float
    url_expires_at: float | None
    size: int  # bytes it holds (key and headers), which the memo's byte bound counts

    def headers_at(self, entry: Entry, now: float) -> list[tuple[bytes, bytes]]:
        age = current_age(entry, now)
        return [
            *self.headers,
            (b"age", b"%d" % max(0, int(age))),
            (b"cache-status", self.cache_status_prefix + b"%d" % int(entry.lifetime - age)),
        ]


class HitShortcut:
    """Bounded map from a request's exact identity to its prepared answer, checked against the memory tier."""

    def __init__(
        self,
        memory: MemoryStorage,
        purges: PurgeLog | None,
        forward_headers: Sequence[str],
        clock: Callable[[], float],
        max_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.memory = memory
        self.purges = purges
        self.forwarded = tuple(name.lower().encode("latin-1") for name in forward_headers)
        self.clock = clock
        # Bodies stay with the memory tier (held weakly here): what is bounded here is the keys and header lists,
        # counted in bytes, since a client chooses their length (forwarded header values, the URL).
        self._prepared: LRUCache[ShortcutKey, PreparedHit] = LRUCache(
            maxsize=max_bytes, getsizeof=lambda prepared: prepared.size
        )

    def key_of(self, path: str, query: bytes, headers: Sequence[tuple[bytes, bytes]]) -> ShortcutKey | None:
        """The identity of a request, or None when one of its headers asks for more than a plain 200 (or it is
        too long to be worth keeping). Only what the full flow reads is part of it."""
        size = len(path) + len(query)
        values: list[bytes | None] = [None] * len(self.forwarded)
        for name, value in headers:
            if name in _DIVERTING:
                return None
            for position, wanted in enumerate(self.forwarded):
                if name == wanted:
                    # A repeated line (even after an empty one) is left to the full flow, whose reading of it
                    # decides the variant; guessing here could hand one variant's answer to another.
                    if values[position] is not None:
                        return None
                    values[position] = value
                    size += len(value)
        if size > MAX_KEY_BYTES:
            return None
        signed: tuple[tuple[str, str], ...] = ()
        if query:
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
            signed = tuple(pair for pair in pairs if pair[0] in _SIGNED_PARAMETERS)
        return path, signed, tuple(value or b"" for value in values)

    def find(self, key: ShortcutKey) -> tuple[PreparedHit, Entry, float] | None:
        """The prepared answer, its entry and the current time, when it may still be sent exactly as prepared."""
        prepared = self._prepared.get(key)
        if prepared is None:
            return None
        now = self.clock()
        entry = prepared.entry()
        if (
            entry is None
            or now >= prepared.fresh_until
            or (prepared.url_expires_at is not None and now >= prepared.url_expires_at)
            or not self.memory.holds(entry)
            or (self.purges is not None and self.purges.covers(entry))
        ):
            # Dropped rather than refreshed: the full flow decides what happens next and prepares anew.
            self._prepared.pop(key, None)
            return None
        return prepared, entry, now

    def remember(
        self, key: ShortcutKey, entry: Entry, raw_headers: Sequence[tuple[bytes, bytes]], url_expires_at: float | None
    ) -> None:
        """Keep a fresh answer the memory tier holds, as the full flow sent it for a plain HIT (`raw_headers`)."""
        if not self.eligible(entry):
            return
        static: list[tuple[bytes, bytes]] = []
        cache_status = b""
        for name, value in raw_headers:
            if name == b"cache-status":
                cache_status = value
            elif name != b"age":
                static.append((name, value))
        prefix, marker, _ = cache_status.partition(b"ttl=")
        if not marker or b"detail=" in cache_status:
            return  # only a plain hit is prepared
        path, signed, values = key
        size = _ENTRY_OVERHEAD + len(path) + sum(len(name) + len(value) for name, value in signed)
        size += sum(len(value) for value in values) + sum(len(name) + len(value) for name, value in static)
        self._prepared[key] = PreparedHit(
            entry=weakref.ref(entry),
            headers=static,
            cache_status_prefix=prefix + marker,
            fresh_until=entry.stored_at + entry.lifetime - entry.age,
            url_expires_at=url_expires_at,
            size=size,
        )

    def eligible(self, entry: Entry) -> bool:
        """Whether an answer with this entry could be prepared at all (checked before any work is spent on it)."""
        return not entry.no_cache and isinstance(entry.body, bytes) and self.memory.holds(entry)

    def forget_all(self) -> None:
        self._prepared.clear()

    @property
    def held_bytes(self) -> int:
        return int(self._prepared.currsize)

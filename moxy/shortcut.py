"""The repeat-hit shortcut: a fresh memory-tier entry answered again without redoing the work of the first answer.

A Moxy URL names its upstream URL immutably, so once one request for exact path + query + forwarded header
values was verified, checked against the destination policy and rendered, a repeat of those same bytes needs
none of it again while the entry stays fresh, resident and unpurged, and the URL unexpired. What is left per
request is a few dict lookups, the Age arithmetic and the ASGI messages. It is the hot path of a CDN origin, and
the full flow through the router costs several times as much.

Anything unusual (HEAD, Range, conditional requests, another method, a stale or evicted entry) goes the full way;
this only ever answers what the full flow would have answered with the same bytes and the same headers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

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

ShortcutKey = tuple[str, bytes, tuple[bytes, ...]]


@dataclass(frozen=True, slots=True)
class PreparedHit:
    """One rendered answer minus the parts that change with time (Age and the ttl in Cache-Status)."""

    entry: Entry
    body: bytes
    headers: list[tuple[bytes, bytes]]
    cache_status_prefix: bytes
    fresh_until: float
    url_expires_at: float | None

    def headers_at(self, now: float) -> list[tuple[bytes, bytes]]:
        age = current_age(self.entry, now)
        return [
            *self.headers,
            (b"age", b"%d" % max(0, int(age))),
            (b"cache-status", self.cache_status_prefix + b"%d" % int(self.entry.lifetime - age)),
        ]


class HitShortcut:
    """Bounded map from a request's exact identity to its prepared answer, checked against the memory tier."""

    def __init__(
        self,
        memory: MemoryStorage,
        purges: PurgeLog | None,
        forward_headers: Sequence[str],
        clock: Callable[[], float],
        max_items: int = 50_000,
    ) -> None:
        self.memory = memory
        self.purges = purges
        self.forwarded = tuple(name.lower().encode("latin-1") for name in forward_headers)
        self.clock = clock
        # Bodies are shared with the memory tier, so this costs only the keys and header lists.
        self._prepared: LRUCache[ShortcutKey, PreparedHit] = LRUCache(maxsize=max_items)

    def key_of(self, path: str, query: bytes, headers: Sequence[tuple[bytes, bytes]]) -> ShortcutKey | None:
        """The identity of a request, or None when one of its headers asks for more than a plain 200."""
        values: list[bytes] = [b""] * len(self.forwarded)
        for name, value in headers:
            if name in _DIVERTING:
                return None
            for position, wanted in enumerate(self.forwarded):
                if name == wanted:
                    # Several lines of one header: the full flow joins them, so leave that case to it.
                    if values[position]:
                        return None
                    values[position] = value
        return path, query, tuple(values)

    def find(self, key: ShortcutKey) -> tuple[PreparedHit, float] | None:
        """The prepared answer and the current time, when it may still be sent exactly as prepared."""
        prepared = self._prepared.get(key)
        if prepared is None:
            return None
        now = self.clock()
        entry = prepared.entry
        if (
            now >= prepared.fresh_until
            or (prepared.url_expires_at is not None and now >= prepared.url_expires_at)
            or not self.memory.holds(entry)
            or (self.purges is not None and self.purges.covers(entry))
        ):
            # Dropped rather than refreshed: the full flow decides what happens next and prepares anew.
            self._prepared.pop(key, None)
            return None
        return prepared, now

    def remember(
        self, key: ShortcutKey, entry: Entry, raw_headers: Sequence[tuple[bytes, bytes]], url_expires_at: float | None
    ) -> None:
        """Keep a fresh answer the memory tier holds, as the full flow sent it for a plain HIT (`raw_headers`)."""
        if entry.no_cache or not isinstance(entry.body, bytes) or not self.memory.holds(entry):
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
        self._prepared[key] = PreparedHit(
            entry=entry,
            body=entry.body,
            headers=static,
            cache_status_prefix=prefix + marker,
            fresh_until=entry.stored_at + entry.lifetime - entry.age,
            url_expires_at=url_expires_at,
        )

    def forget_all(self) -> None:
        self._prepared.clear()

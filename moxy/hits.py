"""The hit memo: a plain ASGI layer in front of the routes that answers a repeat hit of a fresh memory-tier entry
without redoing the work of the first answer.

A Moxy URL names its upstream URL immutably, so once one request for exact path + signed query + forwarded header
values was verified, checked against the destination policy and answered with a plain HIT, a repeat of those same
bytes needs none of it again while the entry stays fresh (cache.freshness.decide, as in the full flow), resident
and unpurged, and the URL unexpired. What is left per request is a few dict lookups, hit_headers() from
moxy.responses (the one rendering of an entry's headers, given the fields prepared for the first answer) and the
ASGI messages: the hot path of a CDN origin.

Anything unusual (HEAD, Range, conditional requests, another method, a repeated forwarded header, a stale or
evicted entry) goes the full way; this only ever answers what the full flow would have answered, byte for byte."""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from cachetools import LRUCache

from moxy.cache.entry import make_key
from moxy.cache.freshness import Decision, current_age, decide
from moxy.proxy import CacheResult, Served
from moxy.responses import EntryFields, content_length, entry_fields, hit_headers, send_body
from moxy.telemetry import Metrics, log_access

if TYPE_CHECKING:
    from moxy.cache.entry import Entry
    from moxy.cache.memory import MemoryStorage
    from moxy.cache.purges import PurgeLog

__all__ = ["MAX_KEY_BYTES", "MEMO_BYTES", "HitMemo", "Hits", "MemoKey", "PreparedHit"]

# ASGI, spelled out here so the memo needs no web framework.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Request headers that change what the answer is (304, 206, 416): their presence sends a request the full way.
_DIVERTING = frozenset(
    {b"range", b"if-none-match", b"if-modified-since", b"if-range", b"if-match", b"if-unmodified-since"}
)
# The query parameters verification reads (the native expiry, the camo query form's URL); every other parameter is
# ignored by the full flow, so it must not make a new memo key either (a junk query per request would fill it).
_SIGNED_PARAMETERS = frozenset({"e", "url"})
# A request whose identity is longer than this is answered the full way: the memo is for ordinary repeat hits.
MAX_KEY_BYTES = 16 * 1024
# What the prepared answers may hold in all (keys and header fields; bodies stay with the memory tier).
MEMO_BYTES = 16 * 1024 * 1024
# Bookkeeping of one prepared answer besides its key and header bytes (objects, list and dict slots), roughly.
_ENTRY_OVERHEAD = 512

MemoKey = tuple[str, tuple[tuple[str, str], ...], tuple[bytes, ...]]


@dataclass(frozen=True, slots=True)
class PreparedHit:
    """One plain HIT answer, prepared: the entry's fixed header fields (responses.entry_fields) and its length.

    The entry is held weakly: once the memory tier lets go of it (eviction, purge, replacement) nothing here
    keeps its body alive, so the memo never holds more body bytes than MOXY_MEMORY_CACHE_BYTES allows."""

    entry: weakref.ReferenceType[Entry]
    fields: EntryFields
    length: tuple[bytes, bytes]
    url_expires_at: float | None
    size: int  # bytes it holds (key and header fields), which the memo's byte bound counts
    # For a variant (its upstream answered with Vary), the URL's own key, where the index that leads to it must
    # still be: once the upstream stops varying, the full flow reads the URL's new entry, and so must the memo.
    index_key: str | None = None

    def headers_at(self, age: float) -> list[tuple[bytes, bytes]]:
        headers = hit_headers(self.fields, age)
        headers.append(self.length)
        return headers


class HitMemo:
    """Bounded map from a request's exact identity to its prepared answer, checked against the memory tier."""

    def __init__(
        self,
        memory: MemoryStorage,
        purges: PurgeLog | None,
        forward_headers: Sequence[str],
        clock: Callable[[], float] = time.time,
        max_bytes: int = MEMO_BYTES,
    ) -> None:
        self.memory = memory
        self.purges = purges
        self.forwarded = tuple(name.lower().encode("latin-1") for name in forward_headers)
        self.clock = clock
        # Bodies stay with the memory tier (held weakly here): what is bounded here is the keys and header fields,
        # counted in bytes, since a client chooses their length (forwarded header values, the URL).
        self._prepared: LRUCache[MemoKey, PreparedHit] = LRUCache(
            maxsize=max_bytes, getsizeof=lambda prepared: prepared.size
        )

    def key_of(self, path: str, query: bytes, headers: Sequence[tuple[bytes, bytes]]) -> MemoKey | None:
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

    def find(self, key: MemoKey) -> tuple[PreparedHit, Entry, float] | None:
        """The prepared answer, its entry and the current time, when the full flow would answer exactly so."""
        prepared = self._prepared.get(key)
        if prepared is None:
            return None
        now = self.clock()
        entry = prepared.entry()
        if (
            entry is None
            or decide(entry, now) is not Decision.FRESH
            or (prepared.url_expires_at is not None and now >= prepared.url_expires_at)
            or not self.memory.holds(entry)
            or (self.purges is not None and self.purges.covers(entry))
            or (prepared.index_key is not None and not self._leads_to(prepared.index_key, entry))
        ):
            # Dropped rather than refreshed: the full flow decides what happens next and prepares anew.
            self._prepared.pop(key, None)
            return None
        return prepared, entry, now

    def _leads_to(self, index_key: str, entry: Entry) -> bool:
        index = self.memory.resident(index_key)
        return index is not None and index.is_index and index.vary == entry.vary

    def learn(self, scope: Scope, served: Served) -> None:
        """Prepare the answer the full flow just gave `scope`, when it was a plain 200 HIT from the memory tier
        (the routes call this; anything else is ignored)."""
        if served.cache is not CacheResult.HIT or served.reason is not None or not served.stored:
            return
        if scope["method"] != "GET" or not self.eligible(served.entry):
            return
        key = self.key_of(scope["path"], scope["query_string"], scope["headers"])
        if key is not None:
            self.remember(key, served.entry, served.url_expires_at)

    def remember(self, key: MemoKey, entry: Entry, url_expires_at: float | None) -> None:
        """Keep the plain HIT answer of a fresh entry the memory tier holds, prepared."""
        if not self.eligible(entry):
            return
        fields = entry_fields(entry, CacheResult.HIT)
        path, signed, values = key
        size = _ENTRY_OVERHEAD + len(path) + sum(len(name) + len(value) for name, value in signed)
        size += sum(len(value) for value in values) + sum(len(name) + len(value) for name, value in fields.fields)
        index_key = make_key(entry.url, ()) if entry.vary else None
        size += len(index_key or "")
        self._prepared[key] = PreparedHit(
            entry=weakref.ref(entry),
            fields=fields,
            length=content_length(entry.length),
            url_expires_at=url_expires_at,
            size=size,
            index_key=index_key,
        )

    def eligible(self, entry: Entry) -> bool:
        """Whether an answer with this entry could be prepared at all (checked before any work is spent on it)."""
        return not entry.no_cache and isinstance(entry.body, bytes) and self.memory.holds(entry)

    @property
    def held_bytes(self) -> int:
        return int(self._prepared.currsize)


class Hits:
    """The ASGI layer: a GET the memo holds is answered here, counted and logged like any hit; all else goes on."""

    def __init__(self, app: ASGIApp, memo: HitMemo, metrics: Metrics, access_log: bool) -> None:
        self.app = app
        self.memo = memo
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            started = time.perf_counter()
            key = self.memo.key_of(scope["path"], scope["query_string"], scope["headers"])
            found = self.memo.find(key) if key is not None else None
            # Only entries whose body is in memory are ever prepared; the check narrows the type for the send.
            if found is not None and isinstance(found[1].body, bytes):
                prepared, entry, now = found
                headers = prepared.headers_at(current_age(entry, now))
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send_body(send, found[1].body)
                self.metrics.count_hit(time.perf_counter() - started)
                if self.access_log:
                    log_access(
                        "GET",
                        scope["path"],
                        200,
                        "HIT",
                        None,
                        None,
                        None,
                        entry.length,
                        started,
                        client=scope.get("client"),
                    )
                return
        await self.app(scope, receive, send)

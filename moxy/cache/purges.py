"""Purges shared by every worker process that uses one cache folder.

Each worker has a private memory tier, so deleting an entry in the worker that took the purge request is not
enough: the others would go on serving their copies. A purge is therefore also written to an append-only log
in the cache folder, one JSON line `{"t": <epoch seconds>, "url": "<upstream url>"}`, which every worker reads
back (at start-up and then by polling its size). An entry of a purged URL stored at or before the purge time is
gone, whatever its variant (forwarded headers) and whichever tier holds it.

Appends are single write() calls of one short line on a file opened with O_APPEND, so lines from several
processes never interleave; a reader only consumes whole lines, so a write still in progress is read next time."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from moxy.cache.entry import Entry

__all__ = ["PurgeLog"]

# How often other workers look for purges: the bound on how long one of them may still serve a purged copy.
POLL_SECONDS = 0.25


class PurgeLog:
    """The purge times per upstream URL, as this process last read them from `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._purged: dict[str, float] = {}
        self._offset = 0
        self._size_seen = -1

    def covers(self, entry: Entry) -> bool:
        """True when `entry` was stored before a later purge of its URL (so it must not be served).

        The hot path of every hit: one dict lookup, and none at all while nothing was ever purged."""
        if not self._purged:
            return False
        when = self._purged.get(entry.url)
        return when is not None and entry.stored_at <= when

    async def record(self, url: str, when: float) -> bool:
        """Apply the purge here at once, and write it for every other worker; False when the log took no write
        (a full or read-only cache folder): the purge then holds in this worker and in the shared tiers only,
        and the other workers' memory copies live out their freshness. Never an error for the caller."""
        self._note(url, when)
        line = orjson.dumps({"t": when, "url": url}) + b"\n"
        try:
            await asyncio.to_thread(self._append, line)
        except OSError:
            return False
        return True

    async def refresh(self) -> None:
        """Read the purges other processes wrote since the last call (cheap when there are none: one stat)."""
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return
        if size == self._size_seen:
            return
        if size < self._offset:
            self._offset = 0  # replaced or truncated by hand: read it again from the start (purges only add up)
        await asyncio.to_thread(self._read_new)
        self._size_seen = size  # only once read: a failed read is retried at the next poll

    async def watch(self, interval: float = POLL_SECONDS) -> None:
        """Poll for other workers' purges until cancelled."""
        while True:
            try:
                await self.refresh()
            except OSError:
                pass  # an unreadable log must not stop serving; the next poll tries again
            await asyncio.sleep(interval)

    def _note(self, url: str, when: float) -> None:
        if when > self._purged.get(url, float("-inf")):
            self._purged[url] = when

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0600 like the entries: upstream URLs can carry credentials (presigned query strings).
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            # Flushed even when the cache's entries are not: a purge lost to a power cut would bring the purged
            # copies back, while a lost entry is only a miss. Purges are rare; the flush costs nothing that counts.
            os.fsync(fd)
        finally:
            os.close(fd)

    def _read_new(self) -> None:
        with open(self.path, "rb") as log:
            log.seek(self._offset)
            data = log.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for raw in data[:end].splitlines():
            try:
                record = orjson.loads(raw)
                url, when = record["url"], float(record["t"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a damaged line loses one purge, never the log
            if isinstance(url, str):
                self._note(url, when)

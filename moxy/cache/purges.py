"""Purges: shared by every worker process that uses one cache folder, and through Redis by every host.

Each worker has a private memory tier, so deleting an entry in the worker that took the purge request is not
enough: the others would go on serving their copies. A purge is therefore also written to an append-only log
in the cache folder, one JSON line `{"t": <epoch seconds>, "url": "<upstream url>", "p": "<purge id>"}`, which
every worker reads back (at start-up and then by polling its size). An entry of a purged URL stored at or before
the purge time is gone, whatever its variant (forwarded headers) and whichever tier holds it. `covers` is the one
place that decides this, for purges taken here and for those of other hosts alike.

Many hosts (a PurgeChannel, moxy.cache.redis.RedisFleet): the worker that takes a purge also appends it to a Redis
stream, and one worker per host (the holder of a lock on `purges.log.leader`) follows that stream and writes every
other host's purge into this host's log, with its stream id. A stream, not pub/sub: pub/sub forgets what it sent
while a host was disconnected, so that host would go on serving purged copies once back. The stream keeps the
latest purges (moxy.cache.redis.PURGE_BACKLOG), and the newest id in the log is where this host resumes reading
after a disconnection or a restart, so it replays exactly what it missed. Purge ids keep a purge from being
written twice: the follower skips the ones a worker of this host already logged. The purge time is the taking
host's clock, compared with the storing host's: hosts keep their clocks in step (NTP), as any shared cache needs.

Appends are single write() calls of short lines on a file opened with O_APPEND, so lines from several
processes never interleave; a reader only consumes whole lines, so a write still in progress is read next time."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

if TYPE_CHECKING:
    from moxy.cache.entry import Entry

__all__ = ["PurgeChannel", "PurgeLog", "PurgeRecord"]

# How often other workers look for purges: the bound on how long one of them may still serve a purged copy.
POLL_SECONDS = 0.25
# How long one read of the stream waits for a purge before it asks again (a bound on noticing a dead Redis too).
BLOCK_SECONDS = 1.0
# A follower that lost Redis tries again after this, doubling up to the cap: a dead Redis costs one attempt a
# second per host, and a Redis that is back is found within a second.
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0
# How often a worker that is not the follower checks whether it should take over (the follower's process ended).
LEADER_RETRY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class PurgeRecord:
    url: str
    when: float  # epoch seconds on the clock of the host that took the purge
    pid: str  # random, given by that host: the same purge read twice is applied and written once


class PurgeChannel(Protocol):
    """How purges travel between hosts (moxy.cache.redis.RedisFleet). Failures are values, never errors."""

    async def publish(self, record: PurgeRecord) -> str | None:
        """The purge's id in the channel, or None when it could not be sent."""
        ...

    async def tip(self) -> str | None:
        """The id of the newest purge in the channel ("0-0" when none), or None when the channel is unusable."""
        ...

    async def read(self, after: str, block: float) -> list[tuple[str, PurgeRecord | None]] | None:
        """The purges after id `after` in order (None for one that does not parse), waiting up to `block` seconds
        for one; None when the channel failed."""
        ...

    async def aclose(self) -> None: ...


def _stream_order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class PurgeLog:
    """The purge times per upstream URL, as this process last read them from `path`; with a `channel`, also
    published to and followed from the other hosts."""

    def __init__(self, path: Path, channel: PurgeChannel | None = None) -> None:
        self.path = path
        self.channel = channel
        self._purged: dict[str, float] = {}
        self._offset = 0
        self._size_seen = -1
        self._cursor: str | None = None  # the newest stream id in the log: where this host resumes reading
        self._local: set[str] = set()  # purge ids a worker of this host logged itself (never followed back)
        self._unpublished: list[PurgeRecord] = []  # this worker's purges the channel did not take yet
        self._leader_fd: int | None = None

    def covers(self, entry: Entry) -> bool:
        """True when `entry` was stored before a later purge of its URL (so it must not be served).

        The hot path of every hit: one dict lookup, and none at all while nothing was ever purged."""
        if not self._purged:
            return False
        when = self._purged.get(entry.url)
        return when is not None and entry.stored_at <= when

    async def record(self, url: str, when: float) -> bool:
        """Apply the purge here at once, write it for every other worker, and publish it for every other host;
        False when the log took no write (a full or read-only cache folder): the purge then holds in this worker,
        in the shared tiers and on other hosts only, and the other workers' memory copies live out their freshness.
        A purge the channel does not take (Redis down) is sent again by `watch` until it does. Never an error."""
        record = PurgeRecord(url, when, secrets.token_hex(8))
        self._note(url, when)
        self._local.add(record.pid)
        # Logged before it is published, so the follower of this host finds it in the log and skips it.
        written = await self._write([{"t": when, "url": url, "p": record.pid}])
        if self.channel is not None and await self.channel.publish(record) is None:
            self._unpublished.append(record)
        return written

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
        """Poll for other workers' purges, and send again those the channel missed, until cancelled."""
        while True:
            try:
                await self.refresh()
            except OSError:
                pass  # an unreadable log must not stop serving; the next poll tries again
            if self._unpublished and self.channel is not None:
                await self._publish_pending(self.channel)
            await asyncio.sleep(interval)

    async def follow(self, *, block: float = BLOCK_SECONDS) -> None:
        """Apply the other hosts' purges from the channel until cancelled: in one worker per host (whichever holds
        the leader lock; the others wait to take over), reconnecting with backoff whenever the channel fails."""
        if self.channel is None:
            return
        delay = BACKOFF_MIN
        while True:
            try:
                leading = await asyncio.to_thread(self._lead)
            except OSError:
                leading = False  # the cache folder takes no lock file now: try again, as for a taken lock
            if not leading:
                await asyncio.sleep(LEADER_RETRY_SECONDS)
                continue
            try:
                pulled = await self.pull(self.channel, block)
            except OSError:
                pulled = False  # the log could not be read: try again shortly, as for a channel failure
            if pulled:
                delay = BACKOFF_MIN
                continue
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jittered: hosts do not reconnect in step
            delay = min(delay * 2, BACKOFF_MAX)

    async def pull(self, channel: PurgeChannel, block: float) -> bool:
        """One read of the channel, applied here and written to the log; False when the channel failed."""
        await self.refresh()  # the cursor and the purge ids as the log holds them
        if self._cursor is None:
            # Never followed from this folder: nothing cached here predates the purges already in the stream
            # that this host did not see, so reading starts at the newest one, written down as the cursor.
            tip = await channel.tip()
            if tip is None:
                return False
            await self._write([{"id": tip}])
            self._cursor = tip
        batch = await channel.read(self._cursor, block)
        if batch is None:
            return False
        if not batch:
            return True
        await self.refresh()  # purges this host's workers logged while the read waited: not written twice
        lines: list[dict[str, Any]] = []
        for stream_id, record in batch:
            self._cursor = stream_id
            if record is None or record.pid in self._local:
                continue
            self._note(record.url, record.when)
            lines.append({"t": record.when, "url": record.url, "p": record.pid, "id": stream_id})
        await self._write(lines)
        return True

    async def aclose(self) -> None:
        """Give up the follower's lock, so another worker of this host takes over at once, and close the channel."""
        if self._leader_fd is not None:
            os.close(self._leader_fd)
            self._leader_fd = None
        if self.channel is not None:
            await self.channel.aclose()

    async def _publish_pending(self, channel: PurgeChannel) -> None:
        while self._unpublished:
            if await channel.publish(self._unpublished[0]) is None:
                return
            self._unpublished.pop(0)

    def _lead(self) -> bool:
        if self._leader_fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.leader", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Released by the kernel when this process ends, however it ends: a crashed follower is replaced.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._leader_fd = fd
        return True

    def _note(self, url: str, when: float) -> None:
        if when > self._purged.get(url, float("-inf")):
            self._purged[url] = when

    async def _write(self, records: list[dict[str, Any]]) -> bool:
        if not records:
            return True
        data = b"".join(orjson.dumps(record) + b"\n" for record in records)
        try:
            await asyncio.to_thread(self._append, data)
        except OSError:
            return False
        return True

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0600 like the entries: upstream URLs can carry credentials (presigned query strings).
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
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
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                self._read_line(orjson.loads(raw))  # a damaged line loses one purge, never the log

    def _read_line(self, record: dict[str, Any]) -> None:
        stream_id = record.get("id")
        if isinstance(stream_id, str) and (
            self._cursor is None or _stream_order(stream_id) > _stream_order(self._cursor)
        ):
            self._cursor = stream_id
        url = record.get("url")
        if not isinstance(url, str):
            return  # a cursor line
        self._note(url, float(record["t"]))
        pid = record.get("p")
        if isinstance(pid, str) and stream_id is None:
            self._local.add(pid)

"""Redis, shared by every host (MOXY_REDIS_URL). The only module that imports redis.

RedisLink is one client and the breaker every use of it goes through: the entry tier (RedisStorage), the fleet's
short locks and the purge stream (RedisFleet). moxy.cache.fleet and moxy.cache.purges decide what to do with those;
this module only talks to Redis, and turns every failure into a value (a miss, None, a no-op), never an error in
the request.

Per entry two keys: `{prefix}m:{<sid>}` holds encode_entry(metadata only) and `{prefix}b:{<sid>}` the raw body. The
braces are a Redis Cluster hash tag: both keys live in one slot, so the MGET and the MULTI that touch both work on a
cluster too. get() reads both in one MGET and checks the body against the digest in the metadata; touch() rewrites
the small metadata key and only extends the body key's expiry. Put writes both in one MULTI transaction."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio.to_thread
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
    RedisClusterException,
    RedisError,
    TimeoutError as RedisTimeoutError,
)

from moxy.body import digest_bytes
from moxy.cache.entry import BodyFile, CorruptEntry, Entry, decode_entry, encode_entry, storage_id
from moxy.cache.freshness import current_age
from moxy.cache.purges import PurgeRecord
from moxy.hosts import HostBusy, HostGate, HostUnavailable

__all__ = ["RedisFleet", "RedisLink", "RedisStorage"]

MiB = 1024 * 1024
T = TypeVar("T")
_REDIS = "redis"  # the one "host" of the gate
# What a call to Redis can raise when Redis is down, slow, restarting or refusing (a cluster with no known node
# raises the cluster's own exception, which is not a RedisError).
_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
_TIMEOUTS = (RedisTimeoutError, TimeoutError)
# Purges kept in the stream for hosts that were away: a host disconnected for fewer purges than this replays every
# one it missed when it comes back. About 150 bytes each in Redis.
PURGE_BACKLOG = 100_000
# Compare-and-delete: a lock is released only by the holder of its token, never by a host whose lock expired and
# was taken by another meanwhile.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def _connect(url: str, *, cluster: bool, timeout: float, max_connections: int) -> Any:
    # No retry on a timeout: a slow Redis must cost one timeout, not four (redis-py retries three times by
    # default). One immediate retry on a broken connection, which is what a pooled connection to a restarted Redis
    # is: the retry dials afresh instead of counting a failure against a Redis that is back.
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "max_connections": max_connections,
        "retry": retry,
    }
    if cluster:
        return RedisCluster.from_url(url, **options)
    return Redis.from_url(url, **options)


class RedisLink:
    """One Redis (or Redis Cluster) client and its breaker, shared by the tier, the locks and the purges.

    A slow or dead Redis must cost the request path nothing: at most `max_connections` calls at once (each holds a
    connection), a bounded wait for one, every call bounded by `timeout`, and after `failure_threshold` failures in
    a row no call at all for `cooldown` seconds; then one call probes, and success reopens the link. A call that
    timed out stops every call at once for `cooldown` (not after `failure_threshold` of them): a request makes
    several Redis calls (lookup, lock, store), and each may cost the whole timeout, so without this one request
    could pay it more than once. A quick failure (refused, reset) costs nothing and waits for the threshold."""

    def __init__(
        self,
        url: str,
        *,
        cluster: bool = False,
        timeout: float = 1.0,
        max_connections: int = 64,
        failure_threshold: int = 3,
        cooldown: float = 5.0,
    ) -> None:
        self.url = url
        self.cluster = cluster
        self.timeout = timeout
        self.errors = 0
        self.cooldown = cooldown
        self._quiet_until = 0.0  # after a timeout: no call until then
        # Typed loosely: Redis and RedisCluster offer the same commands with differently spelled signatures.
        self.client: Any = _connect(url, cluster=cluster, timeout=timeout, max_connections=max_connections)
        self._gate = HostGate(
            per_host=max_connections,
            wait_timeout=timeout,
            failure_threshold=failure_threshold,
            cooldown=cooldown,
            clock=time.monotonic,
        )

    async def guarded(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """`call`'s result, or None when Redis failed, is cooling down, or every connection is busy."""
        if self._quiet_until and self._quiet_until > time.monotonic():
            return None
        try:
            async with self._gate.slot(_REDIS):
                result = await call()
        except (HostBusy, HostUnavailable):
            return None
        except _TIMEOUTS:
            self.errors += 1
            self._gate.failed(_REDIS)
            self._quiet_until = time.monotonic() + self.cooldown
            return None
        except _FAILURES:
            self.errors += 1
            self._gate.failed(_REDIS)
            return None
        self._gate.succeeded(_REDIS)
        return result

    def observed(self, ok: bool, *, timed_out: bool = False) -> None:
        """Count the outcome of a call made outside `guarded` (the purge stream's blocking read). That reader keeps
        trying in the background, so it, not a client's request, is what finds a dead Redis back and closes the
        breaker again; while Redis stays down its failures keep the breaker open."""
        if ok:
            self._quiet_until = 0.0
            self._gate.succeeded(_REDIS)
        else:
            self.errors += 1
            self._gate.failed(_REDIS)
            if timed_out:
                self._quiet_until = time.monotonic() + self.cooldown

    def is_down(self) -> bool:
        """Whether the breaker refuses calls right now (nothing is sent to find out)."""
        return self._quiet_until > time.monotonic() or self._gate.is_open(_REDIS)

    def blocking_client(self, block: float) -> Any:
        """A client of its own for one long blocking read: its socket waits `block` longer than the others', and it
        holds none of the shared pool's connections."""
        return _connect(self.url, cluster=self.cluster, timeout=self.timeout + block, max_connections=2)

    async def ping(self) -> bool:
        """Whether Redis answers (for /readyz): False at once while the breaker is open."""
        return bool(await self.guarded(self.client.ping))

    async def aclose(self) -> None:
        await self.client.aclose()


def _read_range(body: BodyFile) -> bytes:
    with open(body.path, "rb") as file:
        file.seek(body.offset)
        return file.read(body.length)


class RedisStorage:
    """Entries in Redis, expiring when even stale-if-error could no longer use them (plus `margin` seconds,
    which keeps validators around for a conditional refresh). Bodies over `max_entry_bytes` are not kept."""

    def __init__(
        self,
        link: RedisLink,
        *,
        max_entry_bytes: int = 8 * MiB,
        prefix: str = "moxy:",
        margin: float = 3600.0,
    ) -> None:
        self.link = link
        self.max_entry_bytes = max_entry_bytes
        self.prefix = prefix
        self.margin = margin

    @property
    def errors(self) -> int:
        return self.link.errors

    def _keys(self, key: str) -> tuple[str, str]:
        sid = storage_id(key)
        return f"{self.prefix}m:{{{sid}}}", f"{self.prefix}b:{{{sid}}}"

    def _expiry_ms(self, entry: Entry) -> int:
        useful = entry.lifetime + max(entry.stale_while_revalidate, entry.stale_if_error) + self.margin
        remaining = useful - current_age(entry, time.time())
        return max(1000, math.ceil(remaining * 1000))

    async def ping(self) -> bool:
        """Whether Redis answers (for /readyz)."""
        return await self.link.ping()

    async def get(self, key: str) -> Entry | None:
        meta_key, body_key = self._keys(key)
        client = self.link.client
        found = await self.link.guarded(lambda: client.mget(meta_key, body_key))
        if found is None:
            return None
        meta, body = found
        if not isinstance(meta, bytes) or not isinstance(body, bytes):
            return None  # missing (a str never comes back: decode_responses is off)
        try:
            entry = decode_entry(meta)
        except CorruptEntry:
            return None
        if entry.key != key or len(body) != entry.length:
            return None  # another key sharing the storage id, or a body of another version
        digest = await digest_bytes(body)
        if digest != entry.digest:
            return None
        return entry.with_body(body)

    async def _body(self, entry: Entry) -> bytes | None:
        if entry.length > self.max_entry_bytes:
            return None
        if isinstance(entry.body, BodyFile):
            try:
                data = await anyio.to_thread.run_sync(_read_range, entry.body)
            except OSError:
                return None
            return data if len(data) == entry.length else None
        return entry.body if len(entry.body) == entry.length else None

    async def put(self, entry: Entry) -> None:
        meta_key, body_key = self._keys(entry.key)
        client = self.link.client
        body = await self._body(entry)
        if body is None:
            # Not kept here; drop an older version so it cannot outlive the newer one above.
            await self.link.guarded(lambda: client.delete(meta_key, body_key))
            return
        expiry = self._expiry_ms(entry)

        async def store() -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.set(meta_key, encode_entry(entry.with_body(b""), include_body=False), px=expiry)
                pipe.set(body_key, body, px=expiry)
                await pipe.execute()

        await self.link.guarded(store)

    async def touch(self, entry: Entry) -> None:
        meta_key, body_key = self._keys(entry.key)
        client = self.link.client
        expiry = self._expiry_ms(entry)

        async def extend() -> list[object]:
            # Metadata only, and only while the body is still there: SET ... XX keeps a purged entry purged.
            async with client.pipeline(transaction=True) as pipe:
                pipe.pexpire(body_key, expiry)
                pipe.set(meta_key, encode_entry(entry.with_body(b""), include_body=False), px=expiry, xx=True)
                return list(await pipe.execute())

        done = await self.link.guarded(extend)
        if done is None:
            return
        extended, replaced = done
        if not (extended and replaced):
            await self.put(entry)  # not in this tier (or evicted by Redis): store it whole if we have the body

    async def delete(self, key: str) -> bool:
        meta_key, body_key = self._keys(key)
        client = self.link.client

        async def remove() -> bool:
            meta = await client.get(meta_key)
            if isinstance(meta, bytes):
                try:
                    if decode_entry(meta).key != key:
                        return False  # belongs to another key with the same storage id
                except CorruptEntry:
                    pass
            return bool(await client.delete(meta_key, body_key))

        return bool(await self.link.guarded(remove))

    async def aclose(self) -> None:
        # The tier owns the link: the app closes the tiers last, after everything else that used Redis.
        await self.link.aclose()


class RedisFleet:
    """What the hosts of one fleet share besides entries: short locks (for moxy.cache.fleet) and the purge stream
    (for moxy.cache.purges). Every call goes through the link's breaker but the blocking stream read, which runs
    on a connection of its own in one background task per host and backs off by itself."""

    def __init__(self, link: RedisLink, *, prefix: str = "moxy:", backlog: int = PURGE_BACKLOG) -> None:
        self.link = link
        self.prefix = prefix
        self.stream = f"{prefix}purges"
        self.backlog = backlog
        self._reader: Any = None

    # -- locks (moxy.cache.fleet.LockPort) -------------------------------------------

    def _lock_key(self, name: str) -> str:
        return f"{self.prefix}lock:{{{name}}}"

    async def acquire(self, name: str, token: str, ttl: float) -> bool | None:
        """True: the lock is ours for `ttl` seconds; False: another host holds it; None: Redis is unusable."""
        key, client = self._lock_key(name), self.link.client

        async def take() -> bool:
            return bool(await client.set(key, token, nx=True, px=max(1, math.ceil(ttl * 1000))))

        return await self.link.guarded(take)

    async def held(self, name: str) -> bool | None:
        """Whether anyone holds the lock; None: Redis is unusable."""
        key, client = self._lock_key(name), self.link.client

        async def exists() -> bool:
            return bool(await client.exists(key))

        return await self.link.guarded(exists)

    async def release(self, name: str, token: str) -> None:
        key, client = self._lock_key(name), self.link.client
        await self.link.guarded(lambda: client.eval(_RELEASE, 1, key, token))

    # -- purges (moxy.cache.purges.PurgeChannel) ----------------------------------------

    async def publish(self, record: PurgeRecord) -> str | None:
        """Append the purge to the stream; its stream id, or None when Redis is unusable."""
        fields = {"url": record.url, "t": repr(record.when), "p": record.pid}
        client = self.link.client

        async def add() -> bytes:
            # Trimmed by length (approximately, which lets Redis drop whole nodes: cheap), never by time.
            return bytes(await client.xadd(self.stream, fields, maxlen=self.backlog, approximate=True))

        added = await self.link.guarded(add)
        return added.decode() if added is not None else None

    async def tip(self) -> str | None:
        """The id of the newest purge in the stream ("0-0" when there is none), or None when Redis is unusable."""
        client = self.link.client

        async def newest() -> str:
            found = await client.xrevrange(self.stream, count=1)
            return _text(found[0][0]) if found else "0-0"

        return await self.link.guarded(newest)

    async def read(self, after: str, block: float) -> list[tuple[str, PurgeRecord | None]] | None:
        """The purges after stream id `after`, waiting up to `block` seconds for one; None when Redis failed.
        A record that does not parse comes back as None with its id, so the reader moves past it."""
        if self._reader is None:
            self._reader = self.link.blocking_client(block)
        try:
            answer = await self._reader.xread({self.stream: after}, count=1000, block=max(1, int(block * 1000)))
        except _TIMEOUTS:
            self.link.observed(False, timed_out=True)
            return None
        except _FAILURES:
            self.link.observed(False)
            return None
        self.link.observed(True)
        found: list[tuple[str, PurgeRecord | None]] = []
        for _stream, entries in _stream_entries(answer):
            for raw_id, fields in entries:
                found.append((_text(raw_id), _record(fields)))
        return found

    async def aclose(self) -> None:
        if self._reader is not None:
            await self._reader.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_entries(answer: Any) -> list[tuple[Any, list[tuple[Any, dict[Any, Any]]]]]:
    # RESP2 answers a list of [stream, entries]; RESP3 a map of stream -> entries.
    if not answer:
        return []
    if isinstance(answer, dict):
        return [(name, entries) for name, entries in answer.items()]
    return [(name, entries) for name, entries in answer]


def _record(fields: dict[Any, Any]) -> PurgeRecord | None:
    try:
        url, when, pid = (_text(fields[name]) for name in (b"url", b"t", b"p"))
        return PurgeRecord(url=url, when=float(when), pid=pid)
    except (KeyError, ValueError, UnicodeDecodeError):
        return None

"""The Redis tier, shared by every host (MOXY_REDIS_URL). The only module that imports redis.

Per entry two keys: `{prefix}m:{sid}` holds encode_entry(metadata only) and `{prefix}b:{sid}` the raw body.
get() reads both in one MGET and checks the body against the digest in the metadata; touch() rewrites the
small metadata key and only extends the body key's expiry. Put writes both in one MULTI transaction.
Redis being down or slow is a miss (get) or a no-op (put, touch, delete), never an error in the request."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio.to_thread
from redis.asyncio import Redis
from redis.exceptions import RedisError

from moxy.body import digest_bytes
from moxy.cache.entry import BodyFile, CorruptEntry, Entry, decode_entry, encode_entry, storage_id
from moxy.cache.freshness import current_age
from moxy.hosts import HostBusy, HostGate, HostUnavailable

__all__ = ["RedisStorage"]

MiB = 1024 * 1024
T = TypeVar("T")
_REDIS = "redis"  # the one "host" of this tier's gate


def _read_range(body: BodyFile) -> bytes:
    with open(body.path, "rb") as file:
        file.seek(body.offset)
        return file.read(body.length)


class RedisStorage:
    """Entries in Redis, expiring when even stale-if-error could no longer use them (plus `margin` seconds,
    which keeps validators around for a conditional refresh). Bodies over `max_entry_bytes` are not kept."""

    def __init__(
        self,
        url: str,
        *,
        max_entry_bytes: int = 8 * MiB,
        prefix: str = "moxy:",
        margin: float = 3600.0,
        timeout: float = 1.0,
        max_connections: int = 64,
        failure_threshold: int = 3,
        cooldown: float = 5.0,
    ) -> None:
        self.max_entry_bytes = max_entry_bytes
        self.prefix = prefix
        self.margin = margin
        self.errors = 0
        self._client: Redis = Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=max_connections
        )
        # A slow or dead Redis must cost the request path nothing: at most `max_connections` calls at once (each
        # holds a connection), a bounded wait for one, and after `failure_threshold` failures in a row no call at
        # all for `cooldown` seconds; then one call probes, and success reopens the tier.
        self._gate = HostGate(
            per_host=max_connections,
            wait_timeout=timeout,
            failure_threshold=failure_threshold,
            cooldown=cooldown,
            clock=time.monotonic,
        )

    async def _guarded(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """`call`'s result, or None when Redis failed, is cooling down, or every connection is busy."""
        try:
            async with self._gate.slot(_REDIS):
                result = await call()
        except (HostBusy, HostUnavailable):
            return None
        except (RedisError, OSError):
            self.errors += 1
            self._gate.failed(_REDIS)
            return None
        self._gate.succeeded(_REDIS)
        return result

    def _keys(self, key: str) -> tuple[str, str]:
        sid = storage_id(key)
        return f"{self.prefix}m:{sid}", f"{self.prefix}b:{sid}"

    def _expiry_ms(self, entry: Entry) -> int:
        useful = entry.lifetime + max(entry.stale_while_revalidate, entry.stale_if_error) + self.margin
        remaining = useful - current_age(entry, time.time())
        return max(1000, math.ceil(remaining * 1000))

    async def ping(self) -> bool:
        """Whether Redis answers (for /readyz)."""
        return bool(await self._guarded(self._client.ping))

    async def get(self, key: str) -> Entry | None:
        meta_key, body_key = self._keys(key)
        found = await self._guarded(lambda: self._client.mget(meta_key, body_key))
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
        body = await self._body(entry)
        if body is None:
            # Not kept here; drop an older version so it cannot outlive the newer one above.
            await self._guarded(lambda: self._client.delete(meta_key, body_key))
            return
        expiry = self._expiry_ms(entry)

        async def store() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(meta_key, encode_entry(entry.with_body(b""), include_body=False), px=expiry)
                pipe.set(body_key, body, px=expiry)
                await pipe.execute()

        await self._guarded(store)

    async def touch(self, entry: Entry) -> None:
        meta_key, body_key = self._keys(entry.key)
        expiry = self._expiry_ms(entry)

        async def extend() -> list[object]:
            # Metadata only, and only while the body is still there: SET ... XX keeps a purged entry purged.
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.pexpire(body_key, expiry)
                pipe.set(meta_key, encode_entry(entry.with_body(b""), include_body=False), px=expiry, xx=True)
                return list(await pipe.execute())

        done = await self._guarded(extend)
        if done is None:
            return
        extended, replaced = done
        if not (extended and replaced):
            await self.put(entry)  # not in this tier (or evicted by Redis): store it whole if we have the body

    async def delete(self, key: str) -> bool:
        meta_key, body_key = self._keys(key)

        async def remove() -> bool:
            meta = await self._client.get(meta_key)
            if isinstance(meta, bytes):
                try:
                    if decode_entry(meta).key != key:
                        return False  # belongs to another key with the same storage id
                except CorruptEntry:
                    pass
            return bool(await self._client.delete(meta_key, body_key))

        return bool(await self._guarded(remove))

    async def aclose(self) -> None:
        await self._client.aclose()

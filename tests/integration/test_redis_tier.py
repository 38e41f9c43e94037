"""The Redis tier against a real redis-server on 127.0.0.1 (started here, in a temporary folder)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from moxy.cache import BodyFile, DiskStorage, Entry, MemoryStorage, TieredStorage, make_key, storage_id
from moxy.cache.redis import RedisLink, RedisStorage
from tests.entries import make_entry as entry_of
from tests.integration.redis_servers import RedisServer
from tests.net import free_port

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
async def storage(redis_url: str) -> AsyncIterator[RedisStorage]:
    raw = Redis.from_url(redis_url)
    await raw.flushdb()
    await raw.aclose()
    redis = RedisStorage(RedisLink(redis_url), max_entry_bytes=1024 * 1024, prefix="test:")
    yield redis
    await redis.aclose()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def make_entry(name: str = "a.png", body: bytes = b"\x89PNG body", **overrides: object) -> Entry:
    defaults: dict[str, object] = {
        "stored_at": time.time(),
        "lifetime": 600.0,
        "stale_while_revalidate": 60.0,
        "stale_if_error": 3600.0,
        "etag": '"v1"',
    }
    return entry_of(f"https://img.example/{name}", body, accept="image/*", **{**defaults, **overrides})


async def test_round_trip_and_expiry(storage: RedisStorage, raw: Redis):
    entry = make_entry(body=os.urandom(300_000))
    await storage.put(entry)
    got = await storage.get(entry.key)
    assert got == entry
    sid = storage_id(entry.key)
    ttl = await raw.pttl(f"test:m:{{{sid}}}")
    # lifetime + max(swr, sie) + margin = 600 + 3600 + 3600 seconds
    assert 7700_000 < ttl <= 7800_000
    assert await raw.pttl(f"test:b:{{{sid}}}") > 7700_000


async def test_full_key_compared(storage: RedisStorage, monkeypatch: pytest.MonkeyPatch):
    import moxy.cache.redis

    monkeypatch.setattr(moxy.cache.redis, "storage_id", lambda key: "0" * 64)
    entry = make_entry("one.png")
    await storage.put(entry)
    other = make_key("https://img.example/two.png", {})
    assert await storage.get(other) is None
    assert await storage.delete(other) is False
    assert await storage.get(entry.key) == entry


async def test_delete(storage: RedisStorage):
    entry = make_entry()
    await storage.put(entry)
    assert await storage.delete(entry.key) is True
    assert await storage.get(entry.key) is None
    assert await storage.delete(entry.key) is False


async def test_body_file_is_read_and_too_large_is_skipped(storage: RedisStorage, tmp_path: Path):
    body = os.urandom(200_000)
    source = tmp_path / "spool"
    source.write_bytes(b"xx" + body)
    entry = make_entry(body=body).with_body(BodyFile(str(source), 2, len(body)))
    await storage.put(entry)
    got = await storage.get(entry.key)
    assert got is not None and got.body == body
    huge = make_entry(body=os.urandom(1024 * 1024 + 1))
    await storage.put(huge)  # replaces the older version by nothing: it must not shadow the newer one
    assert await storage.get(huge.key) is None


async def test_touch_rewrites_metadata_only(storage: RedisStorage, raw: Redis):
    entry = make_entry(body=os.urandom(100_000))
    await storage.put(entry)
    sid = storage_id(entry.key)
    await raw.pexpire(f"test:b:{{{sid}}}", 5_000)
    refreshed = entry.with_body(b"").refreshed(
        stored_at=time.time(),
        age=0.0,
        lifetime=100.0,
        stale_while_revalidate=0.0,
        stale_if_error=0.0,
        must_revalidate=True,
        no_cache=False,
        etag='"v2"',
        last_modified=None,
    )
    await storage.touch(refreshed)  # no body in hand: only the metadata key can change
    got = await storage.get(entry.key)
    assert got is not None and got.etag == '"v2"' and got.must_revalidate and got.body == entry.body
    assert await raw.pttl(f"test:b:{{{sid}}}") > 3_000_000  # expiry extended to the new metadata's


async def test_touch_of_a_missing_entry_stores_it_whole(storage: RedisStorage):
    entry = make_entry()
    await storage.touch(entry)
    assert await storage.get(entry.key) == entry


@pytest.mark.parametrize("damage", ["meta", "body", "body-missing"])
async def test_damaged_entries_are_misses(storage: RedisStorage, raw: Redis, damage: str):
    entry = make_entry(body=b"0123456789" * 100)
    await storage.put(entry)
    sid = storage_id(entry.key)
    if damage == "meta":
        stored = await raw.get(f"test:m:{{{sid}}}")
        assert isinstance(stored, bytes)
        meta = bytearray(stored)
        meta[30] ^= 1
        await raw.set(f"test:m:{{{sid}}}", bytes(meta))
    elif damage == "body":
        await raw.set(f"test:b:{{{sid}}}", b"9123456789" + b"0123456789" * 99)
    else:
        await raw.delete(f"test:b:{{{sid}}}")
    assert await storage.get(entry.key) is None


async def test_redis_down_is_a_miss_not_an_error():
    dead = RedisStorage(RedisLink(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5, failure_threshold=3, cooldown=0.3))
    entry = make_entry()
    await dead.put(entry)
    await dead.touch(entry)
    assert await dead.get(entry.key) is None
    assert await dead.delete(entry.key) is False
    assert await dead.ping() is False
    # Three failures in a row open the breaker: the later calls did not even try.
    assert dead.errors == 3
    started = time.monotonic()
    for _ in range(1000):
        assert await dead.get(entry.key) is None
    assert dead.errors == 3, "a dead Redis costs nothing per request while the breaker is open"
    assert time.monotonic() - started < 0.5 * 3
    await asyncio.sleep(0.35)
    assert await dead.get(entry.key) is None
    assert dead.errors == 4, "after the cool-down one call probes Redis again"
    await dead.aclose()


async def test_ping(storage: RedisStorage):
    assert await storage.ping() is True


async def test_tiered_redis_hit_fills_disk_and_memory(storage: RedisStorage, tmp_path: Path):
    memory = MemoryStorage(8 * 1024 * 1024, 64 * 1024)
    disk = DiskStorage(tmp_path, 64 * 1024 * 1024)
    entry = make_entry(body=b"from another host")
    await storage.put(entry)
    tiered = TieredStorage([memory, disk, storage])
    assert await tiered.get(entry.key) == entry
    assert await memory.get(entry.key) == entry
    assert await disk.get(entry.key) == entry
    assert await tiered.delete(entry.key) is True
    assert await storage.get(entry.key) is None and await disk.get(entry.key) is None
    await disk.aclose()

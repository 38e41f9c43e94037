"""The Redis side of many hosts (moxy.cache.redis.RedisFleet, RedisLink) against a real redis-server: the short
locks, the purge stream, and what a slow or dead Redis costs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme
from redis.asyncio import Redis

from moxy.cache.entry import Entry
from moxy.cache.fleet import Alone, Filled, FleetLocks, Lead
from moxy.cache.purges import PurgeLog, PurgeRecord
from moxy.cache.redis import RedisFleet, RedisLink, RedisStorage
from tests.entries import make_entry
from tests.integration.redis_servers import LatencyRelay, RedisServer
from tests.net import free_port

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

URL = "https://img.example/a.png"


async def nothing() -> Entry | None:
    return None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def link(redis_server: RedisServer) -> AsyncIterator[RedisLink]:
    raw = Redis.from_url(redis_server.url)
    await raw.flushdb()
    await raw.aclose()
    made = RedisLink(redis_server.url, timeout=0.25)
    yield made
    await made.aclose()


async def test_lock_is_exclusive_expires_and_is_released_only_by_its_owner(link: RedisLink):
    fleet = RedisFleet(link, prefix="t:")
    assert await fleet.acquire("k", "one", 0.3) is True
    assert await fleet.acquire("k", "two", 0.3) is False
    assert await fleet.held("k") is True
    await fleet.release("k", "two")  # not the owner: nothing happens
    assert await fleet.held("k") is True
    await fleet.release("k", "one")
    assert await fleet.held("k") is False
    assert await fleet.acquire("k", "three", 0.1) is True
    await asyncio.sleep(0.2)
    assert await fleet.held("k") is False, "a crashed holder's lock lapses by itself"
    assert await fleet.acquire("k", "four", 1.0) is True
    await fleet.release("k", "three")  # its lock lapsed and is now four's: left alone
    assert await fleet.held("k") is True


async def test_a_waiter_is_handed_the_leaders_entry(link: RedisLink):
    fleet, storage = RedisFleet(link, prefix="t:"), RedisStorage(link, prefix="t:")
    entry = make_entry(URL, b"\x89PNG shared", stored_at=time.time(), lifetime=600.0)
    leader, waiter = FleetLocks(fleet), FleetLocks(fleet)

    async def stored() -> Entry | None:
        return await storage.get(entry.key)

    lead = await leader.claim(entry.key, stored)
    assert isinstance(lead, Lead)

    async def fetch_store_release() -> None:
        await asyncio.sleep(0.2)
        await storage.put(entry)
        await leader.release(lead)

    task = asyncio.create_task(fetch_store_release())
    got = await waiter.claim(entry.key, stored)
    await task
    assert isinstance(got, Filled) and got.entry == entry
    assert 0.2 <= got.waited < 0.35


async def test_purge_stream_round_trip_and_resume(link: RedisLink, tmp_path: Path):
    fleet = RedisFleet(link, prefix="t:")
    assert await fleet.tip() == "0-0"
    first = await fleet.publish(PurgeRecord(URL, 100.5, "p1"))
    assert first is not None and await fleet.tip() == first
    second = await fleet.publish(PurgeRecord(URL + "?2", 101.0, "p2"))
    assert second is not None
    assert await fleet.read("0-0", 0.1) == [
        (first, PurgeRecord(URL, 100.5, "p1")),
        (second, PurgeRecord(URL + "?2", 101.0, "p2")),
    ]
    assert await fleet.read(first, 0.1) == [(second, PurgeRecord(URL + "?2", 101.0, "p2"))]
    started = time.monotonic()
    assert await fleet.read(second, 0.2) == [], "nothing new: the read waits its block, then answers empty"
    assert time.monotonic() - started >= 0.19
    # Two hosts over the real stream: B follows, A purges, B applies it.
    a = PurgeLog(tmp_path / "a" / "purges.log", fleet)
    b = PurgeLog(tmp_path / "b" / "purges.log", RedisFleet(link, prefix="t:"))
    assert await b.pull(b.channel, 0.05)  # type: ignore[arg-type]
    await a.record(URL, 200.0)
    assert await b.pull(b.channel, 0.5)  # type: ignore[arg-type]
    assert b.covers(make_entry(URL, stored_at=150.0))
    await a.aclose()
    await b.aclose()


async def test_dead_redis_costs_nothing_after_the_breaker_opens():
    link = RedisLink(f"redis://127.0.0.1:{free_port()}/0", timeout=0.25, failure_threshold=3, cooldown=5.0)
    fleet = RedisFleet(link)
    locks = FleetLocks(fleet)
    for _ in range(3):
        assert await locks.claim("k", nothing) == Alone("redis")
    assert link.is_down()
    started = time.monotonic()
    for _ in range(1000):
        assert await locks.claim("k", nothing) == Alone("redis")
        assert await fleet.publish(PurgeRecord(URL, 1.0, "p")) is None
    assert time.monotonic() - started < 0.5
    assert link.errors == 3
    assert await fleet.read("0-0", 0.05) is None, "the follower's own read fails, and keeps the breaker open"
    await fleet.aclose()
    await link.aclose()


async def test_slow_redis_costs_one_timeout_then_nothing(redis_server: RedisServer):
    with LatencyRelay(redis_server.port) as relay:
        link = RedisLink(relay.url, timeout=0.2, failure_threshold=3, cooldown=5.0)
        locks = FleetLocks(RedisFleet(link))
        assert isinstance(await locks.claim("warm-up", nothing), Lead)  # connected, fast
        relay.delay = 1.0
        timings = []
        for _ in range(5):
            started = time.monotonic()
            assert await locks.claim("slow", nothing) == Alone("redis")
            timings.append(time.monotonic() - started)
        assert 0.2 <= timings[0] < 0.2 + 0.1, "the first call is cut at the timeout (no retries on top)"
        assert max(timings[1:]) < 0.01, "then no call at all: one timeout, not one per call"
        assert link.errors == 1 and link.is_down()
        relay.delay = 0.0
        fleet = RedisFleet(link)
        assert await fleet.read("0-0", 0.05) == [], "the purge follower's read gets through"
        assert not link.is_down(), "and its success reopens the link at once, before any request pays for a probe"
        assert isinstance(await locks.claim("after", nothing), Lead)
        await fleet.aclose()
        await link.aclose()


@pytest.mark.anyio
async def test_rediss_checks_the_servers_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ca = trustme.CA()
    issued = ca.issue_cert("localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    issued.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    tls = ["--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "key.pem")]
    server = RedisServer(tmp_path / "redis", *tls, "--tls-ca-cert-file", str(tmp_path / "ca.pem"))
    server.extra += ("--tls-auth-clients", "no", "--tls-port", str(server.port), "--port", "0")
    with server:
        url = f"rediss://localhost:{server.port}/0"
        untrusted = RedisLink(url, timeout=1.0)
        assert await untrusted.ping() is False, "a certificate from an unknown CA is refused"
        await untrusted.aclose()
        # The system's trust, extended the usual way (OpenSSL reads SSL_CERT_FILE): no Moxy setting needed.
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
        link = RedisLink(url, timeout=1.0)
        storage = RedisStorage(link)
        entry = make_entry(URL, b"\x89PNG over TLS", stored_at=time.time(), lifetime=600.0)
        await storage.put(entry)
        assert await storage.get(entry.key) == entry
        await link.aclose()

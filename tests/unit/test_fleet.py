"""Cross-host coalescing decisions (moxy.cache.fleet) over an in-memory lock port and a hand-moved clock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from moxy.cache import MemoryStorage, TieredStorage
from moxy.cache.entry import Entry, storage_id
from moxy.cache.fleet import Alone, Claim, Filled, FleetLocks, Lead
from moxy.cache.freshness import FreshnessRules
from moxy.cache.purges import PurgeLog
from moxy.config import load_settings
from moxy.errors import ConfigError, UpstreamError
from moxy.policy import DestinationPolicy
from moxy.proxy import CacheResult, Failed, Proxy, ProxyRequest, Served
from moxy.signing import Signer
from moxy.validation import build_chain
from tests.assets import KEY as KEY_FOR_SIGNING
from tests.entries import make_entry
from tests.fakes.fetch import Answer, FakeFetch
from tests.fakes.fleet import FakeLocks

pytestmark = pytest.mark.anyio

ENTRY = make_entry(body=b"png")
KEY = ENTRY.key
URL = "https://api.example/posts.json"
SIGNER = Signer([KEY_FOR_SIGNING], "https://moxy.example")
MiB = 1024 * 1024


class Sleeper:
    """clock + sleep that only move time forward; `then` runs once when the clock passes `at`."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []
        self.events: list[tuple[float, object]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        for at, action in list(self.events):
            if self.now >= at:
                self.events.remove((at, action))
                action()  # type: ignore[operator]


class Fleet:
    """A host's FleetLocks over the shared lock port, reading `shared` (the Redis tier) for KEY."""

    def __init__(self, locks: FakeLocks, shared: dict[str, Entry], sleeper: Sleeper, ttl: float) -> None:
        self.locks = FleetLocks(locks, ttl=ttl, clock=sleeper.clock, sleep=sleeper.sleep)
        self.shared = shared

    async def read(self) -> Entry | None:
        return self.shared.get(KEY)

    async def claim(self, key: str, wait: float | None = None) -> Claim:
        return await self.locks.claim(key, self.read, wait)

    async def release(self, lead: Lead) -> None:
        await self.locks.release(lead)


def fleet(locks: FakeLocks, shared: dict[str, Entry], sleeper: Sleeper, ttl: float = 10.0) -> Fleet:
    return Fleet(locks, shared, sleeper, ttl)


async def test_first_claim_leads_and_release_frees_the_lock():
    locks, sleeper = FakeLocks(), Sleeper()
    claim = await fleet(locks, {}, sleeper).claim(KEY)
    assert isinstance(claim, Lead) and claim.name == storage_id(KEY)
    assert locks.holders == {claim.name: claim.token}
    await fleet(locks, {}, sleeper).release(claim)
    assert locks.holders == {}


async def test_a_waiter_gets_the_entry_the_leader_stored():
    locks, sleeper, shared = FakeLocks(), Sleeper(), dict[str, Entry]()
    lead = await fleet(locks, shared, sleeper).claim(KEY)
    assert isinstance(lead, Lead)

    def store_and_release() -> None:
        shared[KEY] = ENTRY
        del locks.holders[lead.name]

    sleeper.events.append((0.5, store_and_release))
    waiter = await fleet(locks, shared, sleeper).claim(KEY)
    assert isinstance(waiter, Filled) and waiter.entry == ENTRY
    assert 0.5 <= waiter.waited < 0.6, "picked up within one poll of the release"
    assert sleeper.slept[0] == pytest.approx(0.01) and max(sleeper.slept) <= 0.1, "polls start fast and stay bounded"


async def test_wait_is_bounded_by_the_lock_life_and_the_callers_bound():
    locks, sleeper = FakeLocks(), Sleeper()
    await fleet(locks, {}, sleeper, ttl=2.0).claim(KEY)  # held and never released (a crashed host)
    assert await fleet(locks, {}, sleeper, ttl=2.0).claim(KEY) == Alone("timeout")
    assert sleeper.now == pytest.approx(2.0)
    sleeper.now = 0.0
    assert await fleet(locks, {}, sleeper, ttl=2.0).claim(KEY, wait=0.3) == Alone("timeout")
    assert sleeper.now == pytest.approx(0.3)


async def test_released_without_a_shared_copy_fetches_alone():
    locks, sleeper = FakeLocks(), Sleeper()
    lead = await fleet(locks, {}, sleeper).claim(KEY)
    assert isinstance(lead, Lead)
    sleeper.events.append((0.05, lambda: locks.holders.clear()))  # failed or uncacheable: released, nothing stored
    assert await fleet(locks, {}, sleeper).claim(KEY) == Alone("no-shared-copy")


@pytest.mark.parametrize("when", ["at-claim", "while-waiting"])
async def test_redis_unusable_means_alone_at_once(when: str):
    locks, sleeper = FakeLocks(), Sleeper()
    if when == "at-claim":
        locks.down = True
    else:
        await fleet(locks, {}, sleeper).claim(KEY)
        sleeper.events.append((0.02, lambda: setattr(locks, "down", True)))
    assert await fleet(locks, {}, sleeper).claim(KEY) == Alone("redis")
    assert sleeper.now < 0.1, "no waiting out the bound on a dead Redis"


async def test_release_by_a_stale_token_leaves_the_new_holders_lock():
    locks, sleeper = FakeLocks(), Sleeper()
    first = await fleet(locks, {}, sleeper).claim(KEY)
    assert isinstance(first, Lead)
    locks.holders.clear()  # expired in Redis
    second = await fleet(locks, {}, sleeper).claim(KEY)
    assert isinstance(second, Lead)
    await fleet(locks, {}, sleeper).release(first)
    assert locks.holders == {second.name: second.token}


# -- the proxy's hook: two hosts over one shared tier and one lock port ----------------------------------


def host(upstream: FakeFetch, shared: MemoryStorage, locks: FakeLocks, folder: Path) -> Proxy:
    private = MemoryStorage(8 * MiB, MiB)
    return Proxy(
        signer=SIGNER,
        policy=DestinationPolicy(),
        storage=TieredStorage([private, shared]),
        fetch=upstream,
        validators=build_chain(content_types=["application/json"], max_body_bytes=MiB),
        freshness=FreshnessRules(ttl_min=0, ttl_max=3600, ttl_default=60, stale_while_revalidate=0, stale_if_error=0),
        purges=PurgeLog(folder / "purges.log"),
        fleet=FleetLocks(locks, ttl=2.0),
    )


def request(url: str = URL) -> ProxyRequest:
    parts = urlsplit(SIGNER.sign(url))
    return ProxyRequest(path=parts.path, query=parts.query)


async def test_two_hosts_share_one_fetch(tmp_path: Path):
    upstream, shared, locks, gate = FakeFetch(), MemoryStorage(8 * MiB, MiB), FakeLocks(), asyncio.Event()
    upstream.then(Answer(), gate=gate)
    a, b = host(upstream, shared, locks, tmp_path / "a"), host(upstream, shared, locks, tmp_path / "b")
    first = asyncio.create_task(a.handle(request()))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(b.handle(request()))
    await asyncio.sleep(0.05)
    gate.set()
    served = await asyncio.gather(first, second)
    assert [type(o) for o in served] == [Served, Served]
    assert [o.cache for o in served if isinstance(o, Served)] == [CacheResult.MISS, CacheResult.MISS]
    assert len(upstream.calls) == 1, "one upstream fetch for both hosts"
    assert locks.holders == {}, "released by its owner"
    again = await b.handle(request())
    assert isinstance(again, Served) and again.cache is CacheResult.HIT, "B keeps its own copy now"
    await a.aclose()
    await b.aclose()


async def test_redis_down_each_host_fetches(tmp_path: Path):
    upstream, shared, locks = FakeFetch(otherwise=Answer()), MemoryStorage(8 * MiB, MiB), FakeLocks()
    locks.down = True
    a, b = host(upstream, shared, locks, tmp_path / "a"), host(upstream, shared, locks, tmp_path / "b")
    served = await asyncio.gather(a.handle(request()), b.handle(request()))
    assert [o.cache for o in served] == [CacheResult.MISS, CacheResult.MISS]
    assert len(upstream.calls) == 2, "per-host behaviour: no waiting on a dead Redis"


async def test_a_failed_lead_leaves_the_others_to_fetch(tmp_path: Path):
    gate = asyncio.Event()
    upstream = FakeFetch(otherwise=Answer()).then(UpstreamError("upstream-status-500", status=500), gate=gate)
    shared, locks = MemoryStorage(8 * MiB, MiB), FakeLocks()
    a, b = host(upstream, shared, locks, tmp_path / "a"), host(upstream, shared, locks, tmp_path / "b")
    first = asyncio.create_task(a.handle(request()))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(b.handle(request()))
    await asyncio.sleep(0.05)
    gate.set()
    failed, served = await asyncio.gather(first, second)
    assert isinstance(failed, Failed) and isinstance(served, Served) and served.cache is CacheResult.MISS
    assert len(upstream.calls) == 2


async def test_a_lead_that_finds_the_entry_already_stored_does_not_fetch():
    locks, sleeper = FakeLocks(), Sleeper()
    claim = await fleet(locks, {KEY: ENTRY}, sleeper).claim(KEY)
    assert claim == Filled(ENTRY, 0.0), "stored and released between this request's lookup and its claim"
    assert locks.holders == {}


# -- settings ---------------------------------------------------------------------------------------------


def test_fleet_settings_and_their_checks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("MOXY_KEY", KEY_FOR_SIGNING)
    monkeypatch.setenv("MOXY_CACHE_DIR", str(tmp_path))
    settings = load_settings(redis_url="redis://127.0.0.1:6379/0")
    assert (settings.redis_timeout, settings.redis_lock_ttl, settings.redis_cluster) == (0.25, 10.0, False)
    monkeypatch.setenv("MOXY_REDIS_CLUSTER", "true")
    monkeypatch.setenv("MOXY_REDIS_TIMEOUT", "0.5")
    settings = load_settings(redis_url="rediss://cluster.example:6380")
    assert settings.redis_cluster and settings.redis_timeout == 0.5
    settings.check()
    with pytest.raises(ConfigError) as caught:
        load_settings(redis_url="unix:///run/redis.sock").check()
    assert caught.value.setting == "MOXY_REDIS_CLUSTER"
    monkeypatch.setenv("MOXY_REDIS_TIMEOUT", "0")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.setting == "MOXY_REDIS_TIMEOUT"

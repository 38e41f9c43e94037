"""Cross-host coalescing decisions (moxy.cache.fleet) over an in-memory lock port and a hand-moved clock."""

from __future__ import annotations

import pytest

from moxy.cache.entry import Entry, storage_id
from moxy.cache.fleet import Alone, Filled, FleetLocks, Lead
from tests.entries import make_entry
from tests.fakes.fleet import FakeLocks

pytestmark = pytest.mark.anyio

ENTRY = make_entry(body=b"png")
KEY = ENTRY.key


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


def fleet(locks: FakeLocks, shared: dict[str, Entry], sleeper: Sleeper, ttl: float = 10.0) -> FleetLocks:
    async def read(key: str) -> Entry | None:
        return shared.get(key)

    return FleetLocks(locks, read, ttl=ttl, clock=sleeper.clock, sleep=sleeper.sleep)


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

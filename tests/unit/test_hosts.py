"""The per-host gate: fair shares, a bounded wait, and the circuit breaker's open / half-open / closed states."""

from __future__ import annotations

import asyncio

import pytest

from moxy.hosts import HostBusy, HostGate, HostUnavailable
from tests.fakes.clock import Clock

pytestmark = pytest.mark.anyio


def gate(clock: Clock | None = None, **overrides: float) -> HostGate:
    options: dict[str, float] = {"per_host": 2, "wait_timeout": 0.05, "failure_threshold": 3, "cooldown": 10.0}
    options.update(overrides)
    return HostGate(
        per_host=int(options["per_host"]),
        wait_timeout=options["wait_timeout"],
        failure_threshold=int(options["failure_threshold"]),
        cooldown=options["cooldown"],
        clock=clock or Clock(1000.0),
    )


async def test_a_full_host_makes_its_own_fetches_wait_not_the_others() -> None:
    hosts = gate()
    release = asyncio.Event()

    async def hold(authority: str) -> None:
        async with hosts.slot(authority):
            await release.wait()

    holders = [asyncio.create_task(hold("slow.example:80")) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(HostBusy):
        async with hosts.slot("slow.example:80"):
            pass
    async with hosts.slot("fast.example:80"):  # another host is not affected at all
        pass
    release.set()
    await asyncio.gather(*holders)
    async with hosts.slot("slow.example:80"):  # slots come back
        pass


async def test_breaker_opens_after_consecutive_failures_and_one_probe_closes_it() -> None:
    clock = Clock(1000.0)
    hosts = gate(clock)
    for _ in range(3):
        async with hosts.slot("down.example:80"):
            pass
        hosts.failed("down.example:80")
    assert hosts.is_open("down.example:80")
    with pytest.raises(HostUnavailable):
        async with hosts.slot("down.example:80"):
            pass
    clock.now += 10.0
    # Half-open: the first fetch after the cool-down probes; another one meanwhile is still refused.
    async with hosts.slot("down.example:80"):
        assert hosts.is_open("down.example:80")
        with pytest.raises(HostUnavailable):
            async with hosts.slot("down.example:80"):
                pass
        hosts.succeeded("down.example:80")
    assert not hosts.is_open("down.example:80")
    async with hosts.slot("down.example:80"):
        pass


async def test_a_failed_probe_reopens_for_a_whole_cooldown() -> None:
    clock = Clock(1000.0)
    hosts = gate(clock)
    for _ in range(3):
        async with hosts.slot("down.example:80"):
            hosts.failed("down.example:80")
    clock.now += 10.0
    async with hosts.slot("down.example:80"):
        hosts.failed("down.example:80")
    clock.now += 9.0
    assert hosts.is_open("down.example:80")
    with pytest.raises(HostUnavailable):
        async with hosts.slot("down.example:80"):
            pass


async def test_a_success_resets_the_count() -> None:
    hosts = gate()
    for _ in range(10):
        async with hosts.slot("flaky.example:80"):
            hosts.failed("flaky.example:80")
            hosts.failed("flaky.example:80")
            hosts.succeeded("flaky.example:80")
    assert not hosts.is_open("flaky.example:80")


async def test_idle_hosts_are_forgotten_past_the_bound() -> None:
    hosts = HostGate(
        per_host=1, wait_timeout=1.0, failure_threshold=1, cooldown=1.0, clock=Clock(1000.0), max_hosts=100
    )
    for number in range(5_000):
        async with hosts.slot(f"h{number}.example:80"):
            pass
    assert len(hosts._hosts) <= 101

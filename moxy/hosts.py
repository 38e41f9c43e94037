"""Fair shares of the upstream connection budget, per upstream host: a concurrency bound with a bounded wait, and a
circuit breaker that stops dialling a host that keeps failing.

Without these a few slow hosts hold every pooled connection and a miss to an unrelated, healthy host queues
behind them. The gate is keyed by the authority the destination policy checked (host and port), per hop. It only
decides; the fetcher raises the errors, and the proxy turns them into stale-if-error service or an error answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

__all__ = ["HostBusy", "HostGate", "HostUnavailable"]


class HostBusy(Exception):
    """Every slot of the host stayed taken for the whole wait bound."""


class HostUnavailable(Exception):
    """The host's breaker is open: it failed too often in a row, and its cool-down has not passed."""


@dataclass(slots=True)
class _Host:
    slots: asyncio.Semaphore
    users: int = 0  # fetches holding or waiting for a slot: a host with none may be forgotten
    failures: int = 0  # consecutive transport failures
    open_until: float = 0.0  # the breaker refuses until then
    probing: bool = False  # after the cool-down, one fetch probes the host; the others still wait it out


class HostGate:
    """Per-host concurrency (`per_host` fetches at once, a wait of at most `wait_timeout` s for a slot) and a
    breaker that opens after `failure_threshold` consecutive transport failures for `cooldown` seconds.

    Hosts are remembered while in use or while their breaker has something to say; at most `max_hosts` idle
    ones are kept, so a stream of distinct host names cannot grow this without bound."""

    def __init__(
        self,
        *,
        per_host: int,
        wait_timeout: float,
        failure_threshold: int,
        cooldown: float,
        clock: Callable[[], float],
        max_hosts: int = 10_000,
    ) -> None:
        self.per_host = per_host
        self.wait_timeout = wait_timeout
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.clock = clock
        self.max_hosts = max_hosts
        self._hosts: OrderedDict[str, _Host] = OrderedDict()

    def _host(self, authority: str) -> _Host:
        host = self._hosts.get(authority)
        if host is None:
            host = self._hosts[authority] = _Host(asyncio.Semaphore(self.per_host))
            self._forget_idle()
        else:
            self._hosts.move_to_end(authority)
        return host

    def _forget_idle(self) -> None:
        if len(self._hosts) <= self.max_hosts:
            return
        for authority in list(self._hosts):
            host = self._hosts[authority]
            if host.users == 0 and host.open_until <= self.clock():
                del self._hosts[authority]
                if len(self._hosts) <= self.max_hosts:
                    return

    def is_open(self, authority: str) -> bool:
        """Whether a fetch to `authority` would be refused by the breaker right now."""
        host = self._hosts.get(authority)
        return host is not None and (host.open_until > self.clock() or host.probing)

    @contextlib.asynccontextmanager
    async def slot(self, authority: str) -> AsyncIterator[None]:
        """Hold one of the host's slots for the body of the `async with`. Raises HostUnavailable at once while the
        breaker is open, HostBusy when no slot frees up within the wait bound."""
        host = self._host(authority)
        probe = False
        if host.open_until > self.clock() or host.probing:
            raise HostUnavailable(authority)
        if host.open_until:
            # The cool-down has passed: this fetch is the probe; until it ends the breaker stays half-open.
            probe = host.probing = True
        host.users += 1
        try:
            try:
                async with asyncio.timeout(self.wait_timeout):
                    await host.slots.acquire()
            except TimeoutError:
                raise HostBusy(authority) from None
            try:
                yield
            finally:
                host.slots.release()
        finally:
            host.users -= 1
            if probe:
                host.probing = False

    def succeeded(self, authority: str) -> None:
        host = self._hosts.get(authority)
        if host is not None:
            host.failures = 0
            host.open_until = 0.0

    def failed(self, authority: str) -> None:
        """Count one transport failure (no answer at all: connect, TLS, timeout, reset), not an error status."""
        host = self._hosts.get(authority)
        if host is None:
            return
        host.failures += 1
        if host.failures >= self.failure_threshold:
            host.open_until = self.clock() + self.cooldown

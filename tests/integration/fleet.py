"""Three Moxy hosts sharing one Redis, for the many-hosts tests: started together, each with a cache folder of its
own, plus a stream of requests that records every answer's status and latency by phase."""

from __future__ import annotations

import concurrent.futures
import itertools
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.integration.moxy_server import MoxyServer

__all__ = ["PNG_HEAD", "TOKEN", "Sample", "Stream", "percentile", "purge", "start_fleet", "wait_for"]

TOKEN = "fleet-purge-token-0123456789abcdef"
PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def start_fleet(
    start_moxy: Callable[..., MoxyServer],
    folder: Path,
    redis_url: str,
    *,
    workers: tuple[int, int, int] = (1, 1, 1),
    **settings: Any,
) -> list[MoxyServer]:
    """Hosts a, b and c (with that many workers each), started at once (each start waits for its /healthz)."""
    for name in "abc":
        (folder / name).mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(
                start_moxy, folder / name / "cache", redis_url=redis_url, purge_token=TOKEN, workers=count, **settings
            )
            for name, count in zip("abc", workers, strict=True)
        ]
        return [future.result() for future in futures]


def purge(host: MoxyServer, url: str) -> httpx.Response:
    return httpx.post(host.base_url + "/purge", json={"url": url}, headers={"Authorization": f"Bearer {TOKEN}"})


def wait_for(check: Callable[[], bool], timeout: float, step: float = 0.005) -> float:
    """Seconds until `check()` held; AssertionError past `timeout`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(step)
    return time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


@dataclass(frozen=True, slots=True)
class Sample:
    phase: str
    host: int
    status: int
    seconds: float
    cache: str


class Stream:
    """`clients` threads, each asking the hosts in turn: every other request a URL never asked before (a cold miss:
    a Redis lookup, the lock, a store), the others one warm URL (a hit). The main thread sets `phase`."""

    def __init__(self, hosts: list[MoxyServer], cold_url: Callable[[int], str], warm_url: str, clients: int = 6):
        self.hosts = hosts
        self.cold_url = cold_url
        self.warm_url = warm_url
        self.phase = "up"
        self.samples: list[Sample] = []
        self._numbers = itertools.count()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(clients)]

    def __enter__(self) -> Stream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, client: int) -> None:
        with httpx.Client(timeout=30) as http:
            for turn in itertools.count():
                if self._stop.is_set():
                    return
                index = (client + turn) % len(self.hosts)
                host = self.hosts[index]
                url = self.cold_url(next(self._numbers)) if turn % 2 == 0 else self.warm_url
                started = time.monotonic()
                try:
                    answer = http.get(host.sign(url))
                    status, cache = answer.status_code, answer.headers.get("x-moxy-cache", "")
                except httpx.HTTPError:
                    status, cache = 599, "transport-error"
                # A request still under way when the phase changed met the new one (the outage): counted there.
                sample = Sample(self.phase, index, status, time.monotonic() - started, cache)
                with self._lock:
                    self.samples.append(sample)

    def of(self, phase: str) -> list[Sample]:
        with self._lock:
            return [sample for sample in self.samples if sample.phase == phase]

    def latencies(self, phase: str) -> list[float]:
        return [sample.seconds for sample in self.of(phase)]

"""`python -m bench`: Moxy against nginx on loopback, as ratios measured in one run (method: bench/README.md).

Starts an nginx origin, nginx proxy_cache and nginx pass-through in front of it, and Moxy (one worker; uvicorn, or
granian with BENCH_SERVER), checks that each target answers what it should (the right bytes, a cache HIT where a hit
is measured, a real upstream trip on every miss), warms every target up, then runs wrk on the targets in
alternation for R rounds and reports medians: req/s, p99, server CPU per request and Moxy's peak RSS per worker."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from bench import chart
from bench.burst import burst
from bench.proc import CpuWindow, peak_rss_bytes, workers
from bench.rawhttp import Answer, get
from bench.report import MIB, Goal, Measured, Row, summarise, table, write_json
from bench.servers import (
    LARGE,
    MEMORY_MAX_ENTRY_BYTES,
    NGINX,
    SERVERS,
    SMALL,
    BenchError,
    Moxy,
    Nginx,
    Processes,
    granian_binary,
    start_cache,
    start_moxy,
    start_origin,
    start_passthrough,
)
from bench.wrk import THREADS, WrkResult, run_wrk, wrk_binary

BURST_URLS = 4
# The small-disk Moxy's memory tier: far too small for its 1 KiB entries, so most hits come from the disk tier.
SMALL_DISK_MEMORY_BYTES = 1 * MIB
# The cold-fill Moxy's memory tier: small enough that a run fills it and evicts, so its peak RSS says what a full
# memory tier costs on top of its budget.
COLD_FILL_MEMORY_BYTES = 64 * MIB
# Fresh URLs signed per second of a cold-fill run, at least: above any miss rate seen on these machines. A run that
# outpaces its list is refused (its repeats would be hits), and the next list is sized on the rate seen.
COLD_FILL_MIN_RATE = 4000
PREFILL_CONCURRENCY = 32
PREFILL_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class Knobs:
    duration: int
    rounds: int
    connections: int
    warmup: int
    burst_clients: int
    upstream_requests: int
    small_entries: int
    servers: tuple[str, ...]
    smoke: bool


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw.strip() else default
    except ValueError:
        raise SystemExit(f"bench: {name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise SystemExit(f"bench: {name} must be at least {minimum}")
    return value


def _servers() -> tuple[str, ...]:
    raw = os.environ.get("BENCH_SERVER", "uvicorn").strip() or "uvicorn"
    chosen = SERVERS if raw == "both" else (raw,)
    if any(server not in SERVERS for server in chosen):
        raise SystemExit(f"bench: BENCH_SERVER={raw!r}: one of {', '.join(SERVERS)} or both")
    if "granian" in chosen and granian_binary() is None:
        raise SystemExit("bench: BENCH_SERVER needs granian, which is not installed (.venv/bin/pip install granian)")
    return chosen


def knobs_from(arguments: argparse.Namespace) -> Knobs:
    if arguments.smoke:
        # One short pass over everything, to prove the harness, not to measure.
        return Knobs(1, 1, _env_int("BENCH_CONNECTIONS", 32, THREADS), 1, 50, 200, 2000, _servers(), smoke=True)
    return Knobs(
        duration=_env_int("BENCH_DURATION", 5, 1),
        rounds=_env_int("BENCH_ROUNDS", 1, 1),
        connections=_env_int("BENCH_CONNECTIONS", 32, THREADS),
        warmup=_env_int("BENCH_WARMUP", 3, 0),
        burst_clients=_env_int("BENCH_BURST", 200, 1),
        upstream_requests=_env_int("BENCH_UPSTREAM_REQUESTS", 1000, 0),
        small_entries=_env_int("BENCH_SMALL_ENTRIES", 40_000, 100),
        servers=_servers(),
        smoke=False,
    )


def _path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


class RandomPaths:
    """A fixed list of signed paths for `random_paths.lua`: every request draws one."""

    script = "random_paths.lua"

    def __init__(self, file: Path) -> None:
        self.file = file

    def args(self, seconds: int) -> tuple[str, ...]:
        return (str(self.file),)

    def observe(self, rate: float) -> None:
        pass


class FreshPaths:
    """For `each_path_once.lua`: before each run, a new list of URLs nobody has asked for, longer than the run
    can use up at the rate seen so far."""

    script = "each_path_once.lua"

    def __init__(self, moxy: Moxy, origin: Nginx, folder: Path) -> None:
        self.moxy, self.origin, self.folder = moxy, origin, folder
        self.rate = float(COLD_FILL_MIN_RATE)
        self.lists = 0

    def args(self, seconds: int) -> tuple[str, ...]:
        self.lists += 1
        tag = f"{os.urandom(4).hex()}-{self.lists}"
        count = int(seconds * max(COLD_FILL_MIN_RATE, 3 * self.rate)) + 1000
        file = self.folder / "fresh.txt"  # one at a time: each run replaces the last one's list
        lines = (_path_of(self.moxy.sign(self.origin.url(f"/fill/10k.png?r={tag}&n={n}"))) for n in range(count))
        file.write_text("\n".join(lines) + "\n")
        return (str(file), str(THREADS))

    def observe(self, rate: float) -> None:
        self.rate = rate


PathSource = RandomPaths | FreshPaths


@dataclass(slots=True)
class Target:
    key: str
    label: str
    url: str
    body: bytes
    reference: str  # the key of the nginx proxy_cache target this one is divided by (itself for a reference)
    goal: Goal | None
    check: Callable[[Answer], str | None]  # why the answer is not the state to be measured, or None
    server_pid: int  # the process tree whose CPU is counted
    moxy: Moxy | None = None  # set for a Moxy target: its workers' peak RSS is read
    peer: str = ""  # a second target this one's rate is divided by (e.g. the miss path by nginx pass-through)
    peer_label: str = ""
    trip_log: str | None = None  # an origin log that must grow by at least one line per answer: a miss every time
    # Answers that may share one upstream request: wrk asks one URL on every connection, and when a round opens
    # after Moxy's "uncacheable" mark for that URL has lapsed (5 s), the first concurrent misses coalesce on one
    # fetch, as any cold burst does. At most one such burst per run: connections - 1 answers.
    shared_burst: bool = False
    paths: PathSource | None = None  # where wrk's Lua script takes its paths from; None: every request asks `url`
    prepare: Callable[[], None] | None = None  # before the checks: puts the target in the state to measure
    confirm: Callable[[], None] | None = None  # after the checks: raises BenchError if it is not in that state
    runs: list[WrkResult] = field(default_factory=list)
    failure: str | None = None
    upstream_trips: list[int] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    origin_cpu_us: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)
    disk_entries_added: list[int] = field(default_factory=list)


def _header_is(name: str, expected: str) -> Callable[[Answer], str | None]:
    def check(response: Answer) -> str | None:
        got = response.headers.get(name, "")
        return None if got == expected else f"{name}: {got!r}, wanted {expected!r}"

    return check


def _no_store(response: Answer) -> str | None:
    if "no-store" not in response.headers.get("cache-control", ""):
        return f"cache-control: {response.headers.get('cache-control')!r}, wanted no-store"
    return None


def _moxy_miss(response: Answer) -> str | None:
    # BYPASS: fetched from upstream and, being no-store, not stored.
    if response.headers.get("x-moxy-cache") not in ("MISS", "BYPASS"):
        return f"x-moxy-cache: {response.headers.get('x-moxy-cache')!r}, wanted MISS or BYPASS"
    return _no_store(response)


@dataclass(slots=True)
class Stage:
    """Every server of the run and the files the targets read."""

    origin: Nginx
    cache: Nginx
    passthrough: Nginx
    main: dict[str, Moxy]  # by server name: the Moxy of the three main paths
    small: Moxy  # the small-disk-hit Moxy: a tiny memory tier, a disk tier pre-filled with 1 KiB entries
    fill: Moxy  # the cold-fill Moxy
    fill_fsync: Moxy  # the same, flushing every entry to disk (MOXY_DISK_FSYNC=true)
    bodies: dict[str, bytes]
    folder: Path


def _small_key(number: int) -> str:
    return f"/small/1k.png?k={number}"


def build_targets(stage: Stage, knobs: Knobs) -> list[Target]:
    origin, cache, passthrough = stage.origin, stage.cache, stage.passthrough
    bodies = stage.bodies
    small, large, nostore = "/static/10k.png", "/static/1m.png", "/nostore/10k.png"
    cache_hit = _header_is("x-cache-status", "HIT")
    moxy_hit = _header_is("x-moxy-cache", "HIT")
    first = knobs.servers[0]
    targets = [
        Target(
            "origin_static_10k",
            "nginx static origin (10 KiB)",
            origin.url(small),
            bodies[small],
            "nginx_cache_hit_10k",
            None,
            _header_is("cache-control", "max-age=3600"),
            origin.pid,
        ),
        Target(
            "nginx_cache_hit_10k",
            "nginx proxy_cache hit (10 KiB) [reference]",
            cache.url(small),
            bodies[small],
            "nginx_cache_hit_10k",
            None,
            cache_hit,
            cache.pid,
        ),
        Target(
            "nginx_pass_10k",
            "nginx pass-through (10 KiB, origin no-store)",
            passthrough.url(nostore),
            bodies[nostore],
            "nginx_cache_hit_10k",
            None,
            _no_store,
            passthrough.pid,
            trip_log="nostore.log",
        ),
    ]
    for server, moxy in stage.main.items():
        suffix = "" if server == "uvicorn" else f"_{server}"
        tag = "" if server == "uvicorn" else f" [{server}]"
        targets += [
            Target(
                f"moxy_memory_hit_10k{suffix}",
                f"Moxy memory hit (10 KiB){tag}",
                moxy.sign(origin.url(small)),
                bodies[small],
                "nginx_cache_hit_10k",
                Goal(min_ratio=0.60, max_p99_vs_reference=1.0, max_cpu_vs_reference=2.0, rss_within_budget=True),
                moxy_hit,
                moxy.pid,
                moxy,
            ),
            Target(
                f"moxy_miss_10k{suffix}",
                f"Moxy miss path (10 KiB, origin no-store){tag}",
                moxy.sign(origin.url(nostore)),
                bodies[nostore],
                "nginx_cache_hit_10k",
                Goal(min_ratio=0.20, max_p99_ms=25.0, min_peer_ratio=0.5, max_cpu_us=120.0, rss_within_budget=True),
                _moxy_miss,
                moxy.pid,
                moxy,
                peer="nginx_pass_10k",
                peer_label="nginx pass",
                trip_log="nostore.log",
                shared_burst=True,
            ),
        ]
    targets.append(
        Target(
            "nginx_cache_hit_1m",
            "nginx proxy_cache hit (1 MiB) [reference]",
            cache.url(large),
            bodies[large],
            "nginx_cache_hit_1m",
            None,
            cache_hit,
            cache.pid,
        )
    )
    for server, moxy in stage.main.items():
        suffix = "" if server == "uvicorn" else f"_{server}"
        tag = "" if server == "uvicorn" else f" [{server}]"
        targets.append(
            Target(
                f"moxy_disk_hit_1m{suffix}",
                f"Moxy disk hit (1 MiB){tag}",
                moxy.sign(origin.url(large)),
                bodies[large],
                "nginx_cache_hit_1m",
                Goal(min_ratio=0.90, rss_within_budget=True),
                moxy_hit,
                moxy.pid,
                moxy,
                confirm=_in_disk_tier(moxy),
            )
        )
    first_suffix = "" if first == "uvicorn" else f"_{first}"
    small_list = stage.folder / "small-paths.txt"
    fill_folder = stage.folder / "fill-lists"
    fill_folder.mkdir(exist_ok=True)
    targets += [
        Target(
            "moxy_small_disk_hit_1k",
            f"Moxy small disk hits (1 KiB, random of {knobs.small_entries:,})",
            stage.small.sign(origin.url(_small_key(0))),
            bodies["/small/1k.png"],
            "nginx_cache_hit_10k",
            Goal(min_peer_ratio=0.5, rss_within_budget=True),
            moxy_hit,
            stage.small.pid,
            stage.small,
            peer=f"moxy_memory_hit_10k{first_suffix}",
            peer_label="memory hit",
            paths=RandomPaths(small_list),
            prepare=lambda: prefill(stage.small, origin, knobs.small_entries, small_list, bodies["/small/1k.png"]),
        ),
        Target(
            "moxy_cold_fill_10k",
            "Moxy cold fill (10 KiB, each URL new, stored)",
            stage.fill.sign(origin.url("/fill/10k.png?r=check")),
            bodies["/fill/10k.png"],
            "nginx_cache_hit_10k",
            Goal(min_peer_ratio=1.0, rss_within_budget=True),
            moxy_hit,  # asked until it is a HIT: the first answer fetched it, the next one proves it was stored
            stage.fill.pid,
            stage.fill,
            peer=f"moxy_miss_10k{first_suffix}",
            peer_label="miss path",
            trip_log="fill.log",
            paths=FreshPaths(stage.fill, origin, fill_folder),
            confirm=_stored_on_disk(stage.fill),
        ),
        Target(
            "moxy_cold_fill_10k_fsync",
            "Moxy cold fill, every entry flushed (MOXY_DISK_FSYNC=true)",
            stage.fill_fsync.sign(origin.url("/fill/10k.png?r=check-fsync")),
            bodies["/fill/10k.png"],
            "nginx_cache_hit_10k",
            Goal(rss_within_budget=True),  # the price of durability across power cuts, shown beside the default
            moxy_hit,
            stage.fill_fsync.pid,
            stage.fill_fsync,
            peer="moxy_cold_fill_10k",
            peer_label="cold fill without flushing",
            trip_log="fill.log",
            paths=FreshPaths(stage.fill_fsync, origin, fill_folder),
            confirm=_stored_on_disk(stage.fill_fsync),
        ),
    ]
    return targets


def _in_disk_tier(moxy: Moxy) -> Callable[[], None]:
    def check() -> None:
        if LARGE not in moxy.disk_bodies():
            raise BenchError("the 1 MiB body is not in Moxy's disk tier")

    return check


def _stored_on_disk(moxy: Moxy) -> Callable[[], None]:
    def check() -> None:
        if _wait_for(lambda: moxy.disk_entries() >= 1) is False:
            raise BenchError("a cacheable answer was not written to Moxy's disk tier")

    return check


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


async def _prefill(urls: list[str], body: bytes) -> None:
    import aiohttp

    # What wrk sends and nothing else: Moxy keys its cache on the forwarded Accept, so aiohttp's default
    # `Accept: */*` would fill other entries than the ones wrk will ask for.
    skip = ("Accept", "Accept-Encoding", "User-Agent")
    connector = aiohttp.TCPConnector(limit=PREFILL_CONCURRENCY)
    remaining = iter(urls)
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=skip, trust_env=False) as session:

        async def one_client() -> None:
            for url in remaining:  # the clients share one iterator: every URL is asked once
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
                    got = await response.read()
                    if response.status != 200 or got != body:
                        raise BenchError(f"pre-fill: {url} answered {response.status}, {len(got)} bytes")

        await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(PREFILL_CONCURRENCY))), PREFILL_TIMEOUT_S)


def prefill(moxy: Moxy, origin: Nginx, entries: int, path_list: Path, body: bytes) -> None:
    """Put `entries` 1 KiB entries in Moxy's disk tier, each asked once, and write their paths for wrk."""
    urls = [moxy.sign(origin.url(_small_key(number))) for number in range(entries)]
    path_list.write_text("\n".join(_path_of(url) for url in urls) + "\n")
    print(f"pre-fill: {entries:,} entries of 1 KiB into the small-disk Moxy", flush=True)
    started = time.monotonic()
    try:
        asyncio.run(_prefill(urls, body))
    except (OSError, TimeoutError) as exc:
        raise BenchError(f"pre-fill failed: {exc!r}") from exc
    # Writes to the disk tier may finish just after their answers.
    if not _wait_for(lambda: moxy.disk_entries() >= entries):
        raise BenchError(f"pre-fill: {moxy.disk_entries()} entries in the disk tier, wanted {entries}")
    print(f"pre-fill: done in {time.monotonic() - started:.0f} s", flush=True)


def prime(target: Target) -> None:
    """Ask until the target is in the state to be measured (a hit is cached, a miss stays a miss); bounded."""
    deadline = time.monotonic() + 10
    problem = "no answer"
    while time.monotonic() < deadline:
        answer = get(target.url)
        if answer.status != 200:
            raise BenchError(f"answered {answer.summary()}")
        if answer.body != target.body:
            raise BenchError(f"answered {len(answer.body)} bytes that are not the origin's file")
        problem = target.check(answer) or ""
        if not problem:
            return
        time.sleep(0.05)
    raise BenchError(f"never reached the state to measure: {problem}")


def _answer_now(url: str) -> str:
    """What a target answers right after a run went wrong: wrk counts errors but does not say which."""
    try:
        answer = get(url)
    except (BenchError, OSError) as exc:
        return repr(exc)
    return f"{answer.summary()[:120]} (x-moxy-cache: {answer.headers.get('x-moxy-cache', '-')})"


def measure(target: Target, knobs: Knobs, seconds: int, origin: Nginx, *, warmup: bool = False) -> WrkResult:
    script_args = target.paths.args(seconds) if target.paths is not None else ()
    trips_before = origin.logged_count(target.trip_log) if target.trip_log else 0
    filling = target.key.startswith("moxy_cold_fill")
    entries_before = target.moxy.disk_entries() if filling and target.moxy else 0
    server_cpu, origin_cpu = CpuWindow.open(target.server_pid), CpuWindow.open(origin.pid)
    try:
        result = run_wrk(
            target.url,
            seconds=seconds,
            connections=knobs.connections,
            min_body=len(target.body),
            script=None if target.paths is None else target.paths.script,
            script_args=script_args,
        )
    except BenchError as exc:
        raise BenchError(f"{exc}; asked once more, it answers {_answer_now(target.url)}") from exc
    spent, origin_spent = server_cpu.seconds(), origin_cpu.seconds()
    if target.paths is not None:
        target.paths.observe(result.req_per_s)
    if target.trip_log:
        trips = origin.logged_count(target.trip_log) - trips_before
        # Requests still in flight when wrk stops reached the origin but are not in wrk's count, hence >=.
        shared = knobs.connections - 1 if target.shared_burst else 0
        if trips < result.requests - shared:
            raise BenchError(
                f"{result.requests} answers but only {trips} upstream requests: some were served from a cache"
            )
        if not warmup:
            target.upstream_trips.append(trips)
    if warmup:
        return result
    target.cpu_us.append(spent / result.requests * 1e6)
    target.origin_cpu_us.append(origin_spent / result.requests * 1e6)
    if target.moxy is not None:
        peaks = [peak for pid in workers(target.moxy.pid) if (peak := peak_rss_bytes(pid)) is not None]
        if peaks:
            target.peak_rss.append(max(peaks))
        if filling:
            added = target.moxy.disk_entries() - entries_before
            target.disk_entries_added.append(added)
            # Half leaves room for writes still under way; fewer means the run did not measure storing on disk.
            if added < result.requests // 2:
                raise BenchError(f"{result.requests} answers but only {added} new entries in the disk tier")
    return result


def run_targets(targets: list[Target], knobs: Knobs, origin: Nginx) -> None:
    for target in targets:
        try:
            if target.prepare is not None:
                target.prepare()
            prime(target)
            if target.confirm is not None:
                target.confirm()
        except (BenchError, OSError) as exc:
            target.failure = f"check: {exc}"
    live = [target for target in targets if target.failure is None]
    if knobs.warmup:
        print(f"warm-up: {knobs.warmup} s per target", flush=True)
        for target in live:
            try:
                measure(target, knobs, knobs.warmup, origin, warmup=True)
            except BenchError as exc:
                target.failure = f"warm-up: {exc}"
    for round_number in range(1, knobs.rounds + 1):
        print(f"round {round_number}/{knobs.rounds}: {knobs.duration} s per target", flush=True)
        for target in targets:
            if target.failure is not None:
                continue
            try:
                target.runs.append(measure(target, knobs, knobs.duration, origin))
            except BenchError as exc:
                target.failure = f"round {round_number}: {exc}"


def _measured(target: Target, rate: float, p99: float, ratio: float, peer_rate: float | None) -> Measured:
    return Measured(
        ratio=ratio,
        p99_ms=p99,
        cpu_us=statistics.median(target.cpu_us) if target.cpu_us else None,
        peer_ratio=None if not peer_rate else rate / peer_rate,
        peak_rss_bytes=max(target.peak_rss) if target.peak_rss else None,
        memory_budget_bytes=None if target.moxy is None else target.moxy.memory_cache_bytes,
    )


def _usable(target: Target | None) -> bool:
    return target is not None and target.failure is None and bool(target.runs)


def rows_for(targets: list[Target]) -> list[Row]:
    by_key = {target.key: target for target in targets}
    rows = []
    for target in targets:
        reference = by_key[target.reference]
        peer = by_key.get(target.peer)
        reference_figures: Measured | None = None
        if _usable(reference):
            reference_rate, reference_p99 = summarise(reference.runs)
            reference_figures = _measured(reference, reference_rate, reference_p99, 1.0, None)
        row = Row(target.key, target.label, target.reference, "reference" if reference is target else "")
        row.peer, row.peer_label = target.peer, target.peer_label
        if target.goal is not None:
            row.goal = target.goal.describe(reference_figures, target.peer_label)
        row.rounds = [
            {"req_per_s": run.req_per_s, "p99_ms": run.p99_ms, "requests": run.requests} for run in target.runs
        ]
        row.extra["cpu_us_per_round"] = [round(value, 1) for value in target.cpu_us]
        row.extra["origin_cpu_us_per_round"] = [round(value, 1) for value in target.origin_cpu_us]
        if target.upstream_trips:
            row.extra["upstream_requests_per_round"] = target.upstream_trips
        if target.disk_entries_added:
            row.extra["disk_entries_added_per_round"] = target.disk_entries_added
        if target.moxy is not None:
            row.extra["server"] = target.moxy.server
            row.memory_budget_mib = target.moxy.memory_cache_bytes / MIB
        if target.peak_rss:
            row.peak_rss_mib = max(target.peak_rss) / MIB
        rows.append(row)
        if target.failure is not None:
            row.result, row.note = "FAILED", target.failure
            continue
        row.req_per_s, row.p99_ms = summarise(target.runs)
        row.cpu_us = statistics.median(target.cpu_us) if target.cpu_us else None
        peer_rate = summarise(peer.runs)[0] if peer is not None and _usable(peer) else None
        if peer_rate:
            row.peer_ratio = row.req_per_s / peer_rate
        if reference_figures is None:
            row.note = "no reference figure"
            continue
        row.ratio = row.req_per_s / summarise(reference.runs)[0]
        if target.goal is not None:
            missed = target.goal.misses(
                _measured(target, row.req_per_s, row.p99_ms, row.ratio, peer_rate), reference_figures
            )
            row.result = "MISS: " + ", ".join(missed) if missed else "PASS"
    return rows


def cold_burst(origin: Nginx, moxy: Moxy, body: bytes, clients: int) -> Row:
    row = Row(
        "moxy_cold_burst", f"Moxy cold burst ({clients} clients x {BURST_URLS} fresh URLs)", "", "1 upstream req/URL"
    )
    tag = os.urandom(4).hex()
    counts = []
    try:
        for number in range(BURST_URLS):
            path = f"/burst/10k.png?run={tag}&n={number}"
            answers = burst(moxy.sign(origin.url(path)), clients)
            wrong = [answer.status for answer in answers if answer.status != 200 or answer.body != body]
            if wrong:
                raise BenchError(f"{len(wrong)} of {clients} answers were wrong (statuses {sorted(set(wrong))})")
            counts.append(origin.logged_uris("burst.log").count(path))
    except BenchError as exc:
        row.result, row.note = "FAILED", str(exc)
        return row
    row.extra["upstream_requests_per_url"] = counts
    row.result = "PASS" if all(count == 1 for count in counts) else "MISS"
    row.note = "upstream per URL: " + ",".join(map(str, counts))
    return row


def self_check(moxy: Moxy, knobs: Knobs) -> str | None:
    """The harness must refuse a target that answers errors; None when it does."""
    unsigned = moxy.base_url + "/not-a-signed-url"
    try:
        run_wrk(unsigned, seconds=1, connections=knobs.connections, min_body=SMALL)
    except BenchError as exc:
        print(f"self-check: a target answering errors is refused ({exc})")
        return None
    return "self-check: wrk on an unsigned Moxy URL (403s) was accepted as a measurement"


def upstream_client_section(requests: int) -> dict[str, Any]:
    import uvloop

    from bench import upstream_client

    print(f"\nupstream client alone ({requests} requests per cell, 1 round):", flush=True)
    results = uvloop.run(upstream_client.measure(requests, 1))
    print(upstream_client.render(results, 1))
    return {
        name: {f"c={c}": round(rate) for c, rate in by_concurrency.items()} for name, by_concurrency in results.items()
    }


def _version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "unknown"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops every child


def start_stage(processes: Processes, root: Path, knobs: Knobs) -> Stage:
    origin, bodies = start_origin(processes, root / "origin")
    cache = start_cache(processes, root / "nginx-cache", origin)
    passthrough = start_passthrough(processes, root / "nginx-pass", origin)
    main = {server: start_moxy(processes, root / f"moxy-{server}", server=server) for server in knobs.servers}
    small = start_moxy(processes, root / "moxy-small", memory_cache_bytes=SMALL_DISK_MEMORY_BYTES)
    fill = start_moxy(processes, root / "moxy-fill", memory_cache_bytes=COLD_FILL_MEMORY_BYTES)
    fill_fsync = start_moxy(
        processes, root / "moxy-fill-fsync", memory_cache_bytes=COLD_FILL_MEMORY_BYTES, disk_fsync=True
    )
    return Stage(origin, cache, passthrough, main, small, fill, fill_fsync, bodies, root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="1 s runs, 1 round: prove the harness works")
    knobs = knobs_from(parser.parse_args(argv))
    if not Path(NGINX).exists():
        print(f"bench: {NGINX} is missing (make system-deps installs it)", file=sys.stderr)
        return 1
    try:
        wrk_binary()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    # Even when started in the background (where the shell ignores SIGINT), a SIGINT stops the run cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = datetime.now(UTC)
    processes = Processes()
    failures: list[str] = []
    rows: list[Row] = []
    upstream: dict[str, Any] | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="moxy-bench-") as folder:
            root = Path(folder)
            root.chmod(0o755)  # nginx's unprivileged workers (when run as root) must reach the files below
            try:
                stage = start_stage(processes, root, knobs)
                moxies = "  ".join(f"moxy/{server} {moxy.base_url}" for server, moxy in stage.main.items())
                print(
                    f"origin {stage.origin.url('/')}  proxy_cache {stage.cache.url('/')}  "
                    f"pass-through {stage.passthrough.url('/')}  {moxies}\n"
                    f"wrk -t{THREADS} -c{knobs.connections} -d{knobs.duration}s --latency, "
                    f"{knobs.rounds} round(s), warm-up {knobs.warmup} s",
                    flush=True,
                )
                targets = build_targets(stage, knobs)
                run_targets(targets, knobs, stage.origin)
                rows = rows_for(targets)
                first = stage.main[knobs.servers[0]]
                print(f"cold burst: {knobs.burst_clients} simultaneous first requests per URL", flush=True)
                rows.append(cold_burst(stage.origin, first, stage.bodies["/burst/10k.png"], knobs.burst_clients))
                if knobs.smoke and (problem := self_check(first, knobs)) is not None:
                    failures.append(problem)
            finally:
                processes.stop_all()
            if knobs.upstream_requests:
                upstream = upstream_client_section(knobs.upstream_requests)
    except KeyboardInterrupt:
        print("bench: interrupted; every server it started is stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    failures += [f"{row.label}: {row.note}" for row in rows if row.result == "FAILED"]
    print()
    print(table(rows))
    document = {
        "started": started.isoformat(timespec="seconds"),
        "smoke": knobs.smoke,
        "method": {
            "wrk": f"-t{THREADS} -c{knobs.connections} -d{knobs.duration}s --latency",
            "rounds": knobs.rounds,
            "warmup_s": knobs.warmup,
            "aggregate": "median per target; ratio = median req/s / median req/s of the reference",
            "cpu": "utime+stime of the server's process tree from /proc, per request wrk counted",
            "burst_clients": knobs.burst_clients,
            "small_entries": knobs.small_entries,
            "moxy": (
                f"1 worker under {', '.join(knobs.servers)}, MOXY_MEMORY_MAX_ENTRY_BYTES={MEMORY_MAX_ENTRY_BYTES}; "
                f"small-disk Moxy MOXY_MEMORY_CACHE_BYTES={SMALL_DISK_MEMORY_BYTES}, "
                f"cold-fill Moxy MOXY_MEMORY_CACHE_BYTES={COLD_FILL_MEMORY_BYTES}"
            ),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg()[0],
            "python": platform.python_version(),
            "nginx": _version([NGINX, "-v"]),
            "wrk": _version(["wrk", "-v"]),
        },
        "upstream_client": upstream,
        "failures": failures,
    }
    path = write_json(document, rows)
    print(f"\nwritten: {path}")
    print(f"chart: {chart.draw(path)}")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0

"""`python -m bench`: Moxy against nginx proxy_cache on loopback, as ratios measured in one run (PERF.md method).

Starts an nginx origin, an nginx proxy_cache in front of it and Moxy (uvicorn, one worker), checks that each target
answers what it should (the right bytes, a cache HIT where a hit is measured, a real upstream trip on the miss path),
warms every target up, then runs wrk on the targets in alternation for R rounds and reports medians."""

from __future__ import annotations

import argparse
import os
import platform
import signal
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

from bench.burst import burst
from bench.rawhttp import Answer, get
from bench.report import Goal, Row, summarise, table, write_json
from bench.servers import (
    LARGE,
    MEMORY_MAX_ENTRY_BYTES,
    NGINX,
    SMALL,
    BenchError,
    Moxy,
    Nginx,
    Processes,
    start_cache,
    start_moxy,
    start_origin,
)
from bench.wrk import THREADS, WrkResult, run_wrk, wrk_binary

BURST_URLS = 4


@dataclass(frozen=True, slots=True)
class Knobs:
    duration: int
    rounds: int
    connections: int
    warmup: int
    burst_clients: int
    upstream_requests: int
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


def knobs_from(arguments: argparse.Namespace) -> Knobs:
    if arguments.smoke:
        # One short pass over everything, to prove the harness, not to measure.
        return Knobs(1, 1, _env_int("BENCH_CONNECTIONS", 32, THREADS), 1, 50, 200, smoke=True)
    return Knobs(
        duration=_env_int("BENCH_DURATION", 5, 1),
        rounds=_env_int("BENCH_ROUNDS", 1, 1),
        connections=_env_int("BENCH_CONNECTIONS", 32, THREADS),
        warmup=_env_int("BENCH_WARMUP", 3, 0),
        burst_clients=_env_int("BENCH_BURST", 200, 1),
        upstream_requests=_env_int("BENCH_UPSTREAM_REQUESTS", 1000, 0),
        smoke=False,
    )


@dataclass(slots=True)
class Target:
    key: str
    label: str
    url: str
    body: bytes
    reference: str  # the key of the nginx proxy_cache target this one is divided by (itself for a reference)
    goal: Goal | None
    check: Callable[[Answer], str | None]  # why the answer is not the state to be measured, or None
    runs: list[WrkResult] = field(default_factory=list)
    failure: str | None = None
    upstream_trips: list[int] = field(default_factory=list)


def _header_is(name: str, expected: str) -> Callable[[Answer], str | None]:
    def check(response: Answer) -> str | None:
        got = response.headers.get(name, "")
        return None if got == expected else f"{name}: {got!r}, wanted {expected!r}"

    return check


def _moxy_miss(response: Answer) -> str | None:
    # BYPASS: fetched from upstream and, being no-store, not stored.
    if response.headers.get("x-moxy-cache") not in ("MISS", "BYPASS"):
        return f"x-moxy-cache: {response.headers.get('x-moxy-cache')!r}, wanted MISS or BYPASS"
    if "no-store" not in response.headers.get("cache-control", ""):
        return f"cache-control: {response.headers.get('cache-control')!r}, wanted no-store"
    return None


def build_targets(origin: Nginx, cache: Nginx, moxy: Moxy, bodies: dict[str, bytes]) -> list[Target]:
    small, large, nostore = "/static/10k.png", "/static/1m.png", "/nostore/10k.png"
    cache_hit = _header_is("x-cache-status", "HIT")
    moxy_hit = _header_is("x-moxy-cache", "HIT")
    return [
        Target(
            "origin_static_10k",
            "nginx static origin (10 KiB)",
            origin.url(small),
            bodies[small],
            "nginx_cache_hit_10k",
            None,
            _header_is("cache-control", "max-age=3600"),
        ),
        Target(
            "nginx_cache_hit_10k",
            "nginx proxy_cache hit (10 KiB) [reference]",
            cache.url(small),
            bodies[small],
            "nginx_cache_hit_10k",
            None,
            cache_hit,
        ),
        Target(
            "moxy_memory_hit_10k",
            "Moxy memory hit (10 KiB)",
            moxy.sign(origin.url(small)),
            bodies[small],
            "nginx_cache_hit_10k",
            Goal(min_ratio=0.50, max_p99_vs_reference=2.0),
            moxy_hit,
        ),
        Target(
            "moxy_miss_10k",
            "Moxy miss path (10 KiB, origin no-store)",
            moxy.sign(origin.url(nostore)),
            bodies[nostore],
            "nginx_cache_hit_10k",
            Goal(min_ratio=0.17, max_p99_ms=25.0),
            _moxy_miss,
        ),
        Target(
            "nginx_cache_hit_1m",
            "nginx proxy_cache hit (1 MiB) [reference]",
            cache.url(large),
            bodies[large],
            "nginx_cache_hit_1m",
            None,
            cache_hit,
        ),
        Target(
            "moxy_disk_hit_1m",
            "Moxy disk hit (1 MiB)",
            moxy.sign(origin.url(large)),
            bodies[large],
            "nginx_cache_hit_1m",
            Goal(min_ratio=0.90),
            moxy_hit,
        ),
    ]


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


def measure(target: Target, knobs: Knobs, seconds: int, origin: Nginx, *, warmup: bool = False) -> WrkResult:
    before = len(origin.logged_uris("nostore.log"))
    result = run_wrk(target.url, seconds=seconds, connections=knobs.connections, min_body=len(target.body))
    if target.key == "moxy_miss_10k":
        trips = len(origin.logged_uris("nostore.log")) - before
        # Requests still in flight when wrk stops reached the origin but are not in wrk's count, hence >=.
        if trips < result.requests:
            raise BenchError(f"{result.requests} answers but only {trips} upstream requests: not a miss path")
        if not warmup:
            target.upstream_trips.append(trips)
    return result


def run_targets(targets: list[Target], knobs: Knobs, origin: Nginx, moxy: Moxy) -> None:
    for target in targets:
        try:
            prime(target)
            if target.key == "moxy_disk_hit_1m" and LARGE not in moxy.disk_bodies():
                raise BenchError("the 1 MiB body is not in Moxy's disk tier")
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


def rows_for(targets: list[Target]) -> list[Row]:
    by_key = {target.key: target for target in targets}
    rows = []
    for target in targets:
        reference = by_key[target.reference]
        usable = reference.failure is None and bool(reference.runs)
        reference_rate, reference_p99 = summarise(reference.runs) if usable else (0.0, 0.0)
        row = Row(target.key, target.label, target.reference, "reference" if reference is target else "")
        if target.goal is not None:
            row.goal = target.goal.describe(reference_p99 if usable else None)
        row.rounds = [
            {"req_per_s": run.req_per_s, "p99_ms": run.p99_ms, "requests": run.requests} for run in target.runs
        ]
        if target.upstream_trips:
            row.extra["upstream_requests_per_round"] = target.upstream_trips
        rows.append(row)
        if target.failure is not None:
            row.result, row.note = "FAILED", target.failure
            continue
        row.req_per_s, row.p99_ms = summarise(target.runs)
        if not usable:
            row.note = "no reference figure"
            continue
        row.ratio = row.req_per_s / reference_rate
        if target.goal is not None:
            row.result = "PASS" if target.goal.met(row.ratio, row.p99_ms, reference_p99) else "MISS"
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
                origin, bodies = start_origin(processes, root / "origin")
                cache = start_cache(processes, root / "nginx-cache", origin)
                moxy = start_moxy(processes, root / "moxy")
                print(
                    f"origin {origin.url('/')}  nginx proxy_cache {cache.url('/')}  moxy {moxy.base_url}\n"
                    f"wrk -t{THREADS} -c{knobs.connections} -d{knobs.duration}s --latency, "
                    f"{knobs.rounds} round(s), warm-up {knobs.warmup} s",
                    flush=True,
                )
                targets = build_targets(origin, cache, moxy, bodies)
                run_targets(targets, knobs, origin, moxy)
                rows = rows_for(targets)
                print(f"cold burst: {knobs.burst_clients} simultaneous first requests per URL", flush=True)
                rows.append(cold_burst(origin, moxy, bodies["/burst/10k.png"], knobs.burst_clients))
                if knobs.smoke and (problem := self_check(moxy, knobs)) is not None:
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
            "burst_clients": knobs.burst_clients,
            "moxy": f"moxy serve (uvicorn), 1 worker, MOXY_MEMORY_MAX_ENTRY_BYTES={MEMORY_MAX_ENTRY_BYTES}",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "nginx": _version([NGINX, "-v"]),
            "wrk": _version(["wrk", "-v"]),
        },
        "upstream_client": upstream,
        "failures": failures,
    }
    path = write_json(document, rows)
    print(f"\nwritten: {path}")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0

"""`python -m bench.soak`: minutes of mixed traffic against `moxy serve --workers 2` on loopback, watching whether
each worker's memory and file descriptors stay flat, and whether any answer is a Moxy bug (a 500, a wrong body).

Origins: nginx serves the static bodies (cached, no-store, HTML labelled image/png, large, churn); a small aiohttp
server (this module run with `--origin-port`) serves the dynamic ones on 127.0.0.1-3: URLs that flip between a good
answer, a 500 and a WordPress-style 200 JSON error, bodies that drip slowly, and bodies that stall past Moxy's read
timeout. Everything listens on loopback addresses only and every loop is bounded by time."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import yarl
from prometheus_client.parser import text_string_to_metric_families

from bench.servers import (
    NGINX,
    PNG_SIGNATURE,
    BenchError,
    Nginx,
    Processes,
    _start_nginx,
    _tail,
    _wait_for_port,
    free_port,
)
from bench.wrk import run_wrk, wrk_binary
from moxy.signing import Signer

MIB = 1024 * 1024
RESULTS = Path(__file__).parent / "results"
WORKERS = 2
# Small enough that the churn scenario fills it within the warm-up, so the plateau is visible in the figures.
MEMORY_CACHE_BYTES = 64 * MIB
DISK_CACHE_BYTES = 512 * MIB  # churn writes several MiB/s: disk eviction stays in play, the temp folder small
READ_TIMEOUT = 2.0  # Moxy's upstream read timeout; the stall scenario pauses longer than this
STALL_SECONDS = 4.0
DRIP_CHUNKS, DRIP_GAP = 12, 0.15  # about 1.8 s per dripping body, each gap well inside READ_TIMEOUT
FLIP_PHASE_SECONDS = 6.0  # the flip cycle: good, good, 500, WordPress 200 error; each phase this long
FLIP_CACHE_CONTROL = "max-age=2, stale-while-revalidate=2, stale-if-error=3600"
WP_ERROR = b'{"code":"rest_error","message":"x","data":{"status":500}}'
SLOW_HOSTS = ("127.0.0.2", "127.0.0.3")
ORIGIN_HOSTS = (*SLOW_HOSTS, "127.0.0.1")  # 127.0.0.1 last: once it listens, every site does
CLIENT_TIMEOUT = 60.0
SETTLE_SECONDS = 30.0  # Moxy's upstream pool closes idle connections after 15 s (aiohttp's default keep-alive)
# The verdict's bounds, stated once.
RSS_GROWTH_FRACTION = 0.10  # growth after the warm-up, as a fraction of the worker's RSS at the end of the warm-up
RSS_GROWTH_FLOOR = 8 * MIB  # below this a growth is allocator noise, whatever the fraction says
FD_SLACK = 4  # idle descriptors at the end may exceed the idle start by this many (lazily opened files)

# Scenario -> its share of the fast client loops (the slow ones run drip and stall on their own slots).
FAST_WEIGHTS = {
    "hit": 30,
    "junk": 10,
    "miss": 12,
    "churn": 8,
    "flip": 16,
    "reject": 4,
    "forged": 4,
    "unsigned": 2,
    "large": 2,
}
SLOW_WEIGHTS = {"drip": 85, "stall": 15}
# The statuses each scenario may answer. A 5xx listed here is one the scenario causes on purpose.
EXPECTED: dict[str, frozenset[int]] = {
    "hit": frozenset({200}),
    "junk": frozenset({200}),
    "miss": frozenset({200}),
    "churn": frozenset({200}),
    "large": frozenset({200}),
    # 502 only while no good copy exists yet (first fetch during a bad phase, then the negative cache).
    "flip": frozenset({200, 502}),
    "reject": frozenset({502}),  # HTML labelled image/png: rejected by the sniffer, never stored
    "forged": frozenset({403}),
    "unsigned": frozenset({400}),  # no digest at all: a malformed path, not a bad signature
    "drip": frozenset({200}),
    "stall": frozenset({502, 504}),
}
# Scenarios that reach an upstream: a host-busy 503 on one of them is load shedding the soak provokes.
UPSTREAM_SCENARIOS = frozenset({"hit", "junk", "miss", "churn", "large", "flip", "reject", "drip", "stall"})


def body_of(seed: str, size: int) -> bytes:
    """A PNG-looking body both origin and client derive from its name, so the client can check every byte."""
    return PNG_SIGNATURE + random.Random(seed).randbytes(size - len(PNG_SIGNATURE))


def flip_body(name: str) -> bytes:
    if name.endswith(".json"):
        return json.dumps({"name": name, "items": list(range(64))}, sort_keys=True).encode()
    return body_of("flip/" + name, 24 * 1024)


def flip_state(index: int, now: float) -> str:
    """Which answer a flip URL gives at `now`; the URLs are out of step so some are always failing."""
    return ("good", "good", "500", "wp-error")[(int(now / FLIP_PHASE_SECONDS) + index) % 4]


# -- the dynamic origin (a child process) ---------------------------------------------------------------------------


async def _serve_origin(port: int) -> None:
    from aiohttp import web

    async def flip(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        state = flip_state(int(name.split(".")[0]), time.time())
        if state == "500":
            return web.Response(status=500, text="<html>Internal Server Error</html>", content_type="text/html")
        # A WordPress REST error: status 200, cacheable headers, an error envelope Moxy must refuse to store.
        headers = {"Cache-Control": FLIP_CACHE_CONTROL}
        if state == "wp-error":
            return web.Response(body=WP_ERROR, content_type="application/json", headers=headers)
        headers["ETag"] = f'"{name}-v1"'
        if request.headers.get("If-None-Match") == headers["ETag"]:
            return web.Response(status=304, headers=headers)
        kind = "application/json" if name.endswith(".json") else "image/png"
        return web.Response(body=flip_body(name), content_type=kind, headers=headers)

    async def slow(request: web.Request, body: bytes, pauses: list[float]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Cache-Control": "no-store", "Content-Type": "image/png"})
        response.content_length = len(body)
        step = -(-len(body) // len(pauses))
        try:
            await response.prepare(request)
            for number, pause in enumerate(pauses):
                await response.write(body[number * step : (number + 1) * step])
                await asyncio.sleep(pause)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # Moxy gave up on us (the stall's whole point); nothing left to send to
        return response

    async def drip(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        return await slow(request, body_of("drip/" + name, 96 * 1024), [DRIP_GAP] * DRIP_CHUNKS)

    async def stall(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        return await slow(request, body_of("stall/" + name, 64 * 1024), [STALL_SECONDS, 0.0])

    app = web.Application()
    app.router.add_get("/flip/{name}", flip)
    app.router.add_get("/drip/{name}", drip)
    app.router.add_get("/stall/{name}", stall)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for host in ORIGIN_HOSTS:
        await web.TCPSite(runner, host, port, backlog=1024).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


# -- servers ---------------------------------------------------------------------------------------------------------

STATIC_HTTP = """
    server {{
        listen 127.0.0.1:{port} backlog={backlog};
        root {prefix}/www;
        location /nostore/ {{ add_header Cache-Control "no-store"; }}
        location / {{ add_header Cache-Control "max-age=3600"; }}
    }}
"""
HTML_ERROR_PAGE = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>oops</body></html>\n"


def static_bodies() -> dict[str, bytes]:
    rng = random.Random("soak-sizes")
    bodies = {f"/hit/{n}.png": body_of(f"hit/{n}", rng.randrange(4, 96) * 1024) for n in range(40)}
    bodies |= {f"/nostore/{n}.png": body_of(f"nostore/{n}", 16 * 1024) for n in range(8)}
    bodies |= {f"/html/{n}.png": HTML_ERROR_PAGE for n in range(4)}
    bodies |= {f"/churn/{n}.png": body_of(f"churn/{n}", 128 * 1024) for n in range(16)}
    # Above MOXY_MEMORY_MAX_ENTRY_BYTES (2 MiB): the cached ones are disk hits, the no-store one is spooled each time.
    bodies |= {"/large/3m.png": body_of("large/3m", 3 * MIB), "/large/6m.png": body_of("large/6m", 6 * MIB)}
    bodies["/nostore/large.png"] = body_of("nostore/large", 4 * MIB)
    return bodies


def start_static(processes: Processes, prefix: Path, bodies: dict[str, bytes]) -> Nginx:
    www = prefix / "www"
    for path, body in bodies.items():
        target = www / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        target.chmod(0o644)  # run as root, nginx's workers drop to an unprivileged user
    for folder in [www, *www.iterdir()]:
        folder.chmod(0o755)
    return _start_nginx(processes, prefix, STATIC_HTTP, "nginx static origin")


def start_dynamic(processes: Processes, folder: Path) -> int:
    port = free_port()
    log = folder / "origin.log"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [sys.executable, "-m", "bench.soak", "--origin-port", str(port)]
    with open(log, "ab") as output:
        process = processes.start("dynamic origin", command, stop_signal=signal.SIGTERM, output=output, env=env)
    _wait_for_port(port, process, "dynamic origin", log)
    return port


@dataclass
class Moxy:
    supervisor: subprocess.Popen[bytes]
    base_url: str
    signer: Signer
    log: Path
    workers: list[int]
    env: dict[str, str]


def start_moxy(processes: Processes, folder: Path) -> Moxy:
    """`moxy serve --workers 2` as an operator starts it, with the settings the scenarios rely on."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    key = secrets.token_urlsafe(32)
    settings = {
        "MOXY_BASE_URL": base_url,
        "MOXY_CACHE_DIR": str(folder / "cache"),
        "MOXY_ALLOWED_NETWORKS": "127.0.0.0/8",
        "MOXY_ACCESS_LOG": "false",
        "MOXY_MEMORY_CACHE_BYTES": str(MEMORY_CACHE_BYTES),
        "MOXY_DISK_CACHE_BYTES": str(DISK_CACHE_BYTES),
        "MOXY_READ_TIMEOUT": str(READ_TIMEOUT),
        "MOXY_TTL_MIN": "1",  # the flip URLs' max-age=2 must not be clamped up to the default 60 s
    }
    env = {name: value for name, value in os.environ.items() if not name.startswith("MOXY_")}
    env.update(settings, MOXY_KEY=key)
    command = [sys.executable, "-m", "moxy", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(WORKERS)]
    log = folder / "moxy.log"
    with open(log, "ab") as output:
        process = processes.start("moxy", command, stop_signal=signal.SIGTERM, output=output, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"moxy exited with {process.returncode}: {_tail(log)}")
        workers = worker_pids(process.pid)
        if len(workers) == WORKERS and _healthy(base_url):
            return Moxy(process, base_url, Signer([key], base_url), log, workers, settings)
        time.sleep(0.1)
    raise BenchError(f"moxy did not start {WORKERS} workers answering /healthz: {_tail(log)}")


def _healthy(base_url: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", int(base_url.rsplit(":", 1)[1])), timeout=1) as probe:
            probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: moxy\r\nConnection: close\r\n\r\n")
            return probe.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker children (uvicorn spawns them through multiprocessing, beside a resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        # The command name may hold spaces or parentheses; the fields after the last ')' are fixed.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == supervisor and b"resource_tracker" not in cmdline:
            found.append(int(entry))
    return sorted(found)


# -- process sampling ----------------------------------------------------------------------------------------------

TCP_STATES = {
    "01": "established",
    "02": "syn-sent",
    "03": "syn-recv",
    "04": "fin-wait1",
    "05": "fin-wait2",
    "06": "time-wait",
    "07": "close",
    "08": "close-wait",
    "09": "last-ack",
    "0A": "listen",
    "0B": "closing",
}


def tcp_states() -> dict[str, str]:
    """Socket inode -> TCP state, so a descriptor can be told apart as listener, live connection or a leak."""
    states = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            states[fields[9]] = TCP_STATES.get(fields[3], fields[3])
    return states


@dataclass(frozen=True, slots=True)
class ProcessSample:
    rss_kib: int
    hwm_kib: int  # peak RSS so far
    fds: int
    fd_kinds: dict[str, int]


def sample_process(pid: int, states: dict[str, str]) -> ProcessSample | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None  # the process is gone
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    kinds: Counter[str] = Counter()
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed between listdir and readlink
        if target.startswith("socket:["):
            kinds["tcp-" + states[target[8:-1]] if target[8:-1] in states else "socket-other"] += 1
        elif target.startswith("pipe:"):
            kinds["pipe"] += 1
        elif target.startswith("anon_inode:"):
            kinds["anon"] += 1
        else:
            kinds["file"] += 1
    return ProcessSample(
        rss_kib=int(fields["VmRSS"].split()[0]),
        hwm_kib=int(fields["VmHWM"].split()[0]),
        fds=len(names),
        fd_kinds=dict(sorted(kinds.items())),
    )


def connections_of(sample: ProcessSample) -> int:
    return sum(count for kind, count in sample.fd_kinds.items() if kind.startswith("tcp-") and kind != "tcp-listen")


# -- traffic -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ask:
    scenario: str
    url: str
    body: bytes | None  # what a 200 must carry, byte for byte (None: not checked)


@dataclass
class Tally:
    answers: Counter[tuple[str, int, str]] = field(default_factory=Counter)  # (scenario, status, X-Moxy-Cache)
    causes: Counter[tuple[str, int, str, str]] = field(default_factory=Counter)  # 5xx: (verdict, status, cause, scn)
    wrong: Counter[str] = field(default_factory=Counter)  # answers that break the contract, by description
    client_errors: Counter[str] = field(default_factory=Counter)  # no answer at all, by scenario and exception
    served_good: set[str] = field(default_factory=set)  # flip URLs answered 200 at least once


def attribute(scenario: str, status: int, reason: str) -> str:
    """Who a 5xx is on: the scenario (it asked for it), Moxy (a 500 is always a bug), or nobody knows."""
    if status == 500:
        return "moxy bug"
    if status == 503 and "busy" in reason.lower() and scenario in UPSTREAM_SCENARIOS:
        return "scenario"
    return "scenario" if status in EXPECTED[scenario] else "unexplained"


class Plan:
    """The URLs of every scenario, signed once, and the random choice of the next request."""

    def __init__(self, moxy: Moxy, static_port: int, dynamic_port: int, bodies: dict[str, bytes]) -> None:
        self.moxy = moxy
        self.bodies = bodies
        self.rng = random.Random()
        self.static = f"http://127.0.0.1:{static_port}"
        self.dynamic_port = dynamic_port
        sign = moxy.signer.sign
        self.hits = [(sign(self.static + path), bodies[path]) for path in bodies if path.startswith("/hit/")]
        self.misses = [(sign(self.static + f"/nostore/{n}.png"), bodies[f"/nostore/{n}.png"]) for n in range(8)]
        self.rejects = [sign(self.static + f"/html/{n}.png") for n in range(4)]
        self.large = [(sign(self.static + path), bodies[path]) for path in bodies if "large" in path]
        names = [f"{n}.png" for n in range(8)] + [f"{n}.json" for n in range(8, 12)]
        self.flips = [(sign(f"http://127.0.0.1:{dynamic_port}/flip/{name}"), flip_body(name)) for name in names]
        # A key Moxy has never seen, to sign URLs that must be refused.
        self.stranger = Signer([secrets.token_urlsafe(32)], moxy.base_url)

    def pick(self, weights: dict[str, int]) -> Ask:
        scenario = self.rng.choices(list(weights), list(weights.values()))[0]
        return self.ask(scenario)

    def ask(self, scenario: str) -> Ask:
        rng = self.rng
        if scenario == "hit":
            return Ask(scenario, *rng.choice(self.hits))
        if scenario == "junk":
            url, body = rng.choice(self.hits)
            junk = base64.urlsafe_b64encode(rng.randbytes(rng.randrange(100, 3000))).decode().rstrip("=")
            return Ask(scenario, f"{url}?junk={junk}", body)
        if scenario == "miss":
            return Ask(scenario, *rng.choice(self.misses))
        if scenario == "churn":
            # A fresh upstream query every time: a new cache key, stored, pushing older entries out of memory.
            path = f"/churn/{rng.randrange(16)}.png"
            return Ask(
                scenario, self.moxy.signer.sign(f"{self.static}{path}?v={secrets.token_hex(8)}"), self.bodies[path]
            )
        if scenario == "large":
            return Ask(scenario, *rng.choice(self.large))
        if scenario == "flip":
            return Ask(scenario, *rng.choice(self.flips))
        if scenario == "reject":
            return Ask(scenario, rng.choice(self.rejects), None)
        if scenario == "forged":
            url = rng.choice(self.hits)[0]
            if rng.random() < 0.5:
                return Ask(scenario, self.stranger.sign(self.static + "/hit/0.png"), None)
            digest = url.rsplit("/", 2)[1]
            other = rng.choice(self.misses)[0].rsplit("/", 1)[1]  # one URL's digest on another URL
            return Ask(scenario, f"{self.moxy.base_url}/{digest}/{other}", None)
        if scenario == "unsigned":
            return Ask(scenario, f"{self.moxy.base_url}/{rng.choice(self.hits)[0].rsplit('/', 1)[1]}", None)
        host = rng.choice(SLOW_HOSTS)
        name = f"{rng.randrange(32)}.png"
        if scenario == "drip":
            url = f"http://{host}:{self.dynamic_port}/drip/{name}"
            return Ask(scenario, self.moxy.signer.sign(url), body_of("drip/" + name, 96 * 1024))
        if scenario == "stall":
            return Ask(scenario, self.moxy.signer.sign(f"http://{host}:{self.dynamic_port}/stall/{name}"), None)
        raise ValueError(f"unknown scenario {scenario}")


async def send(session: aiohttp.ClientSession, ask: Ask, tally: Tally) -> tuple[int, str]:
    try:
        # encoded=True: the signed URL goes out exactly as signed, not re-quoted.
        async with session.get(yarl.URL(ask.url, encoded=True)) as response:
            body = await response.read()
            status, cache = response.status, response.headers.get("x-moxy-cache", "-")
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.client_errors[f"{ask.scenario}: {type(exc).__name__}"] += 1
        return 0, "-"
    tally.answers[(ask.scenario, status, cache)] += 1
    if status >= 500:
        try:
            detail = json.loads(body)
        except ValueError:
            detail = None
        if isinstance(detail, dict):
            cause = f"{detail.get('error')}: {detail.get('reason')}"
        else:
            cause = "(no JSON error body)"
        verdict = attribute(ask.scenario, status, cause)
        if ask.scenario == "flip" and ask.url in tally.served_good:
            # Once a good copy was served, stale-if-error=3600 must keep serving it through every bad phase;
            # the flip URLs are few and hot, so neither tier should have let it go.
            verdict, cause = "unexplained", cause + " after a good copy was served"
        tally.causes[(verdict, status, cause, ask.scenario)] += 1
    elif status not in EXPECTED[ask.scenario]:
        tally.wrong[f"{ask.scenario}: unexpected {status} {cache}"] += 1
    elif status == 200 and ask.body is not None and body != ask.body:
        # The worst failure a cache can have: a 200 that is not the origin's good answer (an error stored, a mix-up).
        tally.wrong[f"{ask.scenario}: 200 {cache} with {len(body)} bytes that are not the origin's body"] += 1
    elif status == 200 and ask.scenario == "flip":
        tally.served_good.add(ask.url)
    return status, cache


class Pacer:
    """At most `rate` request starts per second across every loop that shares it (0: no limit)."""

    def __init__(self, rate: float) -> None:
        self.gap = 1.0 / rate if rate > 0 else 0.0
        self.next = time.monotonic()

    async def wait(self) -> None:
        if self.gap:
            now = time.monotonic()
            slot = max(now, self.next)
            self.next = slot + self.gap
            await asyncio.sleep(slot - now)


async def client_loop(
    session: aiohttp.ClientSession, plan: Plan, weights: dict[str, int], deadline: float, tally: Tally, pacer: Pacer
) -> None:
    while time.monotonic() < deadline:
        await pacer.wait()
        if time.monotonic() >= deadline:
            return
        await send(session, plan.pick(weights), tally)


def new_session(concurrency: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, force_close=False),
        timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT),
        auto_decompress=False,
        trust_env=False,  # loopback only: no proxy from the environment
    )


async def prime(plan: Plan, tally: Tally) -> None:
    """Every cached URL fetched once (so hits are hits), and a first answer of each scenario checked."""
    async with new_session(16) as session:
        urls = [*plan.hits, *plan.large]
        await asyncio.gather(*(send(session, Ask("hit", url, body), tally) for url, body in urls))
        for url, body in plan.hits[:3]:
            status, cache = await send(session, Ask("hit", url, body), tally)
            if (status, cache) != (200, "HIT"):
                raise BenchError(f"a primed URL answered {status} {cache}, not 200 HIT")
        for scenario in [*FAST_WEIGHTS, *SLOW_WEIGHTS]:
            await send(session, plan.ask(scenario), tally)
    problems = [*tally.wrong, *(cause for (verdict, _status, cause, _scn) in tally.causes if verdict != "scenario")]
    if problems or tally.client_errors:
        raise BenchError(f"priming went wrong: {problems or dict(tally.client_errors)}")


# -- sampling and the run ------------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since traffic started (negative: before)
    label: str
    processes: dict[str, ProcessSample | None]
    answers: dict[str, int]  # "scenario status cache" -> cumulative count
    metrics: dict[str, float]


def scrape_metrics(base_url: str) -> dict[str, float]:
    """Moxy's own view of its tiers, summed over workers; empty if /metrics does not answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=5) as response:  # loopback, our own child
            text = response.read().decode()
    except OSError:
        return {}
    wanted = ("moxy_memory_cache_bytes", "moxy_memory_cache_items", "moxy_disk_cache_bytes")
    return {
        item.name: item.value
        for family in text_string_to_metric_families(text)
        for item in family.samples
        if item.name in wanted
    }


def take_sample(moxy: Moxy, t: float, label: str, tally: Tally) -> Sample:
    states = tcp_states()
    processes = {"supervisor": sample_process(moxy.supervisor.pid, states)}
    for number, pid in enumerate(moxy.workers, 1):
        processes[f"worker {number}"] = sample_process(pid, states)
    answers = {f"{scn} {status} {cache}": count for (scn, status, cache), count in sorted(tally.answers.items())}
    return Sample(round(t, 1), label, processes, answers, scrape_metrics(moxy.base_url))


async def settle(moxy: Moxy, t: float, label: str, tally: Tally) -> Sample:
    """Wait (bounded) until no worker holds a client or upstream connection, then sample: the idle figures."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        sample = take_sample(moxy, t, label, tally)
        idle = all(s is not None and connections_of(s) == 0 for s in sample.processes.values())
        if idle or time.monotonic() >= deadline:
            return sample
        await asyncio.sleep(1)


@dataclass
class Knobs:
    minutes: float
    concurrency: int
    rate: float
    sample_seconds: float
    wrk: bool

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    @property
    def warmup(self) -> float:
        # Long enough for churn to fill the memory tier of both workers; never more than half the run.
        return min(max(30.0, 0.2 * self.seconds), self.seconds / 2)


async def soak(moxy: Moxy, plan: Plan, knobs: Knobs) -> tuple[list[Sample], Tally, list[dict[str, Any]]]:
    await prime(plan, Tally())  # its answers are not the soak's: counted apart, only checked
    tally = Tally()
    samples = [await settle(moxy, 0.0, "start (idle)", tally)]
    started = time.monotonic()
    deadline = started + knobs.seconds
    slow = max(1, knobs.concurrency // 4)  # dripping bodies keep their own slots, so they cannot starve the rest
    pacer, unpaced = Pacer(knobs.rate), Pacer(0)
    wrk_runs: list[dict[str, Any]] = []
    async with new_session(knobs.concurrency) as session:
        loops = [
            asyncio.create_task(client_loop(session, plan, FAST_WEIGHTS, deadline, tally, pacer))
            for _ in range(knobs.concurrency - slow)
        ]
        loops += [
            asyncio.create_task(client_loop(session, plan, SLOW_WEIGHTS, deadline, tally, unpaced)) for _ in range(slow)
        ]
        # Many short-lived connections at once: what wrk adds that the pooled client does not.
        wrk_at = [knobs.seconds * 0.3, knobs.seconds * 0.7] if knobs.wrk else []
        next_sample = started + knobs.sample_seconds
        while time.monotonic() < deadline:
            now = time.monotonic()
            if wrk_at and now - started >= wrk_at[0]:
                wrk_at.pop(0)
                wrk_runs.append(await _wrk_burst(plan, now - started, min(10, max(3, int(knobs.seconds / 30)))))
            elif now >= next_sample:
                sample = take_sample(moxy, now - started, "load", tally)
                samples.append(sample)
                _progress(sample, tally)
                while next_sample <= now:  # after a wrk burst, skip the missed slots rather than catch up
                    next_sample += knobs.sample_seconds
            else:
                await asyncio.sleep(min(1.0, next_sample - now, max(0.0, deadline - now)))
            if moxy.supervisor.poll() is not None:
                raise BenchError(f"moxy exited with {moxy.supervisor.returncode} during the soak: {_tail(moxy.log)}")
        # The loops stop at the deadline; requests in flight are bounded by the client timeout.
        await asyncio.wait_for(asyncio.gather(*loops), CLIENT_TIMEOUT + 10)
        samples.append(take_sample(moxy, time.monotonic() - started, "end (load)", tally))
    samples.append(await settle(moxy, time.monotonic() - started, "end (idle)", tally))
    return samples, tally, wrk_runs


async def _wrk_burst(plan: Plan, at: float, seconds: int) -> dict[str, Any]:
    url, body = plan.hits[0]
    try:
        result = await asyncio.to_thread(run_wrk, url, seconds=seconds, connections=128, min_body=len(body))
    except BenchError as exc:
        print(f"  wrk at {at:.0f} s: FAILED {exc}", flush=True)
        return {"at_s": round(at), "seconds": seconds, "failure": str(exc)}
    print(f"  wrk at {at:.0f} s: {result.req_per_s:,.0f} req/s, p99 {result.p99_ms:.1f} ms (-c128 hit)", flush=True)
    return {"at_s": round(at), "seconds": seconds, "req_per_s": result.req_per_s, "p99_ms": result.p99_ms}


def _progress(sample: Sample, tally: Tally) -> None:
    parts = []
    for name, proc in sample.processes.items():
        if proc is not None and name != "supervisor":
            parts.append(f"{name} {proc.rss_kib / 1024:.0f} MiB/{proc.fds} fds")
    total = sum(tally.answers.values())
    memory = sample.metrics.get("moxy_memory_cache_bytes", 0) / MIB
    disk = sample.metrics.get("moxy_disk_cache_bytes", 0) / MIB
    tiers = f"memory tiers {memory:5.1f} MiB, disk {disk:5.1f} MiB"
    print(f"  {sample.t:5.0f} s  {total:7d} answers  {tiers}  " + "  ".join(parts), flush=True)


# -- verdict and report --------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _rss(sample: Sample, name: str) -> int | None:
    proc = sample.processes.get(name)
    return None if proc is None else proc.rss_kib


def analyse(samples: list[Sample], tally: Tally, knobs: Knobs, moxy: Moxy) -> tuple[list[Check], dict[str, Any]]:
    load = [sample for sample in samples if sample.label == "load"]
    after_warmup = [sample for sample in load if sample.t >= knobs.warmup]
    start, end_load, end_idle = samples[0], samples[-2], samples[-1]
    middle = min(load, key=lambda sample: abs(sample.t - knobs.seconds / 2)) if load else end_load
    checks: list[Check] = []
    per_process: dict[str, Any] = {}
    for name in start.processes:
        # Medians of three samples: one sample can land on a burst of large bodies in flight.
        warm = [value for s in after_warmup[:3] if (value := _rss(s, name)) is not None]
        # The last three only when they are not the same samples as the first three.
        tail = after_warmup[-3:] if len(after_warmup) >= 6 else []
        late = [value for s in tail if (value := _rss(s, name)) is not None]
        row: dict[str, Any] = {
            "rss_mib": {
                label: None if (value := _rss(s, name)) is None else round(value / 1024, 1)
                for label, s in (("start", start), ("middle", middle), ("end", end_load), ("idle", end_idle))
            },
            "peak_rss_mib": round(max((p.hwm_kib for s in samples if (p := s.processes[name])), default=0) / 1024, 1),
            "fds": {
                label: None if (proc := s.processes[name]) is None else proc.fds
                for label, s in (("start", start), ("middle", middle), ("end", end_load), ("idle", end_idle))
            },
            "fd_kinds": {
                label: None if (proc := s.processes[name]) is None else proc.fd_kinds
                for label, s in (("start", start), ("end", end_load), ("idle", end_idle))
            },
        }
        if warm and late:
            baseline, final = statistics.median(warm), statistics.median(late)
            growth = final - baseline
            bound = max(RSS_GROWTH_FRACTION * baseline, RSS_GROWTH_FLOOR / 1024)
            row["growth_after_warmup_mib"] = round(growth / 1024, 1)
            row["growth_bound_mib"] = round(bound / 1024, 1)
            checks.append(
                Check(
                    f"{name} RSS flat after warm-up",
                    growth <= bound,
                    f"{baseline / 1024:.0f} -> {final / 1024:.0f} MiB ({growth / 1024:+.1f} MiB, bound "
                    f"{bound / 1024:.1f} MiB = max({RSS_GROWTH_FRACTION:.0%}, {RSS_GROWTH_FLOOR // MIB} MiB))",
                )
            )
        else:
            checks.append(Check(f"{name} RSS flat after warm-up", False, "too few samples after the warm-up"))
        first, last = start.processes[name], end_idle.processes[name]
        if first is None or last is None:
            checks.append(Check(f"{name} fds back to baseline", False, "process gone"))
        else:
            checks.append(
                Check(
                    f"{name} fds back to baseline",
                    last.fds <= first.fds + FD_SLACK,
                    f"{first.fds} idle at start, {last.fds} idle at the end (slack {FD_SLACK}); "
                    f"{connections_of(last)} connections still open",
                )
            )
        per_process[name] = row
    replaced = worker_pids(moxy.supervisor.pid) != moxy.workers
    checks.append(Check("workers never replaced", not replaced, f"pids {moxy.workers}"))
    bugs = sum(count for (verdict, *_), count in tally.causes.items() if verdict == "moxy bug")
    checks.append(Check("no 500 (a Moxy bug)", bugs == 0, f"{bugs} answers"))
    unexplained = sum(count for (verdict, *_), count in tally.causes.items() if verdict == "unexplained")
    checks.append(Check("no 5xx the scenario does not cause", unexplained == 0, f"{unexplained} answers"))
    wrong = sum(tally.wrong.values())
    checks.append(Check("every other answer as expected", wrong == 0, f"{wrong} wrong (status or body)"))
    lost = sum(tally.client_errors.values())
    checks.append(Check("every request answered", lost == 0, f"{lost} without an answer"))
    memory = [s.metrics.get("moxy_memory_cache_bytes", 0.0) for s in samples]
    budget = MEMORY_CACHE_BYTES * WORKERS
    checks.append(
        Check(
            "memory tiers within budget",
            max(memory) <= budget,
            f"peak {max(memory) / MIB:.1f} MiB of {budget // MIB} MiB ({WORKERS} x {MEMORY_CACHE_BYTES // MIB} MiB)",
        )
    )
    return checks, per_process


def render(per_process: dict[str, Any], tally: Tally, checks: list[Check], knobs: Knobs) -> str:
    lines = [
        "",
        f"{'process':<11} {'RSS MiB start':>13} {'middle':>7} {'end':>7} {'idle':>7} {'peak':>7} "
        f"{'growth*':>8} {'bound':>6} | {'fds start':>9} {'middle':>6} {'end':>5} {'idle':>5}",
    ]
    for name, row in per_process.items():
        rss, fds = row["rss_mib"], row["fds"]
        lines.append(
            f"{name:<11} {rss['start']!s:>13} {rss['middle']!s:>7} {rss['end']!s:>7} {rss['idle']!s:>7} "
            f"{row['peak_rss_mib']!s:>7} {row.get('growth_after_warmup_mib', '-')!s:>8} "
            f"{row.get('growth_bound_mib', '-')!s:>6} | {fds['start']!s:>9} {fds['middle']!s:>6} {fds['end']!s:>5} "
            f"{fds['idle']!s:>5}"
        )
    lines.append(
        f"* growth: median of the last 3 samples minus median of the first 3 after the {knobs.warmup:.0f} s warm-up"
    )
    by_status: Counter[tuple[int, str]] = Counter()
    by_scenario: dict[str, Counter[str]] = {}
    for (scenario, status, cache), count in tally.answers.items():
        by_status[(status, cache)] += count
        by_scenario.setdefault(scenario, Counter())[f"{status} {cache}"] += count
    total = sum(by_status.values())
    lines += ["", f"requests: {total:,} answered, {sum(tally.client_errors.values())} without an answer"]
    lines += [f"  {status} {cache:<12} {count:>9,}" for (status, cache), count in sorted(by_status.items())]
    lines.append("by scenario:")
    for scenario, counts in sorted(by_scenario.items()):
        lines.append(f"  {scenario:<9} " + ", ".join(f"{key} x{count}" for key, count in counts.most_common()))
    lines.append("5xx by cause:")
    for (verdict, status, cause, scenario), count in sorted(tally.causes.items()):
        lines.append(f"  [{verdict}] {status} {cause} ({scenario}) x{count}")
    if not tally.causes:
        lines.append("  none")
    for label, counter in (("wrong answers", tally.wrong), ("no answer", tally.client_errors)):
        lines += [f"{label}: {key} x{count}" for key, count in counter.most_common()]
    lines += ["", "verdict:"]
    lines += [f"  {'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}" for check in checks]
    return "\n".join(lines)


def log_problems(log: Path) -> list[str]:
    """Distinct error lines Moxy wrote (tracebacks end in one): reported, for a human to judge."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    found = [line for line in lines if "Error" in line or "Exception" in line or line.startswith("ERROR")]
    return sorted(set(found))[:20]


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops every child


def run(knobs: Knobs) -> int:
    import uvloop

    if not Path(NGINX).exists():
        print(f"soak: {NGINX} is missing (make system-deps installs it)", file=sys.stderr)
        return 1
    if knobs.wrk:
        try:
            wrk_binary()
        except BenchError as exc:
            print(f"soak: {exc} (or run with --no-wrk)", file=sys.stderr)
            return 1
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = datetime.now(UTC)
    processes = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="moxy-soak-") as folder:
            root = Path(folder)
            root.chmod(0o755)  # nginx's unprivileged workers (when run as root) must reach the files below
            try:
                bodies = static_bodies()
                static = start_static(processes, root / "static", bodies)
                dynamic_port = start_dynamic(processes, root)
                moxy = start_moxy(processes, root / "moxy")
                print(
                    f"moxy {moxy.base_url} (supervisor {moxy.supervisor.pid}, workers {moxy.workers}), "
                    f"{knobs.minutes:g} min, concurrency {knobs.concurrency}, "
                    f"rate {'unlimited' if not knobs.rate else f'{knobs.rate:g}/s'}, warm-up {knobs.warmup:.0f} s",
                    flush=True,
                )
                plan = Plan(moxy, static.port, dynamic_port, bodies)
                samples, tally, wrk_runs = uvloop.run(soak(moxy, plan, knobs))
                checks, per_process = analyse(samples, tally, knobs, moxy)
                problems = log_problems(moxy.log)
            finally:
                processes.stop_all()
    except KeyboardInterrupt:
        print("soak: interrupted; every server it started is stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    print(render(per_process, tally, checks, knobs))
    if problems:
        print("moxy log lines mentioning errors (not part of the verdict):")
        print("\n".join(f"  {line[:200]}" for line in problems))
    passed = all(check.ok for check in checks)
    document = {
        "started": started.isoformat(timespec="seconds"),
        "knobs": {**asdict(knobs), "warmup_s": knobs.warmup, "workers": WORKERS},
        "moxy_settings": moxy.env,
        "bounds": {
            "rss_growth_after_warmup": f"<= max({RSS_GROWTH_FRACTION:.0%} of RSS after warm-up, "
            f"{RSS_GROWTH_FLOOR // MIB} MiB)",
            "fds": f"idle at the end <= idle at the start + {FD_SLACK}",
            "memory_tier_bytes": MEMORY_CACHE_BYTES * WORKERS,
        },
        "verdict": "PASS" if passed else "FAIL",
        "checks": [asdict(check) for check in checks],
        "processes": per_process,
        "answers": {f"{scn} {status} {cache}": n for (scn, status, cache), n in sorted(tally.answers.items())},
        "five_xx_by_cause": [
            {"verdict": verdict, "status": status, "cause": cause, "scenario": scenario, "count": count}
            for (verdict, status, cause, scenario), count in sorted(tally.causes.items())
        ],
        "wrong_answers": dict(tally.wrong),
        "requests_per_s": round(sum(tally.answers.values()) / knobs.seconds, 1),
        "client_errors": dict(tally.client_errors),
        "wrk": wrk_runs,
        "moxy_log_problems": problems,
        "samples": [asdict(sample) for sample in samples],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"soak-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nverdict: {'PASS' if passed else 'FAIL'}\nwritten: {path}")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Mixed traffic against moxy serve --workers 2 on loopback: RSS, fds and 5xx causes, and a verdict.",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic time (default 10)")
    parser.add_argument("--concurrency", type=int, default=64, help="client requests in flight (default 64)")
    parser.add_argument("--rate", type=float, default=0.0, help="cap on fast requests per second (default: none)")
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="sampling period (default 10)")
    parser.add_argument("--no-wrk", action="store_true", help="skip the two wrk bursts")
    parser.add_argument("--origin-port", type=int, help=argparse.SUPPRESS)  # internal: run the dynamic origin
    arguments = parser.parse_args(argv)
    if arguments.origin_port is not None:
        import uvloop

        uvloop.run(_serve_origin(arguments.origin_port))
        return 0
    if arguments.minutes <= 0 or arguments.concurrency < 4 or arguments.sample_seconds <= 0:
        parser.error("--minutes and --sample-seconds must be positive, --concurrency at least 4")
    knobs = Knobs(
        arguments.minutes, arguments.concurrency, arguments.rate, arguments.sample_seconds, not arguments.no_wrk
    )
    return run(knobs)


if __name__ == "__main__":
    sys.exit(main())

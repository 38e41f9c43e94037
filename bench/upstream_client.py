"""Miss-path engine benchmark: moxy.upstream.Upstream over each built-in engine, the engines alone, and the bare
clients they could sit on.

Starts a private nginx (temp prefix, free port, daemon off) serving a 10 KiB file on 127.0.0.1, then fetches it
N times at concurrency 1, 8 and 32 with each client, in alternation, and prints req/s and the CPU time of this
process per request (median of the rounds; nginx runs in its own process and is not counted).

    .venv/bin/python bench/upstream_client.py [--requests 3000] [--rounds 3]

`python -m bench` runs it as one section, through `measure` and `render`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import uvloop

from moxy.policy import DestinationPolicy
from moxy.upstream import ENGINES, Engine, Upstream

NGINX = "/usr/sbin/nginx"
CONFIG = """
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp; proxy_temp_path {prefix}/tmp; fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp; scgi_temp_path {prefix}/tmp;
    keepalive_requests 1000000;
    server {{ listen 127.0.0.1:{port}; root {prefix}/www; }}
}}
"""

Fetch = Callable[[str], Awaitable[int]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_nginx(prefix: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    prefix.chmod(0o755)  # nginx workers may run as an unprivileged user
    (prefix / "www").mkdir()
    (prefix / "tmp").mkdir()
    (prefix / "www" / "10k.bin").write_bytes(os.urandom(10 * 1024))
    (prefix / "nginx.conf").write_text(CONFIG.format(prefix=prefix, port=port))
    process = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("nginx did not start")


async def run(fetch: Fetch, url: str, requests: int, concurrency: int) -> tuple[float, float]:
    """req/s, and CPU µs of this process per request."""
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            got = await fetch(url)
            assert got == 10 * 1024, got

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started), (time.process_time() - cpu) / requests * 1e6


CONCURRENCY = (1, 8, 32)
Results = dict[str, dict[int, float]]


def render(results: Results, rounds: int, unit: str = "req/s") -> str:
    lines = [f"{'client':<30} {'c=1':>8} {'c=8':>8} {'c=32':>8}   ({unit}, median of {rounds})"]
    for name, by_concurrency in results.items():
        lines.append(f"{name:<30} " + " ".join(f"{by_concurrency[c]:>8.0f}" for c in CONCURRENCY))
    return "\n".join(lines)


async def measure(requests: int, rounds: int) -> Results:
    """Median req/s of each client at each concurrency."""
    return (await measure_rate_and_cpu(requests, rounds))[0]


async def measure_rate_and_cpu(requests: int, rounds: int) -> tuple[Results, Results]:
    """Median req/s, and median CPU µs per request, of each client at each concurrency."""
    with tempfile.TemporaryDirectory() as prefix_dir:
        prefix = Path(prefix_dir)
        process, port = start_nginx(prefix)
        try:
            url = f"http://127.0.0.1:{port}/10k.bin"
            policy = DestinationPolicy.from_settings_values(["127.0.0.0/8"], [], [])
            options = {
                "policy": policy,
                "connect_timeout": 5.0,
                "read_timeout": 5.0,
                "total_timeout": 30.0,
                "max_body_bytes": 50 * 1024 * 1024,
                "max_redirects": 5,
                "user_agent": "Moxy/bench",
                "spool_dir": prefix / "tmp",
            }
            upstreams = {name: Upstream(**options, engine_name=name) for name in ENGINES}  # type: ignore[arg-type]
            engines = {
                name: engine(
                    connect_timeout=5.0,
                    read_timeout=5.0,
                    limit=0,
                    limit_per_host=0,
                    ssl_context=ssl.create_default_context(),
                )
                for name, engine in ENGINES.items()
            }
            pinned = [ipaddress.ip_address("127.0.0.1")]
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            session = aiohttp.ClientSession()
            client = httpx.AsyncClient(limits=limits, trust_env=False)

            def via_upstream(upstream: Upstream) -> Fetch:
                async def fetch(target: str) -> int:
                    return (await upstream.fetch(target, {"Accept": "*/*"})).length

                return fetch

            def via_engine(engine: Engine) -> Fetch:
                # The engine alone: one request and its body, as the fetcher drives it, without the fetcher's rules.
                async def fetch(target: str) -> int:
                    wire = await engine.send("GET", target, [("Accept", "*/*")], pinned)
                    return sum([len(chunk) async for chunk in wire.chunks()])

                return fetch

            async def via_aiohttp(target: str) -> int:
                async with session.get(target) as response:
                    return len(await response.read())

            async def via_httpx(target: str) -> int:
                return len((await client.get(target)).content)

            clients: dict[str, Fetch] = {
                f"Upstream ({name} engine)": via_upstream(up) for name, up in upstreams.items()
            }
            clients |= {f"{name} engine alone": via_engine(engine) for name, engine in engines.items()}
            clients |= {"bare aiohttp.ClientSession": via_aiohttp, "bare httpx.AsyncClient": via_httpx}
            rates: dict[tuple[str, int], list[float]] = {}
            cpus: dict[tuple[str, int], list[float]] = {}
            for fetch in clients.values():
                await run(fetch, url, 300, 8)  # warm-up: pools filled
            for _ in range(rounds):
                for concurrency in CONCURRENCY:
                    for name, fetch in clients.items():
                        rate, cpu = await run(fetch, url, requests, concurrency)
                        rates.setdefault((name, concurrency), []).append(rate)
                        cpus.setdefault((name, concurrency), []).append(cpu)
            by_rate = {name: {c: statistics.median(rates[(name, c)]) for c in CONCURRENCY} for name in clients}
            by_cpu = {name: {c: statistics.median(cpus[(name, c)]) for c in CONCURRENCY} for name in clients}
            for upstream in upstreams.values():
                await upstream.aclose()
            for engine in engines.values():
                await engine.aclose()
            await session.close()
            await client.aclose()
            return by_rate, by_cpu
        finally:
            process.send_signal(signal.SIGQUIT)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
            shutil.rmtree(prefix / "tmp", ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    rates, cpus = uvloop.run(measure_rate_and_cpu(arguments.requests, arguments.rounds))
    print(render(rates, arguments.rounds))
    print(render(cpus, arguments.rounds, "CPU µs per request"))

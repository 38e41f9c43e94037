"""The servers the benchmark measures, each a child process on 127.0.0.1 with every path inside one temp folder.

`Processes` owns them: whatever happens (an error, Ctrl-C, SIGTERM), `stop_all` ends each one it started."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from moxy.signing import Signer

NGINX = "/usr/sbin/nginx"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = 10 * 1024
TINY = 1024
LARGE = 1024 * 1024
# Bodies above this skip Moxy's memory tier, so the 1 MiB target is served by the disk tier.
MEMORY_MAX_ENTRY_BYTES = 512 * 1024
BACKLOG = 4096


class BenchError(RuntimeError):
    """A target could not be set up or measured; the run's numbers are not to be trusted."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def png_body(size: int) -> bytes:
    """A body any sniffer takes for a PNG: the real signature, then filler."""
    return PNG_SIGNATURE + os.urandom(size - len(PNG_SIGNATURE))


class Processes:
    """Every child the run starts, stopped in reverse order of start."""

    def __init__(self) -> None:
        self._children: list[tuple[str, subprocess.Popen[bytes], int]] = []

    def start(
        self,
        name: str,
        command: list[str],
        *,
        stop_signal: int,
        output: IO[bytes] | int,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> subprocess.Popen[bytes]:
        # A session of its own: a Ctrl-C at the terminal reaches only the bench, which then stops the children
        # in order (Moxy before the origin it is still talking to).
        process = subprocess.Popen(
            command, env=env, pass_fds=pass_fds, stdout=output, stderr=output, start_new_session=True
        )
        self._children.append((name, process, stop_signal))
        return process

    def stop_all(self) -> None:
        while self._children:
            _name, process, stop_signal = self._children.pop()
            if process.poll() is not None:
                continue
            process.send_signal(stop_signal)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what} exited with {process.returncode}: {_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not listen on port {port}: {_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"


NGINX_MAIN = """
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    types {{ image/png png; }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
{http}
}}
"""

# /static/: cacheable; /nostore/: the same bytes, never cacheable (Moxy's miss path);
# /burst/: cacheable, and every request is logged so upstream requests can be counted per URL;
# /small/: a cacheable 1 KiB body whatever the query, so `?k=N` makes as many cache keys as wanted;
# /fill/: a cacheable 10 KiB body whatever the query, logged: the cold fill asks each `?n=N` once.
ORIGIN_HTTP = """
    log_format uri '$request_uri';
    server {{
        listen 127.0.0.1:{port} backlog={backlog};
        root {prefix}/www;
        location /static/ {{ add_header Cache-Control "max-age=3600"; }}
        location /small/ {{ add_header Cache-Control "max-age=3600"; }}
        location /fill/ {{
            add_header Cache-Control "max-age=3600";
            access_log {prefix}/fill.log uri;
        }}
        location /nostore/ {{
            add_header Cache-Control "no-store";
            access_log {prefix}/nostore.log uri;
        }}
        location /burst/ {{
            add_header Cache-Control "max-age=3600";
            access_log {prefix}/burst.log uri;
        }}
    }}
"""

CACHE_HTTP = """
    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=bench:16m max_size=1g inactive=1h use_temp_path=off;
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port} backlog={backlog};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_lock on;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
"""

# The miss path's reference: nginx relaying to the origin over kept-alive connections, storing nothing.
PASS_HTTP = """
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port} backlog={backlog};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


@dataclass
class Nginx:
    prefix: Path
    port: int
    pid: int  # the master; its workers are its children

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def logged_uris(self, log_name: str) -> list[str]:
        """The request URIs nginx logged in `log_name` (unbuffered: complete once the answers are sent)."""
        log = self.prefix / log_name
        return log.read_text().splitlines() if log.exists() else []

    def logged_count(self, log_name: str) -> int:
        """How many requests nginx logged in `log_name`, without splitting a log that may hold a million lines."""
        log = self.prefix / log_name
        return log.read_bytes().count(b"\n") if log.exists() else 0


def _start_nginx(processes: Processes, prefix: Path, http: str, what: str, **fields: object) -> Nginx:
    prefix.mkdir(parents=True, exist_ok=True)
    # Run as root, nginx's workers drop to an unprivileged user that must still reach these folders.
    prefix.chmod(0o755)
    (prefix / "tmp").mkdir()
    port = free_port()
    block = http.format(prefix=prefix, port=port, backlog=BACKLOG, **fields)
    config = prefix / "nginx.conf"
    config.write_text(NGINX_MAIN.format(prefix=prefix, http=block))
    process = processes.start(
        what,
        [NGINX, "-p", str(prefix), "-c", str(config), "-g", "daemon off;"],
        stop_signal=signal.SIGTERM,  # fast shutdown: wrk's idle keep-alive connections need not linger
        output=subprocess.DEVNULL,
    )
    _wait_for_port(port, process, what, prefix / "error.log")
    return Nginx(prefix, port, process.pid)


def start_origin(processes: Processes, prefix: Path) -> tuple[Nginx, dict[str, bytes]]:
    """The origin nginx and the bodies it serves, by path."""
    bodies = {
        "/static/10k.png": png_body(SMALL),
        "/static/1m.png": png_body(LARGE),
        "/nostore/10k.png": png_body(SMALL),
        "/burst/10k.png": png_body(SMALL),
        "/small/1k.png": png_body(TINY),
        "/fill/10k.png": png_body(SMALL),
    }
    www = prefix / "www"
    for path, body in bodies.items():
        target = www / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        target.chmod(0o644)
    for folder in [www, *www.iterdir()]:
        folder.chmod(0o755)
    return _start_nginx(processes, prefix, ORIGIN_HTTP, "nginx origin"), bodies


def start_cache(processes: Processes, prefix: Path, origin: Nginx) -> Nginx:
    """nginx proxy_cache in front of the origin: the reference every Moxy figure is divided by."""
    return _start_nginx(processes, prefix, CACHE_HTTP, "nginx proxy_cache", origin_port=origin.port)


def start_passthrough(processes: Processes, prefix: Path, origin: Nginx) -> Nginx:
    """nginx proxy_pass without a cache in front of the origin: the reference for Moxy's miss path."""
    return _start_nginx(processes, prefix, PASS_HTTP, "nginx pass-through", origin_port=origin.port)


SERVERS = ("uvicorn", "granian")
# The main Moxy's memory budget: MOXY_MEMORY_CACHE_BYTES's default, passed explicitly so the report can name it.
MEMORY_CACHE_BYTES = 256 * 1024 * 1024


@dataclass
class Moxy:
    base_url: str
    signer: Signer
    cache_dir: Path
    log: Path
    pid: int  # the process started: uvicorn's only process, or granian's supervisor
    server: str  # "uvicorn" or "granian"
    memory_cache_bytes: int  # MOXY_MEMORY_CACHE_BYTES it runs with (per worker)

    def sign(self, url: str) -> str:
        return self.signer.sign(url)

    def disk_bodies(self) -> list[int]:
        """Sizes of the bodies the disk tier holds as files of their own."""
        folder = self.cache_dir / "body"
        return [path.stat().st_size for path in folder.rglob("*") if path.is_file()] if folder.exists() else []

    def disk_entries(self) -> int:
        """Entries in the disk tier: one meta file each, whether its body is embedded or a file of its own."""
        folder = self.cache_dir / "meta"
        return sum(1 for path in folder.rglob("*") if path.is_file()) if folder.exists() else 0


def granian_binary() -> str | None:
    """granian next to this Python, if it is installed (it is not a dependency of Moxy)."""
    candidate = Path(sys.executable).parent / "granian"
    return str(candidate) if candidate.exists() else None


def start_moxy(
    processes: Processes,
    folder: Path,
    *,
    server: str = "uvicorn",
    memory_cache_bytes: int = MEMORY_CACHE_BYTES,
    disk_cache_bytes: int | None = None,
    disk_fsync: bool = False,
) -> Moxy:
    """Moxy on a free loopback port, one worker: `moxy serve` (uvicorn), or granian loading the same app factory.

    Not `uvicorn --fd`: uvicorn wraps an inherited descriptor as a Unix socket, so the TCP connections it accepts
    never get TCP_NODELAY and every response waits out the client's delayed ACK (about 40 ms)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    key = secrets.token_urlsafe(32)
    cache_dir = folder / "cache"
    env = {name: value for name, value in os.environ.items() if not name.startswith("MOXY_")}
    env.update(
        {
            "MOXY_KEY": key,
            "MOXY_BASE_URL": base_url,
            "MOXY_CACHE_DIR": str(cache_dir),
            "MOXY_ALLOWED_NETWORKS": "127.0.0.0/8",
            "MOXY_ACCESS_LOG": "false",
            "MOXY_MEMORY_CACHE_BYTES": str(memory_cache_bytes),
            "MOXY_MEMORY_MAX_ENTRY_BYTES": str(MEMORY_MAX_ENTRY_BYTES),
        }
    )
    if disk_cache_bytes is not None:
        env["MOXY_DISK_CACHE_BYTES"] = str(disk_cache_bytes)
    env["MOXY_DISK_FSYNC"] = "true" if disk_fsync else "false"
    engine = os.environ.get("BENCH_UPSTREAM_ENGINE", "").strip()
    if engine:  # Moxy's default engine unless the run asks for another (moxy.upstream.ENGINES)
        env["MOXY_UPSTREAM_ENGINE"] = engine
    if server == "uvicorn":
        command = [sys.executable, "-m", "moxy", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    elif server == "granian" and (granian := granian_binary()) is not None:
        # The same app factory `moxy serve` hands uvicorn, with the same MOXY_* settings. granian has its own HTTP
        # parser, so moxy.server's bounds on what a client may send do not apply under it.
        command = [
            granian,
            "--interface",
            "asgi",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--no-ws",
            "--backlog",
            str(BACKLOG),
            "--log-level",
            "warning",
            "moxy.app:create_app",
        ]
    else:
        raise BenchError(f"cannot run Moxy under {server!r} (granian: .venv/bin/pip install granian)")
    log = folder / "moxy.log"
    with open(log, "ab") as output:
        process = processes.start(f"moxy ({server})", command, stop_signal=signal.SIGTERM, output=output, env=env)
    deadline = time.monotonic() + 30
    with httpx.Client(trust_env=False, timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BenchError(f"moxy ({server}) exited with {process.returncode}: {_tail(log)}")
            try:
                if client.get(base_url + "/healthz").status_code == 200:
                    signer = Signer([key], base_url)
                    return Moxy(base_url, signer, cache_dir, log, process.pid, server, memory_cache_bytes)
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise BenchError(f"moxy ({server}) did not answer /healthz: {_tail(log)}")

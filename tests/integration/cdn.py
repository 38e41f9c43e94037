"""A real nginx `proxy_cache` in front of Moxy, the way a CDN edge would sit, for integration tests.

::

    with NginxCache(moxy.base_url, tmp_path / "nginx") as cdn:
        answer = cdn.get(moxy.sign(origin.url("/pic.png")))      # the signed URL, re-aimed at nginx
        assert answer.headers["x-cdn-cache"] == "MISS"
        assert cdn.access_log(1)[-1]["upstream_status"] == "200"
        assert len(moxy_requests(moxy)) == 1                     # Moxy started with access_log=1

nginx runs in the foreground as a child process with everything (config, cache, temp files, logs, pid) inside
one folder, so it needs no privileges and leaves nothing behind. Its cache obeys only what Moxy says: no
`proxy_cache_valid` (which would override Moxy's Cache-Control) and no `proxy_cache_use_stale` (so an outage
hidden from clients is hidden by Moxy, not by nginx).

Between the cache and Moxy sits a second, non-caching nginx server on a unix socket (the "wire"). It changes
nothing in either direction; it exists because nginx cannot log the headers of the requests it sends upstream,
and a test needs to see the If-None-Match the cache revalidates with.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from moxy.telemetry import path_digest
from tests.integration.moxy_server import MoxyServer
from tests.integration.servers import require_binary
from tests.net import free_port

__all__ = ["NginxCache", "moxy_requests", "require_nginx"]

# One JSON object per request. The edge log says what clients got and how the cache served it; the wire log says
# what the cache asked Moxy (its conditional headers included) and what Moxy answered.
_EDGE_LOG = (
    '{"time":$msec,"method":"$request_method","uri":"$request_uri","status":$status,'
    '"cache":"$upstream_cache_status","upstream_status":"$upstream_status","bytes":$body_bytes_sent,'
    '"range":"$http_range","if_none_match":"$http_if_none_match"}'
)
_WIRE_LOG = (
    '{"time":$msec,"method":"$request_method","uri":"$request_uri","status":$status,'
    '"if_none_match":"$http_if_none_match","if_modified_since":"$http_if_modified_since","range":"$http_range"}'
)

_CONFIG = """\
{user}worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;

events {{
    worker_connections 256;
}}

http {{
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    log_format edge escape=json '{edge_log}';
    log_format wire escape=json '{wire_log}';

    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=moxy_edge:1m max_size=256m inactive=10m use_temp_path=off;

    # The edge: the cache every client talks to.
    server {{
        listen 127.0.0.1:{port};
        access_log {prefix}/access.log edge;
        location / {{
            proxy_pass http://unix:{wire}:;
            proxy_http_version 1.1;
            proxy_connect_timeout 5s;
            proxy_read_timeout 15s;

            proxy_cache moxy_edge;
            proxy_cache_key $scheme$proxy_host$request_uri;
            proxy_cache_revalidate on;
            proxy_cache_use_stale off;
            add_header X-CDN-Cache $upstream_cache_status always;
        }}
    }}

    # The wire: a plain pass-through to Moxy whose only job is to log the requests the edge sends.
    server {{
        listen unix:{wire};
        access_log {prefix}/upstream.log wire;
        location / {{
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_connect_timeout 5s;
            proxy_read_timeout 15s;
        }}
    }}
}}
"""


def require_nginx() -> str:
    """The nginx binary (see require_binary for what happens when it is missing)."""
    return require_binary("nginx", "/usr/sbin/nginx")


def _user_line() -> str:
    # Started as root, nginx hands its workers to `nobody`, who cannot enter a root-only pytest folder.
    if os.geteuid() != 0:
        return ""
    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"


class NginxCache:
    """nginx with proxy_cache in front of `upstream` (Moxy's base URL). Start/stop with `with` or start()/stop()."""

    host = "127.0.0.1"

    def __init__(self, upstream: str, folder: Path, *, binary: str | None = None, attempts: int = 5) -> None:
        self.upstream = upstream.rstrip("/")
        self.folder = folder
        self.binary = binary or require_nginx()
        self.attempts = attempts
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._socket_dir: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.folder / "nginx.conf"

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> NginxCache:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "tmp").mkdir(exist_ok=True)
        # A unix socket path must stay under ~108 bytes, which a pytest folder named after a test may not.
        self._socket_dir = tempfile.mkdtemp(prefix="moxy-cdn-")
        wire = os.path.join(self._socket_dir, "wire.sock")
        failures: list[str] = []
        for _ in range(self.attempts):
            # free_port closes its probe before nginx binds, so another process may take the port first;
            # nginx then exits at once and the next attempt picks another port.
            self.port = free_port()
            self.config_path.write_text(
                _CONFIG.format(
                    user=_user_line(),
                    prefix=self.folder,
                    port=self.port,
                    upstream=self.upstream,
                    wire=wire,
                    edge_log=_EDGE_LOG,
                    wire_log=_WIRE_LOG,
                )
            )
            (self.folder / "nginx.pid").unlink(missing_ok=True)
            command = [self.binary, "-p", str(self.folder), "-c", str(self.config_path)]
            command += ["-e", str(self.folder / "error.log"), "-g", "daemon off;"]
            with open(self.folder / "stderr.log", "ab") as stderr:
                self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
            if self._wait_ready(deadline=time.monotonic() + 10):
                return self
            self._stop_process()
            failures.append(self.error_log()[-1000:])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(wire)
        self.stop()
        raise RuntimeError(f"nginx did not start on a free port after {self.attempts} attempts: {failures}")

    def _wait_ready(self, deadline: float) -> bool:
        assert self.process is not None
        pid_file = self.folder / "nginx.pid"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            # nginx writes its pid only after binding every listener: a connection before that could reach
            # whoever else holds the port.
            if pid_file.exists():
                with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
                    return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self._stop_process()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def _stop_process(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        for sig in (signal.SIGQUIT, signal.SIGTERM):
            process.send_signal(sig)
            try:
                process.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                continue
        process.kill()
        process.wait(timeout=5)

    def __enter__(self) -> NginxCache:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test API ----------------------------------------------------------------------------------------------

    def url(self, moxy_url: str) -> str:
        """`moxy_url` (a signed URL on Moxy's base) re-aimed at nginx: same path and query."""
        if not moxy_url.startswith(self.upstream + "/"):
            raise ValueError(f"{moxy_url} is not under {self.upstream}")
        return self.base_url + moxy_url[len(self.upstream) :]

    def get(self, moxy_url: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url(moxy_url), timeout=kwargs.pop("timeout", 30), **kwargs)

    def access_log(self, at_least: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The edge's records (one per client request: status, cache = $upstream_cache_status, upstream_status,
        bytes, range, if_none_match), waiting (bounded) until there are `at_least` of them."""
        return self._records(self.folder / "access.log", at_least, timeout)

    def upstream_log(self, at_least: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        """One record per request the cache sent to Moxy: uri, Moxy's status, and the if_none_match,
        if_modified_since and range headers the cache put on it."""
        return self._records(self.folder / "upstream.log", at_least, timeout)

    @staticmethod
    def _records(path: Path, at_least: int, timeout: float) -> list[dict[str, Any]]:
        # nginx logs a request after its last byte went out, so a client may read the answer a moment before
        # the line exists.
        deadline = time.monotonic() + timeout
        while True:
            text = path.read_text(errors="replace") if path.exists() else ""
            # A line still being written has no newline yet: only whole lines count.
            records = [json.loads(line) for line in text.split("\n")[:-1] if line]
            if len(records) >= at_least or time.monotonic() > deadline:
                return records
            time.sleep(0.01)

    def error_log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def moxy_requests(moxy: MoxyServer, url: str | None = None) -> list[dict[str, Any]]:
    """The access-log records of the requests that reached Moxy (it must run with access_log=1), optionally only
    those for one signed `url` (matched by the path digest Moxy logs instead of the path)."""
    wanted = path_digest(urlsplit(url).path) if url is not None else None
    records: list[dict[str, Any]] = []
    for line in moxy.log().splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "method" in record and "cache" in record:
            if wanted is None or record.get("path") == wanted:
                records.append(record)
    return records

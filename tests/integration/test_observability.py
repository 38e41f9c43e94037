"""What an operator reads off a real `moxy serve`: per-worker process metrics and build info on /metrics, JSON log
lines from Moxy and uvicorn alike at the configured level, and `moxy health` for a container's health check."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moxy import __version__
from tests.assets import PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply
from tests.net import free_port

pytestmark = pytest.mark.integration
StartMoxy = Callable[..., MoxyServer]
PROCESS = ("moxy_process_resident_memory_bytes", "moxy_process_open_fds", "moxy_process_cpu_seconds")


def process_series(moxy: MoxyServer) -> dict[str, dict[str, float]]:
    """metric name -> pid -> value, for the per-worker process gauges."""
    found: dict[str, dict[str, float]] = {name: {} for name in PROCESS}
    page = httpx.get(moxy.base_url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name in found:
                assert set(sample.labels) == {"pid"}, sample
                found[sample.name][sample.labels["pid"]] = sample.value
    return found


def children(pid: int) -> set[str]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The parent pid is the second field after the command name, which is in parentheses.
            if stat.rpartition(")")[2].split()[1] == str(pid):
                found.add(entry)
    return found


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def json_lines(moxy: MoxyServer) -> list[dict[str, object]]:
    return [json.loads(line) for line in moxy.log().splitlines() if line.startswith("{")]


def test_each_worker_reports_its_own_process_figures(origin: Origin, start_moxy: StartMoxy) -> None:
    origin.route("/a.png", Reply(headers={"Content-Type": "image/png"}, body=PNG))
    moxy = start_moxy(workers=2)
    for _ in range(10):
        assert moxy.get(origin.url("/a.png")).status_code == 200
    assert moxy.process is not None
    wait_for(lambda: all(len(v) == 2 for v in process_series(moxy).values()), 20, "both workers' series")
    series = process_series(moxy)
    workers = children(moxy.process.pid)
    pids = set(series["moxy_process_resident_memory_bytes"])
    assert pids <= workers, (pids, workers)
    for pid in pids:
        assert series["moxy_process_open_fds"][pid] >= 3
        assert series["moxy_process_cpu_seconds"][pid] > 0
        # The figure is at most a few seconds old; the worker's resident size moves little at rest.
        status = Path(f"/proc/{pid}/status").read_text()
        resident = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
        assert 0.5 * resident < series["moxy_process_resident_memory_bytes"][pid] < 2 * resident

    page = httpx.get(moxy.base_url + "/metrics").text
    info = [line for line in page.splitlines() if line.startswith("moxy_build_info{")]
    assert len(info) == 1, info  # one series however many workers
    assert f'version="{__version__}"' in info[0] and info[0].endswith(" 1.0")

    # A worker killed outright leaves no series behind once the survivors' housekeeping has run.
    dead = sorted(pids)[0]
    os.kill(int(dead), signal.SIGKILL)
    wait_for(lambda: dead not in process_series(moxy)["moxy_process_open_fds"], 30, "the dead worker's series gone")


def test_health_command(start_moxy: StartMoxy, tmp_path: Path) -> None:
    moxy = start_moxy()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOXY_")}
    # A proxy in the environment must not carry the check away from this machine.
    env["http_proxy"] = env["HTTP_PROXY"] = "http://127.0.0.1:9"
    command = [sys.executable, "-m", "moxy", "health"]
    healthy = subprocess.run([*command, "--port", str(moxy.port)], env=env, capture_output=True, timeout=30)
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout.strip() == b"healthy"
    nobody = subprocess.run([*command, "--port", str(free_port())], env=env, capture_output=True, timeout=30)
    assert nobody.returncode == 1
    assert b"unhealthy" in nobody.stderr
    # The port comes from MOXY_PORT like `moxy serve`'s, so the image's check follows the configured port.
    from_env = subprocess.run(command, env={**env, "MOXY_PORT": str(moxy.port)}, capture_output=True, timeout=30)
    assert from_env.returncode == 0, from_env.stderr


class _Unwell(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_health_command_fails_on_an_answer_other_than_200() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unwell)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOXY_")}
        command = [sys.executable, "-m", "moxy", "health", "--port", str(server.server_address[1])]
        unwell = subprocess.run(command, env=env, capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert unwell.returncode == 1
    assert b"answered 503" in unwell.stderr


def send_garbage(moxy: MoxyServer) -> bytes:
    with socket.create_connection(("127.0.0.1", moxy.port), timeout=5) as raw:
        raw.sendall(b"GARBAGE \x00\r\n\r\n")
        return raw.recv(100)


def test_uvicorns_records_and_moxys_share_one_json_shape(origin: Origin, start_moxy: StartMoxy) -> None:
    origin.route("/a.png", Reply(headers={"Content-Type": "image/png"}, body=PNG))
    moxy = start_moxy(access_log=1)
    assert moxy.get(origin.url("/a.png")).status_code == 200
    assert send_garbage(moxy).startswith(b"HTTP/1.1 400")
    wait_for(lambda: any(r.get("logger") == "uvicorn.error" for r in json_lines(moxy)), 10, "uvicorn's warning")
    records = json_lines(moxy)
    warning = next(r for r in records if r.get("logger") == "uvicorn.error")
    assert warning["level"] == "warning" and "Invalid HTTP request" in str(warning["message"])
    access = [r for r in records if "method" in r]
    assert access and "client" in access[0]
    for record in records:
        assert str(record["time"]).endswith("Z") and "T" in str(record["time"]), record
        assert record["level"] in ("info", "warning", "error"), record
    # Only the start-up banner is not JSON: everything after it is one object per line.
    text = [line for line in moxy.log().splitlines() if line and not line.startswith("{")]
    assert all(line.startswith(("moxy ", "  ")) for line in text), text


def test_log_level_warning_keeps_warnings_and_drops_access_lines(origin: Origin, start_moxy: StartMoxy) -> None:
    origin.route("/a.png", Reply(headers={"Content-Type": "image/png"}, body=PNG))
    moxy = start_moxy(access_log=1, log_level="WARNING")
    assert moxy.get(origin.url("/a.png")).status_code == 200
    send_garbage(moxy)
    wait_for(lambda: any(r.get("logger") == "uvicorn.error" for r in json_lines(moxy)), 10, "uvicorn's warning")
    assert not [r for r in json_lines(moxy) if "method" in r]

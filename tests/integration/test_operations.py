"""Operations against real processes: /metrics, /readyz, and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moxy.signing import Signer
from tests.assets import KEY, PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply
from tests.net import free_port

pytestmark = pytest.mark.integration
StartMoxy = Callable[..., MoxyServer]
WORDPRESS_ERROR = {"code": "rest_forbidden", "message": "Sorry.", "data": {"status": 401}}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_what_happened(origin: Origin, start_moxy: StartMoxy) -> None:
    origin.route("/a.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=PNG))
    origin.route("/feed.json", Reply.json(WORDPRESS_ERROR))
    origin.route("/down.png", Reply(status=500, body=b"oops"))
    moxy = start_moxy()
    statuses = [moxy.get(origin.url("/a.png")).status_code for _ in range(3)]  # MISS, HIT, HIT from the hit memo
    assert statuses == [200, 200, 200]
    assert moxy.get(origin.url("/feed.json")).status_code == 502
    assert moxy.get(origin.url("/down.png")).status_code == 502
    good = moxy.sign(origin.url("/a.png"))
    digest = good.rsplit("/", 2)[-2]
    forged = good.replace(digest, ("A" if digest[0] != "A" else "B") + digest[1:])
    assert httpx.get(forged).status_code == 403

    page = httpx.get(moxy.base_url + "/metrics")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/plain")
    assert page.headers["cache-control"] == "no-store"
    scraped = samples(page.text)
    assert value(scraped, "moxy_requests_total", status="200", cache="MISS") == 1
    assert value(scraped, "moxy_requests_total", status="200", cache="HIT") == 2
    assert value(scraped, "moxy_requests_total", status="502", cache="MISS") == 2
    assert value(scraped, "moxy_requests_total", status="403", cache="BYPASS") == 1
    assert value(scraped, "moxy_request_duration_seconds_count") == 6
    assert value(scraped, "moxy_validation_rejections_total", reason="json-error-envelope") == 1, [
        key for key in scraped if key[0] == "moxy_validation_rejections_total"
    ]
    assert value(scraped, "moxy_upstream_failures_total", reason="upstream-status-500") == 1
    assert value(scraped, "moxy_upstream_duration_seconds_count") == 3
    assert value(scraped, "moxy_upstream_fetches_in_flight") == 0
    assert value(scraped, "moxy_memory_cache_items") == 1
    assert value(scraped, "moxy_memory_cache_bytes") >= len(PNG)
    assert value(scraped, "moxy_disk_cache_bytes") >= len(PNG)


def test_readyz_reports_what_is_broken(tmp_path: Path, origin: Origin, start_moxy: StartMoxy) -> None:
    moxy = start_moxy()
    ready = httpx.get(moxy.base_url + "/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "degraded": []}
    assert ready.headers["cache-control"] == "no-store"
    # The cache folder replaced by a file: nothing can be written there any more (chmod would not stop root).
    os.rename(moxy.cache_dir, tmp_path / "moved")
    moxy.cache_dir.write_bytes(b"")
    broken = httpx.get(moxy.base_url + "/readyz")
    # Moxy still serves without its disk (an optimisation): degraded and named, not unready.
    assert broken.status_code == 200
    assert broken.json() == {"status": "ready", "degraded": ["cache-dir"]}
    assert broken.headers["cache-control"] == "no-store"
    assert httpx.get(moxy.base_url + "/healthz").status_code == 200


def test_readyz_names_an_unreachable_redis(start_moxy: StartMoxy) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused at once
        moxy = start_moxy(redis_url=f"redis://127.0.0.1:{port}/0")
        broken = httpx.get(moxy.base_url + "/readyz", timeout=30)
    assert broken.status_code == 200  # Redis is optional: its outage degrades to per-host caching
    assert broken.json() == {"status": "ready", "degraded": ["redis"]}


# -- `moxy serve` itself ------------------------------------------------------------------------------------------


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], str]]]:
    started: list[subprocess.Popen[bytes]] = []

    def run(*args: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MOXY_", "PROMETHEUS_"))}
        env |= {
            "MOXY_KEY": KEY,
            "MOXY_CACHE_DIR": str(tmp_path / "cache"),
            "MOXY_ALLOWED_NETWORKS": "127.0.0.0/8",
            "MOXY_ACCESS_LOG": "false",
        }
        command = [sys.executable, "-m", "moxy", "serve", "--port", str(port), *args]
        log = tmp_path / f"serve-{port}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(command, env=env, stdout=sink, stderr=sink)
        started.append(process)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text(errors="replace")
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    return process, base
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError("moxy serve did not start")

    yield run
    for process in started:
        # A clean stop, so the supervisor drains and reaps its workers; kill only one that hangs (its workers then
        # die with it: moxy.supervisor.bind_to_supervisor).
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def test_metrics_sum_over_workers(origin: Origin, serve: Callable[..., tuple[subprocess.Popen[bytes], str]]) -> None:
    origin.route("/a.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=PNG))
    process, base = serve("--workers", "2")
    url = Signer([KEY], base).sign(origin.url("/a.png"))
    for _ in range(30):  # a new connection each: uvicorn's workers share the listener, so both take some
        assert httpx.get(url).status_code == 200
    totals = set()
    for _ in range(10):
        scraped = samples(httpx.get(base + "/metrics").text)
        totals.add(sum(v for (name, _), v in scraped.items() if name == "moxy_requests_total"))
    assert totals == {30.0}, "every worker's scrape reports the sum over both workers"


def test_sigterm_finishes_in_flight_requests_and_exits_0(
    origin: Origin, serve: Callable[..., tuple[subprocess.Popen[bytes], str]]
) -> None:
    origin.route("/slow.png", Reply(headers={"Content-Type": "image/png"}, body=PNG, delay_headers=1.0))
    process, base = serve()
    url = Signer([KEY], base).sign(origin.url("/slow.png"))
    answers: list[httpx.Response] = []
    client = threading.Thread(target=lambda: answers.append(httpx.get(url, timeout=30)))
    client.start()
    deadline = time.monotonic() + 5
    while origin.hits("/slow.png") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    client.join(30)
    assert answers and answers[0].status_code == 200 and answers[0].content == PNG
    assert process.wait(30) == 0

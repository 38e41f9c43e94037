"""MOXY_ADMIN_PORT against the real `moxy serve` on loopback: /metrics and /purge move to a second listener bound
by the supervisor (the main one answers 404 there), every worker serves both, `moxy purge` finds the admin listener,
and a rolling reload keeps both listeners answering."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from tests.assets import PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply
from tests.net import free_port

pytestmark = pytest.mark.integration
StartMoxy = Callable[..., MoxyServer]

TOKEN = "purge-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
IMAGE = Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=PNG)


def admin_url(moxy: MoxyServer) -> str:
    """The admin listener's address, as the banner names it (MOXY_ADMIN_PORT=0 takes any free port)."""
    found = re.search(r"admin: +(http://\S+) ", moxy.log())
    assert found, moxy.log()[-2000:]
    return found.group(1)


def requests_total(text: str, status: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("moxy_requests_total{") and f'status="{status}"' in line
    )


def test_metrics_and_purge_move_to_the_admin_listener(origin: Origin, start_moxy: StartMoxy) -> None:
    origin.route("/pic.png", IMAGE)
    moxy = start_moxy(workers=2, admin_port=0, purge_token=TOKEN)
    admin = admin_url(moxy)
    assert admin.startswith("http://127.0.0.1:") and admin != moxy.base_url  # loopback unless MOXY_ADMIN_HOST says

    # On the main listener they do not exist; the probes and the proxy are as ever.
    assert httpx.get(moxy.base_url + "/metrics").status_code == 404
    hidden = httpx.post(moxy.base_url + "/purge", json={"url": origin.url("/pic.png")}, headers=AUTH)
    assert (hidden.status_code, hidden.json()["error"]) == (404, "NotFound")
    assert httpx.get(moxy.base_url + "/healthz").status_code == 200
    answers = [moxy.get(origin.url("/pic.png")) for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 6 and answers[0].content == PNG
    assert answers[0].headers["x-moxy-cache"] == "MISS" and answers[-1].headers["x-moxy-cache"] == "HIT"

    # On the admin listener: the probes, /metrics summed over both workers (whichever answers), /purge; nothing else.
    for path in ("/healthz", "/readyz"):
        assert httpx.get(admin + path).status_code == 200
    for _ in range(4):  # a new connection each time: the kernel spreads them over the workers
        page = httpx.get(admin + "/metrics", headers={"connection": "close"})
        assert page.status_code == 200
        assert requests_total(page.text, "200") == 6
    for path in ("/", "/pic.png", "/healthz/x", moxy.sign(origin.url("/pic.png")).removeprefix(moxy.base_url)):
        assert httpx.get(admin + path).status_code == 404
    assert httpx.get(admin + "/purge").status_code == 404  # only POST is an endpoint there
    purged = httpx.post(admin + "/purge", json={"url": origin.url("/pic.png")}, headers=AUTH)
    assert purged.status_code == 200 and purged.json()["removed"] >= 1
    assert httpx.post(admin + "/purge", json={"url": "x"}).status_code == 401  # still needs the token
    # The worker that took it dropped its copies; the other learns of it through the purge log within seconds.
    deadline = time.monotonic() + 5
    while moxy.get(origin.url("/pic.png"), headers={"connection": "close"}).headers["x-moxy-cache"] != "MISS":
        assert time.monotonic() < deadline, "the purge did not reach the cache"
        time.sleep(0.1)
    assert origin.hits("/pic.png") == 2


def test_moxy_purge_finds_the_admin_listener(origin: Origin, start_moxy: StartMoxy) -> None:
    origin.route("/pic.png", IMAGE)
    port = free_port()
    moxy = start_moxy(admin_port=port, purge_token=TOKEN)
    assert moxy.get(origin.url("/pic.png")).status_code == 200
    env = {name: value for name, value in os.environ.items() if not name.startswith("MOXY_")}
    # No MOXY_ADMIN_URL and no --endpoint: MOXY_ADMIN_PORT (the main port here is one nothing listens on).
    env |= {"MOXY_PURGE_TOKEN": TOKEN, "MOXY_ADMIN_PORT": str(port), "MOXY_PORT": str(free_port())}
    command = [sys.executable, "-m", "moxy", "purge", origin.url("/pic.png")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "purged 1 entry\n"), done.stderr


def test_an_admin_port_in_use_stops_the_start_with_one_line(start_moxy: StartMoxy) -> None:
    busy = start_moxy(admin_port=0)
    port = admin_url(busy).rsplit(":", 1)[1]
    env = {name: value for name, value in os.environ.items() if not name.startswith("MOXY_")}
    env |= {"MOXY_KEY": "k" * 32, "MOXY_CACHE_DIR": str(busy.cache_dir), "MOXY_ADMIN_PORT": port}
    env["MOXY_PORT"] = str(free_port())
    done = subprocess.run([sys.executable, "-m", "moxy", "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith(f"moxy: MOXY_ADMIN_PORT: cannot listen on 127.0.0.1:{port}: ")
    assert done.stderr.count("\n") == 1 and "serving on" not in done.stderr


def test_a_rolling_reload_keeps_both_listeners_serving(origin: Origin, start_moxy: StartMoxy) -> None:
    origin.route("/pic.png", IMAGE)
    moxy = start_moxy(workers=2, admin_port=0, purge_token=TOKEN)
    admin = admin_url(moxy)
    picture = moxy.sign(origin.url("/pic.png"))
    failures: list[str] = []
    answered = {"main": 0, "admin": 0}
    stopping = threading.Event()

    def poll(name: str, url: str) -> None:
        while not stopping.is_set():
            try:
                status = httpx.get(url, timeout=10, headers={"connection": "close"}).status_code
                if status == 200:
                    answered[name] += 1
                else:
                    failures.append(f"{name}: {status}")
            except httpx.HTTPError as exc:
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
            time.sleep(0.005)

    pollers = [
        threading.Thread(target=poll, args=("main", picture), daemon=True),
        threading.Thread(target=poll, args=("admin", admin + "/metrics"), daemon=True),
    ]
    for thread in pollers:
        thread.start()
    assert moxy.process is not None
    before = set(moxy.worker_pids())
    moxy.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while "moxy: reloaded:" not in moxy.log():
        assert time.monotonic() < deadline, moxy.log()[-2000:]
        time.sleep(0.05)
    counts = dict(answered)
    time.sleep(0.5)  # and after it, on the new workers only
    stopping.set()
    for thread in pollers:
        thread.join(30)
    assert not failures, failures[:5]
    assert answered["main"] > counts["main"] > 0 and answered["admin"] > counts["admin"] > 0
    assert len(moxy.worker_pids() - before) == 2, "both workers were replaced (the old ones may still be leaving)"

"""Restarts that drop nothing, against the real `moxy serve` under steady traffic on loopback: rolling restarts on
SIGHUP (new settings taken, a broken configuration refused), a drain on SIGTERM, and workers that die with their
supervisor."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from moxy.signing import Signer
from tests import processes
from tests.assets import KEY, OLD_KEY, PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = pytest.mark.integration
StartMoxy = Callable[..., MoxyServer]

IMAGE = {"Content-Type": "image/png", "Cache-Control": "max-age=600"}
# Never stored, so each request waits on the origin: there are always answers in progress when a worker stops.
SLOW = Reply(headers={"Content-Type": "image/png", "Cache-Control": "no-store"}, body=PNG, delay_headers=0.3)
SLOW_SHARE = 25  # one request in this many takes the slow path


@dataclass(frozen=True, slots=True)
class Outcome:
    connected: float | None  # when its connection was established (monotonic); None: never connected
    fresh: bool  # the first request on its connection
    error: str | None  # None: a whole 200 answer with the expected body
    closing: bool = False  # the answer said `Connection: close`


class Load:
    """Client threads sending GETs to Moxy until stopped (or `seconds` pass): half open a new connection for each
    request, half keep one connection for as long as the server lets them (a `Connection: close` answer, then a new
    one). Every request and its outcome is kept; an error is any exception or anything but the whole expected body."""

    def __init__(self, port: int, paths: list[tuple[str, bytes]], threads: int = 10, seconds: float = 60) -> None:
        self.port = port
        self.paths = paths
        self.deadline = time.monotonic() + seconds
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self.threads = [
            threading.Thread(target=self._run, args=(index, index % 2 == 1), daemon=True) for index in range(threads)
        ]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self.threads)

    def _record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def _run(self, index: int, keep_alive: bool) -> None:
        connection: http.client.HTTPConnection | None = None
        connected: float | None = None
        fresh = True
        count = index
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            path, expected = self.paths[count % len(self.paths)]
            count += 1
            try:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                    connected, fresh = None, True
                    connection.connect()
                    connected = time.monotonic()
                connection.request("GET", path)
                response = connection.getresponse()
                body = response.read()
                wrong = None if response.status == 200 and body == expected else f"status {response.status}"
                self._record(Outcome(connected, fresh, wrong, response.will_close))
                fresh = False
                if response.will_close or not keep_alive:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as exc:
                self._record(Outcome(connected, fresh, f"{type(exc).__name__}: {exc}"))
                if connection is not None:
                    connection.close()
                connection = None
                time.sleep(0.01)  # refused: try again shortly, not in a tight loop
        if connection is not None:
            connection.close()

    def wait_for_answers(self, count: int) -> None:
        """Until `count` more requests have been answered from now."""
        target = self.answered() + count
        wait_until(lambda: self.answered() >= target, 60, f"{count} answers")

    def answered(self) -> int:
        return sum(outcome.error is None for outcome in self.outcomes)

    def failures(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.error is not None]


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> float:
    """Seconds it took for `condition` to hold; fails the test past `seconds`."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < seconds, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic() - began


def supervisor_lines(moxy: MoxyServer, start: str) -> list[str]:
    return [line for line in moxy.log().splitlines() if line.startswith(f"moxy: {start}")]


def workers_of(moxy: MoxyServer) -> set[int]:
    assert moxy.process is not None
    return processes.children(moxy.process.pid)


def path_of(url: str) -> str:
    return urlsplit(url).path


@pytest.fixture
def paths(origin: Origin) -> Iterator[Callable[[MoxyServer, str], list[tuple[str, bytes]]]]:
    origin.route("/a.png", Reply(headers=IMAGE, body=PNG))
    origin.route("/slow.png", SLOW)

    def signed(moxy: MoxyServer, key: str = KEY) -> list[tuple[str, bytes]]:
        signer = Signer([key], moxy.base_url)
        fast = (path_of(signer.sign(origin.url("/a.png"))), PNG)
        slow = (path_of(signer.sign(origin.url("/slow.png"))), PNG)
        return [fast] * (SLOW_SHARE - 1) + [slow]

    yield signed


def reload(moxy: MoxyServer, done_before: int) -> float:
    """SIGHUP, then the seconds until the supervisor reports the reload done."""
    assert moxy.process is not None
    moxy.process.send_signal(signal.SIGHUP)
    return wait_until(lambda: len(supervisor_lines(moxy, "reloaded:")) > done_before, 60, "the reload")


@pytest.mark.parametrize("workers", [2, 1])
def test_sighups_under_load_drop_nothing_and_replace_every_worker(
    start_moxy: StartMoxy, paths: Callable[..., list[tuple[str, bytes]]], workers: int
) -> None:
    moxy = start_moxy(workers=workers)
    wait_until(lambda: len(workers_of(moxy)) == workers, 10, "the workers")
    with Load(moxy.port, paths(moxy)) as load:
        for done in range(3):
            load.wait_for_answers(150)  # traffic under way before each SIGHUP, however busy the machine
            before = workers_of(moxy)
            reload(moxy, done)
            after = workers_of(moxy)
            new = after - before
            assert len(new) == workers, f"reload {done + 1}: {len(new)} new workers of {workers}"
            # The replaced workers drain and leave (their clients are busy: each next answer tells them to go).
            wait_until(lambda: not (workers_of(moxy) & before), 20, "the replaced workers to exit")  # noqa: B023
        load.wait_for_answers(150)
    assert load.failures() == [], f"{len(load.failures())} of {len(load.outcomes)} failed"
    assert any(outcome.closing for outcome in load.outcomes), "keep-alive clients were told to leave"
    assert len(supervisor_lines(moxy, "reloaded:")) == 3


def test_sighup_takes_new_keys_and_refuses_a_broken_configuration(
    tmp_path: Path, start_moxy: StartMoxy, paths: Callable[..., list[tuple[str, bytes]]]
) -> None:
    key_file = tmp_path / "moxy.key"
    key_file.write_text(KEY + "\n")
    moxy = start_moxy(workers=2, key=None, key_file=key_file)
    old_urls, new_urls = paths(moxy, KEY), paths(moxy, OLD_KEY)
    with Load(moxy.port, old_urls, threads=6) as load:
        load.wait_for_answers(100)
        assert get(moxy, new_urls[0][0]) == 403, "not a key yet"

        key_file.write_text(f"{OLD_KEY},{KEY}\n")  # a new key signs, the old one still verifies
        reload(moxy, 0)
        assert get(moxy, new_urls[0][0]) == 200
        assert get(moxy, old_urls[0][0]) == 200

        wait_until(lambda: len(workers_of(moxy)) == 2, 10, "the replaced workers to exit")
        serving = workers_of(moxy)
        key_file.write_text("too-short\n")
        assert moxy.process is not None
        moxy.process.send_signal(signal.SIGHUP)
        wait_until(lambda: bool(supervisor_lines(moxy, "reload refused")), 10, "the refusal")
        load.wait_for_answers(100)
        assert workers_of(moxy) == serving, "the running workers keep serving"
        assert get(moxy, new_urls[0][0]) == 200 and get(moxy, old_urls[0][0]) == 200
    refusals = supervisor_lines(moxy, "reload refused")
    assert len(refusals) == 1 and "MOXY_KEY_FILE" in refusals[0], refusals
    assert "Traceback" not in moxy.log()
    assert load.failures() == [], f"{len(load.failures())} of {len(load.outcomes)} failed"


def get(moxy: MoxyServer, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", moxy.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_sigterm_under_load_answers_what_it_accepted_and_exits_0(
    start_moxy: StartMoxy, paths: Callable[..., list[tuple[str, bytes]]]
) -> None:
    moxy = start_moxy(workers=2)
    assert moxy.process is not None
    with Load(moxy.port, paths(moxy)) as load:
        load.wait_for_answers(300)
        signalled = time.monotonic()
        moxy.process.send_signal(signal.SIGTERM)
        code = moxy.process.wait(40)
        drained = time.monotonic() - signalled
        time.sleep(0.2)
    assert code == 0
    assert drained < 30, "within the grace period"
    # A connection the kernel completed before the signal was accepted: all its requests are answered. One made
    # after it may be refused (or reset, if it arrived as the last listener closed).
    accepted = [outcome for outcome in load.outcomes if outcome.connected is not None and outcome.connected < signalled]
    lost = [outcome for outcome in accepted if outcome.error is not None]
    assert lost == [], f"{len(lost)} of {len(accepted)} requests on accepted connections failed: {lost[:5]}"
    assert len(accepted) >= 300
    refused = [outcome for outcome in load.failures() if outcome.connected is None]
    assert refused, "new connections were refused"
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", moxy.port), timeout=5):
        pass


def test_sigkill_of_the_supervisor_takes_its_workers_within_a_second(start_moxy: StartMoxy) -> None:
    moxy = start_moxy(workers=2)
    assert moxy.process is not None
    wait_until(lambda: len(workers_of(moxy)) == 2, 10, "the workers")
    workers = workers_of(moxy)
    os.kill(moxy.process.pid, signal.SIGKILL)
    moxy.process.wait(5)
    took = wait_until(lambda: not any(processes.alive(pid) for pid in workers), 1.0, "the workers to die")
    assert took < 1.0
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", moxy.port), timeout=5):
        pass


def test_a_worker_leaves_when_its_supervisor_is_gone_without_the_kernels_signal(tmp_path: Path) -> None:
    """The fallback of moxy.supervisor.bind_to_supervisor: this test plays the supervisor, so the kernel's
    parent-death signal never fires (the parent lives on), and the worker has only its control socket to go by."""
    listener = socket.create_server(("127.0.0.1", 0))
    ours, theirs = socket.socketpair()
    env = {name: value for name, value in os.environ.items() if not name.startswith("MOXY_")}
    env |= {"MOXY_KEY": KEY, "MOXY_CACHE_DIR": str(tmp_path / "cache"), "MOXY_ACCESS_LOG": "false"}
    fds = [str(listener.fileno()), str(theirs.fileno())]
    command = [sys.executable, "-m", "moxy", "worker", "--listen-fd", fds[0], "--control-fd", fds[1]]
    worker = subprocess.Popen(
        [*command, "--supervisor", str(os.getpid())], env=env, pass_fds=[listener.fileno(), theirs.fileno()]
    )
    theirs.close()
    try:
        ours.settimeout(20)
        assert ours.recv(1) == b"R", "serving"
        ours.close()  # as the supervisor's death would
        began = time.monotonic()
        assert worker.wait(5) == 1
        assert time.monotonic() - began < 1.0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(5)
        listener.close()


def test_readiness_turns_503_on_a_kept_connection_once_the_worker_drains(start_moxy: StartMoxy) -> None:
    """A load balancer's probe on a kept-alive connection must learn that this worker is going (DESIGN: 503 only
    while starting or draining), not be told it is ready until the connection drops."""
    moxy = start_moxy(workers=1)
    port = urlsplit(moxy.base_url).port
    assert port is not None
    probe = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        probe.request("GET", "/readyz")
        ready = probe.getresponse()
        assert (ready.status, ready.read()) == (200, b'{"status":"ready","degraded":[]}')
        assert moxy.process is not None
        moxy.process.send_signal(signal.SIGTERM)
        # Well inside the keep-alive time (MOXY_KEEPALIVE_TIMEOUT, 5 s) during which the drain keeps it open.
        time.sleep(1.0)
        probe.request("GET", "/readyz")
        draining = probe.getresponse()
        assert (draining.status, draining.read()) == (503, b'{"status":"draining"}')
        assert draining.getheader("connection") == "close" and draining.getheader("cache-control") == "no-store"
    finally:
        probe.close()
    assert moxy.process.wait(timeout=15) == 0

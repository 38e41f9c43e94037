"""`moxy warm` against a hostile endpoint (tests/integration/origin.py standing where Moxy or the CDN would be): it
ends within --timeout whatever the endpoint trickles, reads no body past its bound, keeps nothing of a body, reads a
list of any length as it goes with flat memory, and echoes what the endpoint says only as printable text.

Each run is the installed command in a child process, measured by os.wait4: its wall time and its peak RSS."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import pytest

from moxy.signing import Signer
from tests.assets import KEY, PNG
from tests.integration.origin import ENDLESS, Origin, Reply

pytestmark = pytest.mark.integration

CDN = "https://cdn.example.invalid"  # the public address; nothing answers there, every test names --endpoint
MIB = 1024 * 1024
# The peak RSS of a `moxy warm` run that fetches nothing (Python, click, httpx, the settings) is ~47 MiB here; no run
# may pass that by more than this, whatever its list or bodies. The old command held the whole list, signed, and
# every result (~110 MB/s of `yes URL`) before its first fetch.
GROWTH_ALLOWED = 24 * MIB


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int  # bytes

    def summary(self) -> dict[str, int]:
        lines = self.stdout.strip().splitlines()
        return {line.rsplit(None, 1)[0]: int(line.rsplit(None, 1)[1]) for line in lines[:-1]}


def run_warm(
    *args: str,
    feed: Callable[[IO[bytes]], None] | bytes = b"",
    env: dict[str, str] | None = None,
    stop_when: Callable[[], bool] | None = None,
    seconds: float = 60,
) -> Run:
    """`python -m moxy warm ARGS`, its standard input written by `feed` (in a thread, so a feed that blocks on a full
    pipe is no deadlock); with `stop_when`, SIGTERM once it holds. Fails the test when the run outlives `seconds`."""
    base = {name: value for name, value in os.environ.items() if not name.startswith("MOXY_")}
    base |= {"MOXY_KEY": KEY, "MOXY_BASE_URL": CDN, **(env or {})}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "moxy", "warm", *args], stdin=subprocess.PIPE, stdout=out, stderr=err, env=base
        )
        assert process.stdin is not None
        stdin = process.stdin

        def write() -> None:
            try:
                if isinstance(feed, bytes):
                    stdin.write(feed)
                else:
                    feed(stdin)
            except BrokenPipeError:  # the command stopped (or was stopped) before reading it all
                pass
            finally:
                with contextlib.suppress(BrokenPipeError):
                    stdin.close()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        deadline = started + seconds
        # Peek without reaping (WNOWAIT; Popen.poll would reap): os.wait4 below reaps, and so reads the rusage.
        while not exited(process.pid) and time.monotonic() < deadline:
            if stop_when is not None and stop_when():
                process.terminate()
                break
            time.sleep(0.05)
        if time.monotonic() >= deadline:
            process.kill()
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        writer.join(5)
        out.seek(0)
        err.seek(0)
        result = Run(process.returncode, out.read().decode(), err.read().decode(), elapsed, usage.ru_maxrss * 1024)
    assert elapsed < seconds, f"warm still running after {seconds} s: {result.stderr[-2000:]}"
    return result


def exited(pid: int) -> bool:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


@pytest.fixture(scope="module")
def small_peak() -> int:
    """The peak RSS of warm on a one-line list that fails at once: what any run costs."""
    done = run_warm("-", feed=b"not a url\n")
    assert done.returncode == 1, done.stderr
    return done.peak_rss


# -- a whole URL within --timeout ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        # One body byte every half second: every read is quick, so a per-read timeout never fires.
        pytest.param(Reply(chunked=True, stream_size=ENDLESS, chunk_size=1, chunk_delay=0.5), id="trickled-body"),
        # The head itself, one byte every half second.
        pytest.param(Reply(body=PNG, head_drip=0.5), id="trickled-head"),
        # An error whose body never ends, a byte at a time.
        pytest.param(
            Reply(status=500, chunked=True, stream_size=ENDLESS, chunk_size=1, chunk_delay=0.5), id="trickled-500"
        ),
    ],
)
def test_a_trickling_endpoint_fails_the_url_at_the_timeout(small_peak: int, reply: Reply) -> None:
    with Origin() as endpoint:
        endpoint.route("/slow.png", reply)
        endpoint.route("/fine.png", Reply(headers={"X-Moxy-Cache": "MISS"}, body=PNG))
        stdin = f"{endpoint.url('/slow.png')}\n{endpoint.url('/fine.png')}\n".encode()
        done = run_warm("--endpoint", endpoint.url(""), "--timeout", "2", "-", feed=stdin, seconds=30)
    assert done.seconds < 2 + 5, done.seconds  # the timeout, and the start of an interpreter
    assert done.returncode == 1, done.stderr
    failed = "error 500" if reply.status == 500 and reply.head_drip == 0 else "error timeout"
    assert done.summary() == {"MISS": 1, failed: 1}
    assert done.peak_rss < small_peak + GROWTH_ALLOWED


def test_endless_bodies_are_read_up_to_the_bound_and_kept_nowhere(small_peak: int) -> None:
    with Origin() as endpoint:
        # Fast and endless, with no length to refuse it by: read (and dropped) up to MOXY_MAX_BODY_BYTES.
        endpoint.route("/endless.png", Reply(chunked=True, stream_size=ENDLESS, headers={"X-Moxy-Cache": "MISS"}))
        # A length past the bound: refused from the head, no body read.
        endpoint.route("/declared.png", Reply(stream_size=ENDLESS, headers={"X-Moxy-Cache": "MISS"}))
        # An endless error: its status is the outcome, and only its first bytes are read for a reason.
        endpoint.route("/endless-500.png", Reply(status=500, chunked=True, stream_size=ENDLESS))
        # A whole body just under the bound is read to its end (as a CDN must, to keep it): a success.
        endpoint.route("/large.png", Reply(stream_size=40 * MIB, headers={"X-Moxy-Cache": "MISS"}))
        names = ("endless", "declared", "endless-500", "large")
        stdin = "".join(f"{endpoint.url(f'/{name}.png')}\n" for name in names).encode()
        env = {"MOXY_MAX_BODY_BYTES": str(48 * MIB)}
        done = run_warm("--endpoint", endpoint.url(""), "--timeout", "20", "-", feed=stdin, env=env, seconds=40)
        sent = {name: endpoint.body_bytes_sent(f"/{name}.png") for name in names}
    assert done.returncode == 1, done.stderr
    assert done.summary() == {"MISS": 1, "error 500": 1, "error too large": 2}, done.stdout
    assert f"more than {48 * MIB} bytes" in done.stderr and "past" in done.stderr
    assert done.seconds < 20, done.seconds  # ended by the bound, not by the timeout
    assert sent["large"] == 40 * MIB
    # What the endpoint wrote before warm stopped reading: the bound, plus what the socket buffers held.
    assert 48 * MIB <= sent["endless"] < 48 * MIB + 16 * MIB
    assert sent["endless-500"] < 16 * MIB and sent["declared"] < 16 * MIB
    assert done.peak_rss < small_peak + GROWTH_ALLOWED, (done.peak_rss, small_peak)


# -- a list of any length, read as it is fetched -------------------------------------------------------------------


def test_a_long_list_from_a_pipe_is_fetched_as_it_is_read_in_flat_memory(small_peak: int) -> None:
    """`yes URL | moxy warm -`: the first fetch comes while the list is still being written, and memory stays
    flat. The run is stopped after some thousands of fetches: the rest would only repeat them."""
    url = "https://example.com/picture.png"
    path = Signer([KEY], CDN).sign(url)[len(CDN) :]  # the same line, signed the same way each time
    lines = 200_000
    written = threading.Event()

    def feed(stdin: IO[bytes]) -> None:
        line = f"{url}\n".encode()
        for _ in range(lines // 1000):
            stdin.write(line * 1000)
        stdin.flush()
        written.set()

    with Origin() as endpoint:
        endpoint.route(path, Reply(headers={"X-Moxy-Cache": "HIT"}, body=PNG))
        first_fetch_before_all_written: list[bool] = []

        def enough() -> bool:
            hits = endpoint.hits(path)
            if hits and not first_fetch_before_all_written:
                first_fetch_before_all_written.append(not written.is_set())
            return hits >= 3000 or written.is_set()

        done = run_warm("--endpoint", endpoint.url(""), "-", feed=feed, stop_when=enough, seconds=90)
    # The old command read (and signed) every line before its first fetch; now the writer is held back by the pipe
    # until the fetches make room, so the fetching starts long before the list ends.
    assert first_fetch_before_all_written == [True], done.stderr
    assert not written.is_set()
    assert done.peak_rss < small_peak + GROWTH_ALLOWED, (done.peak_rss, small_peak)


def test_a_long_list_of_unusable_lines_is_counted_in_flat_memory(small_peak: int) -> None:
    """200 000 lines, none signable: each is a failed line, the run finishes, and what it keeps of them is the
    count and the first few to show."""
    done = run_warm("-", feed=b"not a url\n" * 200_000, seconds=90)
    assert done.returncode == 1
    assert done.summary() == {"error unusable": 200_000}
    closing = done.stdout.strip().splitlines()[-1]
    assert closing.startswith("200000 URLs in ") and closing.endswith(", 200000 failed")
    shown = [
        line for line in done.stderr.splitlines() if line.startswith("moxy: error unusable: not a url (cannot sign: ")
    ]
    assert len(shown) == 20
    assert done.stderr.splitlines()[-1] == "moxy: ... and 199980 more failed"
    assert done.peak_rss < small_peak + GROWTH_ALLOWED, (done.peak_rss, small_peak)


# -- what the endpoint says, shown safely --------------------------------------------------------------------------

# A reason that sets the terminal's title, clears the screen, forges a line of its own and reverses the text after
# it; long, but within the 4 KiB of an error body that warm reads for its reason.
HOSTILE = "\x1b]0;owned\x07\x1b[2J\rmoxy: everything is fine\n\u202eevil" + "x" * 1000
ESCAPED = "\\x1b]0;owned\\x07\\x1b[2J\\rmoxy: everything is fine\\n\\u202eevil" + "x" * 1000


def test_hostile_cache_values_and_reasons_cannot_shape_the_output() -> None:
    with Origin() as endpoint:
        for number in range(30):  # each a different X-Moxy-Cache: one "other" row, not thirty
            endpoint.route(f"/v{number}.png", Reply(headers={"X-Moxy-Cache": f"NOT-MOXY-{number}"}, body=PNG))
        endpoint.route("/escape.png", Reply(headers=[("X-Moxy-Cache", b"\x1b[31mHIT")], body=PNG))
        endpoint.route("/hit.png", Reply(headers={"X-Moxy-Cache": "HIT"}, body=PNG))
        endpoint.route("/plain.png", Reply(body=PNG))  # a CDN that drops the header: OK
        endpoint.route("/error.png", Reply.json({"error": "bad gateway", "reason": HOSTILE}, status=502))
        names = [f"v{number}" for number in range(30)] + ["escape", "hit", "plain", "error"]
        stdin = "".join(f"{endpoint.url(f'/{name}.png')}\n" for name in names).encode()
        done = run_warm("--endpoint", endpoint.url(""), "-", feed=stdin)
    assert done.returncode == 1
    assert done.summary() == {"HIT": 1, "OK": 1, "other": 31, "error 502": 1}, done.stdout
    (reported,) = [line for line in done.stderr.splitlines() if line.startswith("moxy: error 502")]
    assert reported.isprintable() and len(reported) < 500
    assert reported.endswith(f"/error.png ({ESCAPED[:300]}...)")  # escaped, and cut at 300 characters
    assert "everything is fine" not in done.stderr.replace(reported, "")  # no line of its own
    assert all(line.isprintable() for line in (done.stdout + done.stderr).splitlines())

"""`moxy warm` against a real Moxy and origin on loopback: upstream URLs are signed and fetched, Moxy URLs are fetched
as they are (re-based on --endpoint), the summary counts outcomes, failures are named and make the exit code 1."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from moxy.signing import Signer
from tests.assets import KEY, PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply
from tests.net import free_port

pytestmark = pytest.mark.integration

SECRET = "an-origin-secret-for-the-cdn-0123"
CDN = "https://cdn.example.invalid"  # the public address pages use; nothing answers there in these tests


def picture() -> Reply:
    return Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=3600"}, body=PNG)


def warm(
    *args: str, stdin: str, env: dict[str, str] | None = None, moxy: MoxyServer
) -> subprocess.CompletedProcess[str]:
    """The installed command, as an operator runs it, with the key and address the server has."""
    base = {name: value for name, value in os.environ.items() if not name.startswith("MOXY_")}
    base |= {"MOXY_KEY": KEY, "MOXY_BASE_URL": moxy.base_url, **(env or {})}
    command = [sys.executable, "-m", "moxy", "warm", *args]
    return subprocess.run(command, input=stdin, env=base, capture_output=True, text=True, timeout=120)


def summary(stdout: str) -> dict[str, int]:
    """The outcome table: `NAME  count` lines before the closing line."""
    lines = stdout.strip().splitlines()
    return {line.rsplit(None, 1)[0]: int(line.rsplit(None, 1)[1]) for line in lines[:-1]}


def test_warm_signs_fetches_counts_and_fails_on_errors(
    origin: Origin, start_moxy: Callable[..., MoxyServer], tmp_path: Path
) -> None:
    for name in ("a", "b", "c"):
        origin.route(f"/{name}.png", picture())
    origin.route("/page.png", Reply(headers={"Content-Type": "text/html"}, body=b"<html>not a picture</html>"))
    moxy = start_moxy()
    listed = tmp_path / "urls.txt"
    listed.write_text(
        "# pictures of the home page\n"
        f"{origin.url('/a.png')}\n\n{origin.url('/b.png')}\n{moxy.sign(origin.url('/c.png'))}\n"
        f"{origin.url('/missing.png')}\n{origin.url('/page.png')}\n"
    )
    first = warm(str(listed), "--concurrency", "3", "-H", "Accept: image/webp,*/*", stdin="", moxy=moxy)
    assert first.returncode == 1, first.stderr
    assert summary(first.stdout) == {"MISS": 3, "error 404": 1, "error 502": 1}
    assert first.stdout.strip().splitlines()[-1].startswith("5 URLs in ")
    assert first.stdout.strip().splitlines()[-1].endswith(", 2 failed")
    named = [line for line in first.stderr.splitlines() if line.startswith("moxy: error")]
    assert named == [
        f"moxy: error 404: {origin.url('/missing.png')} (upstream-status-404)",
        f"moxy: error 502: {origin.url('/page.png')} (content-type)",
    ], first.stderr
    assert "warming" in first.stderr  # click's progress bar (its label alone when stderr is no terminal)
    # The header given is sent: Moxy forwards its class of Accept, so warm can fill the variant browsers ask for.
    assert {r.headers.get("accept") for r in origin.requests if r.path == "/a.png"} == {"image/webp,*/*"}

    # From standard input, once more: everything good is now a hit, and the origin saw each picture once.
    again = warm("-", stdin=f"{origin.url('/a.png')}\n{moxy.sign(origin.url('/b.png'))}\n", moxy=moxy)
    assert again.returncode == 0, again.stderr
    assert summary(again.stdout) == {"HIT": 2}
    assert [origin.hits(f"/{name}.png") for name in ("a", "b", "c")] == [1, 1, 1]


def test_endpoint_fetches_published_urls_from_one_moxy_with_the_origin_secret(
    origin: Origin, start_moxy: Callable[..., MoxyServer]
) -> None:
    origin.route("/a.png", picture())
    origin.route("/b.png", picture())
    moxy = start_moxy(origin_secret=SECRET, base_url=CDN)
    published = Signer([KEY], CDN).sign(origin.url("/a.png"))  # as the pages show it: under the CDN's address
    stdin = f"{published}\n{origin.url('/b.png')}\n"
    env = {"MOXY_BASE_URL": CDN, "MOXY_ORIGIN_SECRET": SECRET}
    done = warm("--endpoint", moxy.base_url, "-", stdin=stdin, env=env, moxy=moxy)
    assert done.returncode == 0, done.stderr
    assert summary(done.stdout) == {"MISS": 2}
    assert origin.hits("/a.png") == origin.hits("/b.png") == 1
    # Without the secret the origin refuses warm like any client that goes around the CDN.
    refused = warm("--endpoint", moxy.base_url, "-", stdin=stdin, env={"MOXY_BASE_URL": CDN}, moxy=moxy)
    assert refused.returncode == 1 and summary(refused.stdout) == {"error 403": 2}


def test_unreachable_moxy_is_an_error_per_url(origin: Origin, tmp_path: Path) -> None:
    closed = MoxyServer(tmp_path / "cache")  # never started: nothing listens on its port
    closed.port = free_port()
    done = warm("-", stdin=f"{origin.url('/a.png')}\n{origin.url('/b.png')}\n", moxy=closed)
    assert done.returncode == 1
    assert summary(done.stdout) == {"error connection": 2}
